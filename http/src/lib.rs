//! One HTTP/1.1 stack for Trellis, on hyper: the server every daemon answers `/metrics`,
//! `/healthz`, `/readyz` and `/status` with, and the blocking client the CLI, the lab and the
//! tests read them with.
//!
//! The server is built to stay answerable under abuse: connections are capped in total and per
//! client (an IPv4 address or IPv6 /64, [`trellis_core::admission`]), the request head must
//! arrive within a deadline, and a whole connection (reading, handling, writing) within
//! another, so idle or non-reading clients hold a slot for seconds at most and can never take
//! every slot from one address: a kubelet probing health from another address always gets in.

pub mod client;
pub mod server;

pub use client::{ClientError, Get, Response, get};
pub use server::{Limits, Reply, Routes, serve};
