//! `trellis-dns`: authoritative answers for `<svc>.<ns>.svc.clusterset.local` from the mesh's
//! exported services, everything else forwarded upstream.
//!
//! - [`model`]: the input ([`Catalog`]) the mesh controller streams (or a file holds);
//! - [`zone`]: the records built from it (pure);
//! - [`answer`]: the slow path, one packet in, one decision out (pure, hickory-proto);
//! - [`fast`]: precomputed wire answers for in-zone names (pure, no allocation per query);
//! - [`catalog`]: the atomically swapped snapshot and the file source;
//! - [`subscription`]: the controller as the source (its agent stream, mapped to a catalog);
//! - [`forward`]: relaying to upstream resolvers, for the clients [`acl`] allows;
//!   [`resolv`]: resolv.conf parsing;
//! - [`wire`]: reading and patching messages in wire format (question, OPT, truncation);
//! - [`rrl`]: response rate limiting per client network (fixed memory, O(1));
//! - [`server`]: the UDP loops, TCP, /metrics and /readyz; [`metrics`]: `trellis_dns_*`.

pub mod acl;
pub mod answer;
pub mod catalog;
pub mod config;
pub mod fast;
pub mod forward;
pub mod metrics;
pub mod model;
pub mod resolv;
pub mod rrl;
pub mod server;
pub mod subscription;
pub mod wire;
pub mod zone;

pub use catalog::{Snapshot, ZoneHandle};
pub use config::Config;
pub use model::{Catalog, ClusterEndpoints, Endpoint, Protocol, ServiceImport, ServicePort};

use std::net::SocketAddr;

/// Errors of the DNS library, named after the failing operation. The cause is in
/// [`source()`](std::error::Error::source), never in the message: print the chain
/// ([`trellis_core::error_chain`], or anyhow's `{:#}`) to see it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
    /// The zone apex is not a domain name.
    #[error("invalid configuration: zone {apex:?}")]
    ZoneName {
        /// The apex as given.
        apex: String,
        /// Why it is not a name.
        #[source]
        source: hickory_proto::ProtoError,
    },
    /// A catalog could not be parsed.
    #[error("parsing the service catalog")]
    ParseCatalog {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A catalog file could not be read.
    #[error("reading the service catalog {path}")]
    ReadCatalog {
        /// The file.
        path: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A listening socket could not be set up.
    #[error("binding {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("starting thread {name}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("registering metrics")]
    Metrics {
        /// The prometheus error.
        #[source]
        source: prometheus::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_sources_printed_once() {
        let error = Error::ReadCatalog {
            path: "/nope".into(),
            source: std::io::Error::other("No such file"),
        };
        assert_eq!(
            trellis_core::error_chain(&error),
            "reading the service catalog /nope: No such file"
        );
        let error = Catalog::from_json("{").unwrap_err();
        let chain = trellis_core::error_chain(&error);
        assert!(
            chain.starts_with("parsing the service catalog: "),
            "{chain}"
        );
        assert_eq!(chain.matches("EOF").count(), 1, "{chain}");
    }
}
