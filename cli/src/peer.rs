//! `trellis peer`: external machines (a laptop, a VM) in a managed mesh, as `Peer` objects
//! (`trellis.dev/v1alpha1`, cluster-scoped) the cluster's controller checks and streams to the
//! node gateway that carries each.
//!
//! * `add NAME --context A --node N --address 10.x.y.z/32`: a fresh key pair (the private key
//!   appears only in the printed wg-quick config), the `Peer` created, its `Ready` condition
//!   awaited (a refused Peer, or one not accepted within `--timeout`, is deleted again, the
//!   controller's reason shown), then the config:
//!   the node gateway's key and endpoint from the controller's `/status` (through the API
//!   server's service proxy, as `trellis status --context` reads it), the mesh's pod and
//!   service ranges as AllowedIPs;
//! * `list`: every Peer with its key, addresses, nodes and `Ready` condition;
//! * `remove NAME`: deletes it (nothing to delete is not an error);
//! * `config`: a wg-quick file for a standalone gateway driven by a state file.
//!
//! The logic takes a `kube::Client`; the tests script the API server's answers.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use trellis_controller::crd::{Peer, PeerSpec};
use trellis_core::status::ControllerStatus;
use trellis_core::wgkey::PublicKey;
use trellis_gateway::keys::KeyPair;
use trellis_gateway::peer_config::{ExternalPeer, PeerConfigArgs, render_wg_quick};

use crate::cluster::ClusterArgs;

#[derive(Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Print a wg-quick config (with a fresh key) for an external machine; run it on the node
    /// whose gateway the machine will connect to (a standalone gateway, no controller).
    Config(PeerConfigArgs),
    /// Admit an external machine through a node's gateway: creates its Peer with a fresh key
    /// and prints its wg-quick config (the only copy of its private key).
    Add(AddArgs),
    /// Every Peer of the cluster and whether its controller accepted it.
    List(ClusterArgs),
    /// Delete a Peer: the machine is cut off.
    Remove(RemoveArgs),
}

#[derive(Args, Debug, Clone)]
pub struct AddArgs {
    /// The Peer's name (a DNS-1123 subdomain).
    #[arg(value_name = "NAME")]
    peer: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The node whose gateway carries it (repeat for standbys, in order of preference).
    #[arg(long, required = true)]
    node: Vec<String>,
    /// Its address(es) in the mesh: inside the ranges this cluster may claim, outside every
    /// node's pod CIDR and the service range; best in a range `trellis mesh enable
    /// --peer-cidr` signed (inside the pod range, node IPAM may give it to a new node: warned).
    #[arg(long, value_delimiter = ',', required = true)]
    address: Vec<IpNet>,
    /// The gateway endpoint the machine dials (`host:port`, e.g. the node's public address);
    /// the node's registered endpoint when left out.
    #[arg(long)]
    endpoint: Option<String>,
    /// Keepalive (seconds) both ends send.
    #[arg(long, default_value_t = 25)]
    keepalive: u16,
    /// Print the Peer and the config without creating anything.
    #[arg(long)]
    dry_run: bool,
    /// How long to wait for the controller's verdict; a Peer not accepted by then is deleted
    /// again (its private key is never printed).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct RemoveArgs {
    #[arg(value_name = "NAME")]
    peer: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: PeerArgs) -> anyhow::Result<()> {
    if let PeerCommand::Config(config) = args.command {
        print!("{}", config.render()?);
        return Ok(());
    }
    crate::block_on(async {
        match args.command {
            PeerCommand::Config(_) => unreachable!("handled above"),
            PeerCommand::Add(add_args) => {
                let client = add_args.cluster.connect().await?;
                let config = add(
                    client,
                    &add_args,
                    &KeyPair::generate(),
                    &mut std::io::stderr(),
                )
                .await?;
                print!("{config}");
            }
            PeerCommand::List(cluster) => {
                let client = cluster.connect().await?;
                print!("{}", render_list(&list(client).await?));
            }
            PeerCommand::Remove(remove_args) => {
                let client = remove_args.cluster.connect().await?;
                remove(client, &remove_args).await?;
            }
        }
        Ok(())
    })
}

