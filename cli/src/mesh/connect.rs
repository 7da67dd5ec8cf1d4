//! `trellis mesh connect` and `disconnect`: two enabled clusters made (or unmade) each other's
//! peers. Each side's facts come from its cluster — its identity and the ranges it may claim
//! from its certificate, its peering endpoint from the peering Service — and each release's
//! `peers[]` is updated with `helm upgrade --reuse-values`, printed, and run unless
//! `--dry-run`. Nothing changes unless both sides check out (same mesh CA, distinct clusters,
//! disjoint ranges), and a side already as wanted is left alone.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};
use trellis_core::cluster::ClusterId;

use super::certificate::{self, TLS_SECRET};
use super::helm::{Helm, RELEASE, Target, release_values, shell_line, upgrade_peers_args};
use super::ranges;
use super::unix_now;

/// The peering Service of the chart's release `trellis`.
pub const PEERING_SERVICE: &str = "trellis-peering";

/// One cluster of the pair.
pub struct Side {
    pub target: Target,
    pub client: kube::Client,
    /// Where the other side dials this one, when the Service's address is not the one
    /// (`--endpoint`, `--destination-endpoint`).
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub chart: PathBuf,
    pub dry_run: bool,
    pub helm_program: String,
}

/// What one side is, as the other needs it.
#[derive(Debug, Clone)]
struct Facts {
    id: ClusterId,
    ca_pem: String,
    ranges: Vec<IpNet>,
    /// The release's user-supplied values.
    values: Value,
}

/// How peers reach a cluster, from its peering Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// On any node's address, at this port.
    NodePort(u16),
    /// At this address.
    Address(SocketAddr, String),
}

/// How the peering Service is reached from outside, or why it cannot be.
pub fn reach(service: &Service) -> anyhow::Result<Reach> {
    let spec = service
        .spec
        .as_ref()
        .context("the peering Service has no spec")?;
    let ports = spec.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("peering"))
        .or_else(|| ports.first())
        .context("the peering Service has no port")?;
    match spec.type_.as_deref() {
        Some("NodePort") => {
            let node_port = port
                .node_port
                .context("the peering Service has no node port yet")?;
            Ok(Reach::NodePort(
                u16::try_from(node_port).context("a node port out of range")?,
            ))
        }
        Some("LoadBalancer") => {
            let port = u16::try_from(port.port).context("a port out of range")?;
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_deref())
                .unwrap_or_default();
            if let Some(ip) = ingress
                .iter()
                .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok())
                .next()
            {
                return Ok(Reach::Address(
                    SocketAddr::new(ip, port),
                    "LoadBalancer ingress".into(),
                ));
            }
            if let Some(host) = ingress.iter().find_map(|i| i.hostname.as_deref()) {
                bail!(
                    "the peering LoadBalancer's address is the host name {host}, and peers take \
                     an IP address: pass the address it resolves to with --endpoint IP:{port}"
                );
            }
            bail!(
                "the peering LoadBalancer has no external address yet: wait for it, or pass \
                 --endpoint IP:PORT"
            )
        }
        other => bail!(
            "the peering Service is of type {}: peers cannot reach it; install with \
             peering.service.type NodePort or LoadBalancer, or pass --endpoint IP:PORT",
            other.unwrap_or("ClusterIP")
        ),
    }
}

/// The node whose address peers dial for a NodePort: a Ready one first, by name; its first
/// IPv4 InternalIP (else IPv6).
pub fn node_address(nodes: &[Node]) -> Option<(String, IpAddr)> {
    let ready = |node: &Node| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let mut candidates: Vec<(bool, String, IpAddr)> = nodes
        .iter()
        .filter_map(|node| {
            let state = trellis_controller::objects::node_state(node)?;
            let ip = state
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4())
                .or_else(|| state.internal_ips.first())?;
            Some((!ready(node), state.name, *ip))
        })
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .next()
        .map(|(_, name, ip)| (name, ip))
}

