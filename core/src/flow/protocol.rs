//! The frames of a node's flow channel: a second agent connection a gateway opens to its
//! controller (hello role `flows`, the node's own certificate), on which the controller asks
//! and the node answers, so the controller relays a whole cluster (as hubble-relay does)
//! without any listener on the node. Queries are multiplexed by `id`; the controller may
//! cancel one (a reader went away).
//!
//! The same frames carry a query between controllers over peering, where the answering
//! controller keeps only the flows one of whose ends is a pod of the asking cluster.

use serde::{Deserialize, Serialize};

use super::model::Flow;
use super::request::FlowRequest;

/// The most flows one [`FlowReply::Flows`] frame carries.
pub const MAX_FLOWS_PER_FRAME: usize = 256;

/// The most queries a node serves at once on its channel (more are answered with an error).
pub const MAX_QUERIES_PER_NODE: usize = 16;

/// Controller → node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FlowCommand {
    /// Send the recorded flows `request` selects, then (when it follows) new ones as they
    /// come, until cancelled.
    Query {
        id: u64,
        request: Box<FlowRequest>,
    },
    Cancel {
        id: u64,
    },
}

/// Node → controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FlowReply {
    /// Flows of query `id`, oldest first.
    Flows { id: u64, flows: Vec<Flow> },
    /// Flows the query missed: the follower fell behind the ring and they were overwritten.
    Lost { id: u64, count: u64 },
    /// Query `id` is done: its recorded flows are all sent (a query that does not follow), or
    /// it was refused (`error`).
    End {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}
