//! The flows listener: `GET /flows?<query>` answers NDJSON, one flow per line (streaming
//! while it follows); `GET /flows/nodes` says which nodes (and peers) can be asked now,
//! and how often queries went without each (`trellis observe` warns from it). It has
//! no authentication of its own: it listens on loopback (`flows.listen`, 127.0.0.1:4245 by
//! default), so only `kubectl port-forward` (Kubernetes RBAC decides) or a process in the
//! controller's network namespace reaches it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::mpsc;
use trellis_core::flow::FlowRequest;
use trellis_http::{Limits, Reply, Routes};

use super::merge::ndjson;
use super::query::{self, Scope};
use super::{FlowRelay, QueryResult, QuerySource};
use crate::metrics::Listener;

pub const NDJSON: &str = "application/x-ndjson";

/// How many readers are served at once. Through `kubectl port-forward` every reader comes
/// from one address (loopback), so the per-client share is the whole: the listener is not
/// reachable by anyone RBAC did not let in.
const MAX_READERS: usize = 32;
/// A reader following flows is cut after this long (it asks again).
const MAX_FOLLOW: Duration = Duration::from_secs(3600);

struct FlowRoutes {
    relay: FlowRelay,
}

impl Routes for FlowRoutes {
    async fn get(&self, path: &str) -> Reply {
        match path {
            "/flows/nodes" => match serde_json::to_vec_pretty(&self.relay.sources()) {
                Ok(body) => Reply::json(body),
                Err(e) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            },
            "/healthz" => Reply::text("ok\n"),
            _ => Reply::not_found(),
        }
    }

    async fn get_with_query(&self, path: &str, query: &str) -> Reply {
        match path {
            "/flows" => self.flows(query),
            _ => self.get(path).await,
        }
    }
}

impl FlowRoutes {
    fn flows(&self, query: &str) -> Reply {
        let request = match FlowRequest::from_query(query) {
            Ok(request) => request,
            Err(e) => {
                self.relay
                    .query_done(QuerySource::Http, QueryResult::BadRequest);
                return Reply::error(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
        };
        tracing::debug!(?request, "a flow query");
        // The answer streams from the start, even when it does not follow: it may take the
        // nodes' (and peers') answer time, past the connection's own deadline.
        let (body, chunks) = mpsc::channel::<Bytes>(8);
        let (out, mut batches) = mpsc::channel(8);
        let scope = Scope {
            ask_peers: !request.peers.is_empty(),
            visible_to: None,
        };
        let relay = self.relay.clone();
        tokio::spawn(async move {
            let engine = tokio::spawn(query::run(relay.clone(), request, scope, out));
            let mut written = 0;
            loop {
                tokio::select! {
                    batch = batches.recv() => {
                        let Some(flows) = batch else { break };
                        if body.send(Bytes::from(ndjson(&flows))).await.is_err() {
                            break;
                        }
                        written += flows.len();
                    }
                    // The reader went away while nothing was coming.
                    () = body.closed() => break,
                }
            }
            // The engine sees its output closed, ends, and its sources' queries are
            // cancelled.
            drop(batches);
            let _ = engine.await;
            relay.relayed(QuerySource::Http, written);
            relay.query_done(QuerySource::Http, QueryResult::Ok);
        });
        Reply::streaming(NDJSON, chunks)
    }
}

/// Serves the flows listener until cancelled.
pub async fn serve(listener: tokio::net::TcpListener, relay: FlowRelay) {
    let metrics = relay.metrics().clone();
    let limits = Limits {
        max_connections: MAX_READERS,
        max_per_client: MAX_READERS,
        stream_timeout: MAX_FOLLOW,
        ..Limits::default()
    };
    trellis_http::serve(
        listener,
        Arc::new(FlowRoutes { relay }),
        limits,
        move |reason| metrics.connection_refused(Listener::Flows, reason),
    )
    .await;
}
