//! Flows, pure: what one node saw of one connection or one dropped packet (`model`), the raw
//! events the kernel reports before they are named (`kernel`), what a reader asks for
//! (`request`: Hubble's filters, `--last`, `--since`, `--follow`) and the frames that carry
//! queries and flows between a node and its controller (`protocol`).

#[doc(hidden)]
pub mod fixture;
pub mod format;
pub mod kernel;
pub mod model;
pub mod protocol;
pub mod request;

pub use model::*;
pub use request::{FlowFilter, FlowRequest};
