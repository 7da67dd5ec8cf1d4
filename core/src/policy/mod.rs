//! NetworkPolicy, pure: the model (`model`), label selectors (`selector`), what a node enforces
//! (`ruleset`), how the one becomes the other (`compile` from scratch, `incremental` as inputs
//! change), the reference semantics (`evaluate`) and a simulator of a ruleset on a packet
//! (`interpret`) to check the two against each other, and the ruleset as nftables scripts
//! (`nft`).

pub mod blocks;
pub mod compile;
pub mod evaluate;
pub mod incremental;
pub mod interpret;
pub mod model;
pub mod names;
pub mod nft;
pub mod plan;
pub mod ruleset;
pub mod selector;

pub use compile::compile;
pub use incremental::Compiler;
pub use model::*;