/// The `Peer` `add` creates.
pub fn peer_object(args: &AddArgs, public_key: &PublicKey) -> Peer {
    let mut peer = Peer::new(
        &args.peer,
        PeerSpec {
            public_key: public_key.to_string(),
            allowed_ips: args.address.iter().map(ToString::to_string).collect(),
            nodes: args.node.clone(),
            persistent_keepalive: Some(args.keepalive).filter(|k| *k > 0),
            preshared_key_secret: None,
        },
    );
    peer.metadata.labels = Some(
        [(
            "app.kubernetes.io/managed-by".to_string(),
            "trellis".to_string(),
        )]
        .into(),
    );
    peer
}

/// The wg-quick config for the machine: the carrying node's gateway key and endpoint (or
/// `endpoint`), the mesh's ranges as AllowedIPs. Pure.
pub fn machine_config(
    status: &ControllerStatus,
    args: &AddArgs,
    machine: &KeyPair,
) -> anyhow::Result<String> {
    let node_name = args
        .node
        .iter()
        .find(|n| {
            status
                .nodes
                .iter()
                .any(|s| &s.node == *n && s.public_key.is_some() && s.endpoint.is_some())
        })
        .with_context(|| {
            format!(
                "none of the nodes {} has a gateway registered with the controller of {}",
                args.node.join(", "),
                status.cluster
            )
        })?;
    let node = status
        .nodes
        .iter()
        .find(|s| &s.node == node_name)
        .expect("found above");
    let registered = node.endpoint.expect("checked above");
    let endpoint = match &args.endpoint {
        None => registered,
        Some(text) => resolve_endpoint(text)?,
    };
    if status.mesh_cidrs.is_empty() {
        bail!(
            "the controller of {} reports no mesh ranges (an older controller?)",
            status.cluster
        );
    }
    Ok(render_wg_quick(&ExternalPeer {
        private_key: machine.private_key_base64(),
        addresses: args.address.clone(),
        gateway_public_key: node.public_key.expect("checked above"),
        gateway_endpoint: endpoint,
        allowed_ips: status.mesh_cidrs.clone(),
        persistent_keepalive: Some(args.keepalive).filter(|k| *k > 0),
    }))
}

fn resolve_endpoint(text: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .with_context(|| format!("--endpoint {text:?}: not host:port"))?
        .next()
        .with_context(|| format!("--endpoint {text:?} resolves to no address"))
}

/// `Ready` of a Peer: `Some((true|false, reason, message))` once the controller judged it.
fn ready_of(peer: &Peer) -> Option<(bool, String, String)> {
    let c = peer
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status == "True", c.reason.clone(), c.message.clone()))
}