async fn read_facts(
    side: &Side,
    helm: &dyn Helm,
    want_endpoint: bool,
) -> anyhow::Result<(Facts, Dialed)> {
    let label = side.target.label();
    let ns = side.target.namespace.as_str();
    let enable_hint = format!(
        "run `trellis mesh enable{} --install` first",
        side.target
            .context
            .as_deref()
            .map(|c| format!(" --context {c}"))
            .unwrap_or_default()
    );
    let secret = Api::<Secret>::namespaced(side.client.clone(), ns)
        .get_opt(TLS_SECRET)
        .await
        .with_context(|| format!("reading Secret {ns}/{TLS_SECRET} in {label}"))?
        .with_context(|| format!("{label} has no Secret {ns}/{TLS_SECRET}: {enable_hint}"))?;
    let material = certificate::tls_from_secret(&secret)?;
    let leaf = certificate::read_leaf(&material.cert_pem)
        .with_context(|| format!("the certificate in {label}"))?;
    certificate::verify(&material, unix_now())
        .with_context(|| format!("the certificate in {label} ({enable_hint} to renew it)"))?;

    let endpoint = if !want_endpoint {
        None
    } else if let Some(endpoint) = side.endpoint {
        Some((endpoint, "--endpoint".to_string()))
    } else {
        let service = Api::<Service>::namespaced(side.client.clone(), ns)
            .get_opt(PEERING_SERVICE)
            .await
            .with_context(|| format!("reading Service {ns}/{PEERING_SERVICE} in {label}"))?
            .with_context(|| {
                format!("{label} has no Service {ns}/{PEERING_SERVICE}: {enable_hint}")
            })?;
        let reach = reach(&service).with_context(|| label.clone())?;
        Some(match reach {
            Reach::Address(addr, source) => (addr, source),
            Reach::NodePort(port) => {
                let nodes = Api::<Node>::all(side.client.clone())
                    .list(&ListParams::default())
                    .await
                    .with_context(|| format!("listing the nodes of {label}"))?
                    .items;
                let (node, ip) = node_address(&nodes).with_context(|| {
                    format!("{label}: no node has an InternalIP for the peering NodePort")
                })?;
                (
                    SocketAddr::new(ip, port),
                    format!("NodePort {port} on node {node}"),
                )
            }
        })
    };

    let values = release_values(helm, &side.target)?.with_context(|| {
        format!("{label} has no helm release {RELEASE} in namespace {ns}: {enable_hint}")
    })?;
    if let Some(configured) = values.pointer("/cluster/id").and_then(Value::as_str)
        && !configured.is_empty()
        && configured != leaf.id.as_str()
    {
        bail!(
            "{label}: the release says cluster.id {configured} but its certificate is cluster \
             {}: {enable_hint}",
            leaf.id
        );
    }
    Ok((
        Facts {
            id: leaf.id,
            ca_pem: material.ca_pem,
            ranges: leaf.ranges,
            values,
        },
        endpoint,
    ))
}

/// The release's peers (its `peers` value; none when unset).
fn peers_of(values: &Value) -> anyhow::Result<Vec<Value>> {
    match values.get("peers") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(peers)) => Ok(peers.clone()),
        Some(other) => bail!("the release's peers value is not a list: {other}"),
    }
}

/// `peers` with `id` at `endpoint` (added, or its endpoint updated, its other keys kept);
/// `None` when it is already so.
pub fn with_peer(peers: &[Value], id: &ClusterId, endpoint: SocketAddr) -> Option<Vec<Value>> {
    let mut peers = peers.to_vec();
    let endpoint = Value::String(endpoint.to_string());
    match peers.iter_mut().find(|p| p["id"] == id.as_str()) {
        Some(peer) if peer["endpoint"] == endpoint => None,
        Some(peer) => {
            peer["endpoint"] = endpoint;
            Some(peers)
        }
        None => {
            peers.push(json!({"id": id.as_str(), "endpoint": endpoint}));
            Some(peers)
        }
    }
}

/// `peers` without `id`; `None` when it is not there.
pub fn without_peer(peers: &[Value], id: &ClusterId) -> Option<Vec<Value>> {
    let kept: Vec<Value> = peers
        .iter()
        .filter(|p| p["id"] != id.as_str())
        .cloned()
        .collect();
    (kept.len() != peers.len()).then_some(kept)
}

fn apply(
    target: &Target,
    peers: &[Value],
    options: &ConnectOptions,
    helm: &dyn Helm,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let args = upgrade_peers_args(target, &options.chart, peers);
    let line = shell_line(&options.helm_program, &args);
    if options.dry_run {
        writeln!(out, "would run: {line}")?;
    } else {
        writeln!(out, "$ {line}")?;
        out.flush()?;
        helm.change(&args)?;
    }
    Ok(())
}

