//! NetworkPolicy, pure: the model (`model`), label selectors (`selector`), what a node enforces (`ruleset`) and how the one
//! becomes the other (`compile`).

pub mod compile;
pub mod model;
pub mod nft;
pub mod ruleset;
pub mod selector;

pub use compile::compile;
pub use model::*;