/// The warning for `addresses` that lie in the ranges signed for the cluster's pods and
/// services (`signed`, the certificate's) rather than in one signed for external machines
/// (`peer_ranges`, as `trellis mesh enable --peer-cidr` records them). Outside every signed
/// range the controller refuses the Peer itself. Pure.
pub fn address_warning(
    addresses: &[IpNet],
    signed: &[IpNet],
    peer_ranges: &[IpNet],
) -> Option<String> {
    let exposed: Vec<String> = addresses
        .iter()
        .filter(|a| !peer_ranges.iter().any(|r| r.contains(*a)))
        .filter(|a| signed.iter().any(|r| r.contains(*a)))
        .map(ToString::to_string)
        .collect();
    if exposed.is_empty() {
        return None;
    }
    let pods_and_services: Vec<String> = signed
        .iter()
        .filter(|r| !peer_ranges.contains(r))
        .map(ToString::to_string)
        .collect();
    let peer_note = if peer_ranges.is_empty() {
        "no range is signed for external machines".to_string()
    } else {
        format!(
            "the ranges for external machines are {}",
            peer_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Some(format!(
        "warning: --address {} lies in the ranges signed for the cluster's pods and services \
         ({}), and {peer_note}: node IPAM may give the block holding it to a new node, and then \
         the controller refuses this Peer and the machine is cut off; sign a range outside \
         them with `trellis mesh enable --peer-cidr CIDR` and take the address from it",
        exposed.join(", "),
        pods_and_services.join(", ")
    ))
}

/// Writes the [`address_warning`] for `args.address` from the cluster's TLS Secret, or says
/// why it could not be checked.
async fn check_addresses(
    client: &kube::Client,
    args: &AddArgs,
    notes: &mut dyn Write,
) -> anyhow::Result<()> {
    let ns = args.cluster.namespace.as_str();
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(crate::mesh::TLS_SECRET)
        .await
        .map_err(anyhow::Error::from)
        .and_then(|secret| {
            secret.with_context(|| format!("there is no Secret {ns}/{}", crate::mesh::TLS_SECRET))
        })
        .and_then(|secret| crate::mesh::signed_ranges(&secret));
    match secret {
        Ok((signed, peer_ranges)) => {
            if let Some(warning) = address_warning(&args.address, &signed, &peer_ranges) {
                writeln!(notes, "{warning}")?;
            }
        }
        Err(e) => writeln!(
            notes,
            "note: not checked whether --address lies in a range signed for external machines \
             (reading Secret {ns}/{}: {e:#})",
            crate::mesh::TLS_SECRET
        )?,
    }
    Ok(())
}

/// `trellis peer add`: returns the machine's wg-quick config once its Peer is accepted; what
/// it does and warnings go to `notes`.
pub async fn add(
    client: kube::Client,
    args: &AddArgs,
    machine: &KeyPair,
    notes: &mut dyn Write,
) -> anyhow::Result<String> {
    let status = args.cluster.controller_status(&client).await?;
    let config = machine_config(&status, args, machine)?;
    check_addresses(&client, args, notes).await?;
    let peer = peer_object(args, &machine.public_key());
    let api: Api<Peer> = Api::all(client);
    if args.dry_run {
        writeln!(
            notes,
            "would create peer/{} (dry run):\n{}",
            args.peer,
            serde_norway::to_string(&peer)?
        )?;
        return Ok(config);
    }
    if api.get_opt(&args.peer).await?.is_some() {
        bail!(
            "peer/{} exists; nothing changed (its private key is not kept anywhere: `trellis peer remove {}` first to give the machine a new one)",
            args.peer,
            args.peer
        );
    }
    api.create(&PostParams::default(), &peer)
        .await
        .with_context(|| format!("creating peer/{}", args.peer))?;
    writeln!(notes, "peer/{} created", args.peer)?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last = String::from("no verdict from the controller yet");
    loop {
        if let Some(current) = api.get_opt(&args.peer).await? {
            match ready_of(&current) {
                Some((true, _, message)) => {
                    writeln!(notes, "peer/{} accepted: {message}", args.peer)?;
                    return Ok(config);
                }
                // No gateway yet: it may still register.
                Some((false, reason, message)) if reason == "NoGateway" => {
                    last = format!("{reason}: {message}");
                }
                Some((false, reason, message)) => {
                    api.delete(&args.peer, &DeleteParams::default()).await?;
                    bail!(
                        "the controller refused peer/{}: {reason}: {message} (the Peer is deleted again)",
                        args.peer
                    );
                }
                None => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            // Its private key lives only in this process: left in place, the Peer would
            // admit a key nobody holds, and a retry would find it "exists".
            api.delete(&args.peer, &DeleteParams::default())
                .await
                .with_context(|| {
                    format!(
                        "peer/{} not accepted within {:?} ({last}); deleting it again failed:                          `trellis peer remove {}` before retrying",
                        args.peer, args.timeout, args.peer
                    )
                })?;
            bail!(
                "peer/{} not accepted within {:?} ({last}); the Peer is deleted again (its private key was never printed): retry with a longer --timeout once the node's gateway is registered",
                args.peer,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One row of `trellis peer list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub name: String,
    pub key: String,
    pub addresses: String,
    pub nodes: String,
    pub ready: String,
}

pub async fn list(client: kube::Client) -> anyhow::Result<Vec<PeerRow>> {
    let api: Api<Peer> = Api::all(client);
    let mut rows: Vec<PeerRow> = api
        .list(&Default::default())
        .await
        .context("listing Peers (is the Peer CRD installed?)")?
        .items
        .iter()
        .map(|p| PeerRow {
            name: p.metadata.name.clone().unwrap_or_default(),
            key: p.spec.public_key.clone(),
            addresses: p.spec.allowed_ips.join(","),
            nodes: p.spec.nodes.join(","),
            ready: match ready_of(p) {
                Some((true, _, _)) => "True".into(),
                Some((false, reason, message)) => format!("False ({reason}: {message})"),
                None => "Unknown (not judged yet)".into(),
            },
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

pub fn render_list(rows: &[PeerRow]) -> String {
    if rows.is_empty() {
        return "no peers\n".into();
    }
    let mut table = crate::table::Table::new(&["NAME", "KEY", "ADDRESSES", "NODES", "READY"]);
    for r in rows {
        table.row([&r.name, &r.key, &r.addresses, &r.nodes, &r.ready]);
    }
    table.render("")
}

/// `trellis peer remove`.
pub async fn remove(client: kube::Client, args: &RemoveArgs) -> anyhow::Result<()> {
    let api: Api<Peer> = Api::all(client);
    if api.get_opt(&args.peer).await?.is_none() {
        println!("peer/{} not found; nothing to remove", args.peer);
        return Ok(());
    }
    if args.dry_run {
        println!("would delete peer/{} (dry run)", args.peer);
        return Ok(());
    }
    api.delete(&args.peer, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting peer/{}", args.peer))?;
    println!("peer/{} deleted", args.peer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_api::{Reply, not_found, ok, on, ordered, testdata};
    use serde_json::{Value, json};

    const STATUS_PATH: &str =
        "/api/v1/namespaces/trellis-system/services/http:trellis-controller:metrics/proxy/status";
    const PEERS: &str = "/apis/trellis.dev/v1alpha1/peers";

    fn peer_missing() -> Reply {
        on(
            "GET",
            &format!("{PEERS}/laptop"),
            not_found("peers.trellis.dev", "laptop"),
        )
    }

    fn peer_is(peer: Value) -> Reply {
        on("GET", &format!("{PEERS}/laptop"), ok(peer))
    }

    fn status_is(status: Value) -> Reply {
        on("GET", STATUS_PATH, ok(status))
    }

    const TLS_SECRET_PATH: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-tls";

    /// The cluster's TLS Secret as `trellis mesh enable` left it (its certificate signing no
    /// ranges: nothing to warn about).
    fn tls_secret_is(secret: Value) -> Reply {
        on("GET", TLS_SECRET_PATH, ok(secret))
    }

    /// What `add` asks until the Peer is created and read back as `verdict`.
    fn creating(verdict: Value) -> Vec<Reply> {
        vec![
            status_is(testdata("controller-status.json")),
            tls_secret_is(testdata("secret-trellis-tls.json")),
            peer_missing(),
            on(
                "POST",
                PEERS,
                ok(testdata("peer-laptop.json")).with_code(201),
            ),
            peer_is(verdict),
        ]
    }

    fn add_args(extra: &[&str]) -> AddArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            add: AddArgs,
        }
        let mut argv = vec![
            "x",
            "laptop",
            "--node",
            "east-worker",
            "--address",
            "10.10.250.1/32",
        ];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).add
    }

    fn accepted() -> Value {
        let mut peer = testdata("peer-laptop.json");
        peer["status"] = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Accepted",
            "message": "attached to node east-worker with 10.10.250.1/32",
            "lastTransitionTime": "2026-12-07T14:00:01Z"}]});
        peer
    }

    #[tokio::test]
    async fn add_creates_the_peer_waits_for_its_verdict_and_prints_the_machines_config() {
        let (client, server) = ordered(creating(accepted()));
        let machine = KeyPair::generate();
        let config = add(client, &add_args(&[]), &machine, &mut Vec::new())
            .await
            .unwrap();
        let seen = server.await.unwrap();
        let created = seen[3].body.as_ref().unwrap();
        assert_eq!(created["kind"], "Peer");
        assert_eq!(
            created["spec"]["publicKey"],
            machine.public_key().to_string()
        );
        assert_eq!(created["spec"]["allowedIPs"], json!(["10.10.250.1/32"]));
        assert_eq!(created["spec"]["nodes"], json!(["east-worker"]));
        assert!(
            !created.to_string().contains(&machine.private_key_base64()),
            "the private key never leaves the CLI's output"
        );
        let value = |key: &str| {
            config
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = ")))
                .unwrap()
                .to_string()
        };
        assert_eq!(value("PrivateKey"), machine.private_key_base64());
        assert_eq!(value("Address"), "10.10.250.1/32");
        assert_eq!(
            value("PublicKey"),
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
            "east-worker's gateway"
        );
        assert_eq!(value("Endpoint"), "172.18.0.3:51820");
        assert_eq!(
            value("AllowedIPs"),
            "10.10.0.0/16, 10.20.0.0/16, 10.96.0.0/16, 10.97.0.0/16"
        );
        assert_eq!(value("PersistentKeepalive"), "25");
    }

    #[tokio::test]
    async fn a_refused_peer_is_deleted_again_with_the_controllers_reason() {
        let mut refused = testdata("peer-laptop.json");
        refused["status"] = json!({"conditions": [{"type": "Ready", "status": "False", "reason": "Overlaps",
            "message": "allowedIPs: 10.10.1.0/24 overlaps pod CIDR 10.10.1.0/24 of node east-worker",
            "lastTransitionTime": "2026-12-07T14:00:01Z"}]});
        let mut script = creating(refused.clone());
        script.push(on("DELETE", &format!("{PEERS}/laptop"), ok(refused)));
        let (client, server) = ordered(script);
        let err = add(
            client,
            &add_args(&[]),
            &KeyPair::generate(),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("Overlaps") && text.contains("deleted again"),
            "{text}"
        );
        assert_eq!(server.await.unwrap().len(), 6);
    }

    #[tokio::test]
    async fn a_peer_not_accepted_in_time_is_deleted_again_and_the_timeout_named() {
        let mut waiting = testdata("peer-laptop.json");
        waiting["status"] = json!({"conditions": [{"type": "Ready", "status": "False", "reason": "NoGateway",
            "message": "none of the nodes east-worker runs a registered gateway",
            "lastTransitionTime": "2026-12-07T14:00:01Z"}]});
        let mut script = creating(waiting.clone());
        script.push(on("DELETE", &format!("{PEERS}/laptop"), ok(waiting)));
        let (client, server) = ordered(script);
        let err = add(
            client,
            &add_args(&["--timeout", "0s"]),
            &KeyPair::generate(),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("not accepted within 0ns")
                && text.contains("NoGateway")
                && text.contains("deleted again"),
            "{text}"
        );
        let seen = server.await.unwrap();
        assert_eq!(
            seen.last().map(|s| s.method.as_str()),
            Some("DELETE"),
            "a Peer whose private key is gone is not left behind"
        );
    }

    #[tokio::test]
    async fn add_changes_nothing_for_an_existing_peer_or_a_dry_run_or_a_node_without_a_gateway() {
        let status = testdata("controller-status.json");
        let (client, server) = ordered(vec![
            status_is(status.clone()),
            tls_secret_is(testdata("secret-trellis-tls.json")),
            peer_is(accepted()),
        ]);
        let err = add(
            client,
            &add_args(&[]),
            &KeyPair::generate(),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("exists; nothing changed"),
            "{err:#}"
        );
        assert_eq!(server.await.unwrap().len(), 3);

        let (client, server) = ordered(vec![
            status_is(status.clone()),
            tls_secret_is(testdata("secret-trellis-tls.json")),
        ]);
        let config = add(
            client,
            &add_args(&["--dry-run", "--endpoint", "203.0.113.7:51820"]),
            &KeyPair::generate(),
            &mut Vec::new(),
        )
        .await
        .unwrap();
        assert!(config.contains("Endpoint = 203.0.113.7:51820"), "{config}");
        assert!(
            server.await.unwrap().iter().all(|s| s.method == "GET"),
            "a dry run only reads"
        );

        let (client, server) = ordered(vec![status_is(status.clone())]);
        let mut args = add_args(&[]);
        args.node = vec!["east-control-plane".into()];
        let err = add(client, &args, &KeyPair::generate(), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("has a gateway registered"),
            "{err:#}"
        );
        assert_eq!(server.await.unwrap().len(), 1);
    }

    /// The cluster's TLS Secret as `trellis mesh enable` writes it: a certificate signing
    /// the pod range 10.10.0.0/16, the service range 10.96.0.0/16 and `peer_ranges`.
    fn enabled_secret(peer_ranges: &[&str]) -> Value {
        use trellis_controller::certs::{Validity, generate_ca, generate_cluster_cert_with_ranges};
        let ca = generate_ca("east", Validity::days_from_now(30)).unwrap();
        let peers: Vec<IpNet> = peer_ranges.iter().map(|n| n.parse().unwrap()).collect();
        let mut signed: Vec<IpNet> = vec![
            "10.10.0.0/16".parse().unwrap(),
            "10.96.0.0/16".parse().unwrap(),
        ];
        signed.extend(&peers);
        let leaf = generate_cluster_cert_with_ranges(
            &ca,
            &"east".parse().unwrap(),
            &signed,
            Validity::days_from_now(30),
        )
        .unwrap();
        let material = trellis_controller::tls::TlsMaterial {
            ca_pem: ca.cert_pem,
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        };
        let mut secret =
            serde_json::to_value(crate::mesh::tls_secret("trellis-system", &material, &peers))
                .unwrap();
        secret["apiVersion"] = json!("v1");
        secret["kind"] = json!("Secret");
        secret["metadata"]["resourceVersion"] = json!("1893");
        secret
    }

    #[tokio::test]
    async fn add_warns_when_the_address_lies_in_the_pod_range_not_a_peer_range() {
        let dry_run = |secret: Value, address: &'static str| async move {
            let (client, server) = ordered(vec![
                status_is(testdata("controller-status.json")),
                tls_secret_is(secret),
            ]);
            let mut notes = Vec::new();
            let mut args = add_args(&["--dry-run"]);
            args.address = vec![address.parse().unwrap()];
            add(client, &args, &KeyPair::generate(), &mut notes)
                .await
                .unwrap();
            server.await.unwrap();
            String::from_utf8(notes).unwrap()
        };
        // No peer range signed: 10.10.250.1 is in the pod range, a block node IPAM may give
        // to the next node.
        let notes = dry_run(enabled_secret(&[]), "10.10.250.1/32").await;
        assert!(
            notes.contains("warning: --address 10.10.250.1/32 lies in the ranges signed for the cluster's pods and services")
                && notes.contains("no range is signed for external machines")
                && notes.contains("trellis mesh enable --peer-cidr"),
            "{notes}"
        );
        // The same address with a peer range signed elsewhere: still warned, the range named.
        let notes = dry_run(enabled_secret(&["10.200.0.0/24"]), "10.10.250.1/32").await;
        assert!(
            notes.contains("the ranges for external machines are 10.200.0.0/24"),
            "{notes}"
        );
        // Inside the peer range: nothing to say.
        let notes = dry_run(enabled_secret(&["10.200.0.0/24"]), "10.200.0.7/32").await;
        assert!(!notes.contains("warning"), "{notes}");
        // No Secret readable: said, not guessed.
        let (client, server) = ordered(vec![
            status_is(testdata("controller-status.json")),
            on(
                "GET",
                TLS_SECRET_PATH,
                Reply::status(403, "Forbidden", "secrets \"trellis-tls\" is forbidden"),
            ),
        ]);
        let mut notes = Vec::new();
        add(
            client,
            &add_args(&["--dry-run"]),
            &KeyPair::generate(),
            &mut notes,
        )
        .await
        .unwrap();
        server.await.unwrap();
        let notes = String::from_utf8(notes).unwrap();
        assert!(
            notes.contains(
                "not checked whether --address lies in a range signed for external machines"
            ) && notes.contains("forbidden"),
            "{notes}"
        );
    }

    #[tokio::test]
    async fn add_names_the_controller_it_could_not_reach_as_status_does() {
        let (client, server) = ordered(vec![on(
            "GET",
            STATUS_PATH,
            Reply::status(
                503,
                "ServiceUnavailable",
                "no endpoints available for service \"trellis-controller\"",
            ),
        )]);
        let err = add(
            client,
            &add_args(&[]),
            &KeyPair::generate(),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains(
                "the controller's /status through Service trellis-system/trellis-controller"
            ) && text.contains("no endpoints available"),
            "{text}"
        );
        assert_eq!(server.await.unwrap().len(), 1, "nothing created");
    }

    #[tokio::test]
    async fn list_shows_each_peer_and_its_verdict_and_remove_is_idempotent() {
        let (client, server) = ordered(vec![on("GET", PEERS, ok(testdata("peers.json")))]);
        let rows = list(client).await.unwrap();
        server.await.unwrap();
        let text = render_list(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(
            lines[1].starts_with("laptop") && lines[1].ends_with("True"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("thief")
                && lines[2].contains("False (Overlaps: allowedIPs: 10.10.1.0/24"),
            "{text}"
        );

        let args = RemoveArgs {
            peer: "laptop".into(),
            cluster: ClusterArgs::default(),
            dry_run: false,
        };
        let (client, server) = ordered(vec![
            peer_is(accepted()),
            on("DELETE", &format!("{PEERS}/laptop"), ok(accepted())),
        ]);
        remove(client, &args).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 2);
        let (client, server) = ordered(vec![peer_missing()]);
        remove(client, &args).await.unwrap();
        assert_eq!(
            server.await.unwrap().len(),
            1,
            "nothing to remove, nothing deleted"
        );
    }
}
