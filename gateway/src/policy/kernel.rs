//! The kernel side of [`super::Enforcer`]: `nft` in the node's namespace.

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_core::policy::nft::TABLE;
use trellis_netns::Netns;

use super::PolicyKernel;
use crate::nft::{self, NftError};

/// `nft` here (`netns` `None`) or in a namespace (tests, an in-process gateway).
#[derive(Debug, Clone, Default)]
pub struct NftKernel {
    pub netns: Option<Arc<Netns>>,
}

impl PolicyKernel for NftKernel {
    fn apply(&mut self, script: &str) -> Result<(), NftError> {
        nft::apply(self.netns.as_deref(), script)
    }

    fn counters(&mut self) -> Result<BTreeMap<String, u64>, NftError> {
        nft::counters(self.netns.as_deref(), TABLE)
    }
}