/// Where the other side dials a cluster, and what says so.
type Dialed = Option<(SocketAddr, String)>;

/// The facts of two sides that are two clusters (and where each is dialed, when wanted).
async fn read_pair(
    a: &Side,
    b: &Side,
    helm: &dyn Helm,
    want_endpoint: bool,
) -> anyhow::Result<((Facts, Dialed), (Facts, Dialed))> {
    if a.target == b.target {
        bail!("--context and --destination-context name the same cluster");
    }
    Ok((
        read_facts(a, helm, want_endpoint).await?,
        read_facts(b, helm, want_endpoint).await?,
    ))
}

/// Makes the clusters of `a` and `b` each other's peers.
pub async fn connect(
    a: &Side,
    b: &Side,
    options: &ConnectOptions,
    helm: &dyn Helm,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let ((fa, ea), (fb, eb)) = read_pair(a, b, helm, true).await?;
    let (ea, eb) = (ea.expect("asked for"), eb.expect("asked for"));
    let (la, lb) = (a.target.label(), b.target.label());
    if fa.id == fb.id {
        bail!(
            "{la} and {lb} are both cluster {}: give one another --cluster-id",
            fa.id
        );
    }
    if !certificate::same_ca(&fa.ca_pem, &fb.ca_pem) {
        let fix_context = b.target.context.as_deref().unwrap_or("<destination>");
        let from = a.target.context.as_deref().unwrap_or("<source>");
        bail!(
            "{} ({la}) and {} ({lb}) do not share a mesh CA ({:?} and {:?}), so their \
             controllers would refuse each other: re-issue {}'s certificate from {}'s CA with \
             `trellis mesh enable --context {fix_context} --ca-from-context {from} --install` \
             (or the context that holds {:?}), then connect again",
            fa.id,
            fb.id,
            certificate::subject_name(&fa.ca_pem),
            certificate::subject_name(&fb.ca_pem),
            fb.id,
            fa.id,
            certificate::subject_name(&fa.ca_pem),
        );
    }
    for (facts, label) in [(&fa, &la), (&fb, &lb)] {
        if facts.ranges.is_empty() {
            bail!(
                "cluster {}'s certificate ({label}) carries no address ranges, so its peers \
                 would route nothing of it: re-run `trellis mesh enable` there to sign its ranges \
                 into it",
                facts.id
            );
        }
    }
    if let Some((x, y)) = ranges::overlap(&fa.ranges, &fb.ranges) {
        bail!(
            "clusters {} and {} claim overlapping ranges ({x} and {y}): their controllers would \
             refuse each other; give one of them other pod, service or peer (--peer-cidr) ranges",
            fa.id,
            fb.id
        );
    }
    for (facts, label, (endpoint, source)) in [(&fa, &la, &ea), (&fb, &lb, &eb)] {
        writeln!(
            out,
            "cluster {} ({label}): peers dial {endpoint} ({source}); it may claim {} (signed by \
             {:?})",
            facts.id,
            ranges::list(&facts.ranges),
            certificate::subject_name(&facts.ca_pem)
        )?;
    }
    // Each side lists the other at the address the other is dialed on.
    for (me, target, peer, (endpoint, _)) in
        [(&fa, &a.target, &fb, &eb), (&fb, &b.target, &fa, &ea)]
    {
        match with_peer(&peers_of(&me.values)?, &peer.id, *endpoint) {
            None => writeln!(
                out,
                "cluster {} already peers with {} at {endpoint}: unchanged",
                me.id, peer.id
            )?,
            Some(peers) => apply(target, &peers, options, helm, out)?,
        }
    }
    if !options.dry_run {
        writeln!(
            out,
            "connected {} and {}; see them peer with `trellis status{} --wait`",
            fa.id,
            fb.id,
            a.target
                .context
                .as_deref()
                .map(|c| format!(" --context {c}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Removes the clusters of `a` and `b` from each other's peers.
pub async fn disconnect(
    a: &Side,
    b: &Side,
    options: &ConnectOptions,
    helm: &dyn Helm,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let ((fa, _), (fb, _)) = read_pair(a, b, helm, false).await?;
    for (me, target, peer) in [(&fa, &a.target, &fb), (&fb, &b.target, &fa)] {
        match without_peer(&peers_of(&me.values)?, &peer.id) {
            None => writeln!(
                out,
                "cluster {} does not peer with {}: unchanged",
                me.id, peer.id
            )?,
            Some(peers) => apply(target, &peers, options, helm, out)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::List;

    fn id(s: &str) -> ClusterId {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_is_added_updated_or_left_alone() {
        let endpoint: SocketAddr = "172.18.0.3:30743".parse().unwrap();
        let added = with_peer(&[], &id("c2"), endpoint).unwrap();
        assert_eq!(
            added,
            vec![json!({"id": "c2", "endpoint": "172.18.0.3:30743"})]
        );
        assert_eq!(with_peer(&added, &id("c2"), endpoint), None);
        let custom = vec![
            json!({"id": "c3", "endpoint": "10.0.0.1:7443"}),
            json!({"id": "c2", "endpoint": "172.18.0.9:30743", "podCIDRs": ["10.12.0.0/16"]}),
        ];
        assert_eq!(
            with_peer(&custom, &id("c2"), endpoint).unwrap(),
            vec![
                json!({"id": "c3", "endpoint": "10.0.0.1:7443"}),
                json!({"id": "c2", "endpoint": "172.18.0.3:30743", "podCIDRs": ["10.12.0.0/16"]}),
            ],
            "its own keys kept, its place too"
        );
        let v6: SocketAddr = "[fd00::3]:30743".parse().unwrap();
        assert_eq!(
            with_peer(&[], &id("c2"), v6).unwrap()[0]["endpoint"],
            "[fd00::3]:30743"
        );
        assert_eq!(
            without_peer(&custom, &id("c2")).unwrap(),
            vec![json!({"id": "c3", "endpoint": "10.0.0.1:7443"})]
        );
        assert_eq!(without_peer(&custom, &id("c9")), None);
        assert!(peers_of(&json!({"peers": "c2"})).is_err());
        assert_eq!(
            peers_of(&json!({"peers": null})).unwrap(),
            Vec::<Value>::new()
        );
    }

    fn service(file: &str) -> Service {
        serde_json::from_str(
            &std::fs::read_to_string(format!("{}/testdata/{file}", env!("CARGO_MANIFEST_DIR")))
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_peering_service_says_how_it_is_reached() {
        assert_eq!(
            reach(&service("service-peering-nodeport.json")).unwrap(),
            Reach::NodePort(30743)
        );
        assert_eq!(
            reach(&service("service-peering-loadbalancer.json")).unwrap(),
            Reach::Address(
                "203.0.113.10:7443".parse().unwrap(),
                "LoadBalancer ingress".into()
            )
        );
        let mut pending = service("service-peering-loadbalancer.json");
        pending.status = None;
        assert!(
            reach(&pending)
                .unwrap_err()
                .to_string()
                .contains("no external address yet")
        );
        let mut named = service("service-peering-loadbalancer.json");
        let ingress = &mut named
            .status
            .as_mut()
            .unwrap()
            .load_balancer
            .as_mut()
            .unwrap()
            .ingress;
        ingress.as_mut().unwrap()[0].ip = None;
        ingress.as_mut().unwrap()[0].hostname = Some("a1b2.elb.example.com".into());
        let err = reach(&named).unwrap_err().to_string();
        assert!(
            err.contains("a1b2.elb.example.com") && err.contains("--endpoint IP:7443"),
            "{err}"
        );
        let mut internal = service("service-peering-nodeport.json");
        internal.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(
            reach(&internal)
                .unwrap_err()
                .to_string()
                .contains("type ClusterIP")
        );
    }

    #[test]
    fn a_ready_node_by_name_and_its_ipv4_address_are_dialed() {
        let list: List<Node> =
            serde_json::from_str(include_str!("../../testdata/nodes-kind-c2.json")).unwrap();
        assert_eq!(
            node_address(&list.items),
            Some((
                "trellis-c2-control-plane".into(),
                "172.18.0.4".parse().unwrap()
            ))
        );
        // The control plane not Ready: the Ready worker is dialed.
        let mut nodes = list.items.clone();
        for c in nodes[0]
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
        {
            if c.type_ == "Ready" {
                c.status = "False".into();
            }
        }
        assert_eq!(
            node_address(&nodes),
            Some(("trellis-c2-worker".into(), "172.18.0.5".parse().unwrap()))
        );
        assert_eq!(node_address(&[]), None);
    }
}
