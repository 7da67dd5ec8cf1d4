//! `trellis mesh enable`: one cluster made ready to join the mesh — its namespace, the mesh CA
//! (created here unless given or found), its certificate carrying the ranges it may claim, in
//! the Secret the chart mounts — and the `helm upgrade --install` it needs, printed or run.
//!
//! Re-run, it changes nothing that still serves: an existing CA is never replaced, and a
//! certificate from the same CA with the same identity and ranges, not about to expire, stays.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use trellis_controller::certs::{
    CA_CERT_FILE, CA_KEY_FILE, CertifiedKey, Validity, generate_ca,
    generate_cluster_cert_with_ranges,
};
use trellis_controller::tls::TlsMaterial;
use trellis_core::cluster::ClusterId;

use super::certificate::{self, CA_SECRET, TLS_SECRET, Verdict};
use super::helm::{Helm, InstallSettings, Target, install_args, shell_line};
use super::ranges::{self, Found};
use super::{FIELD_MANAGER, api_code, unix_now};

/// What to do with the helm install at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Print it for the user to run.
    Print,
    /// Run it.
    Install,
    /// Change nothing anywhere: say what would be done.
    DryRun,
}

/// Where the mesh CA comes from.
pub enum CaSource {
    /// This cluster's `trellis-mesh-ca` (in `--ca-namespace`), created when there is none (and
    /// no certificate to keep).
    Own,
    /// Another cluster's `trellis-mesh-ca` (in `--ca-namespace` there: `--ca-from-context`).
    Context { name: String, client: kube::Client },
    /// `ca.pem` and `ca-key.pem` in a directory (`trellis certs ca --dir`).
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct EnableOptions {
    pub target: Target,
    /// The namespace of the mesh CA's Secret, in this cluster and in `--ca-from-context`'s:
    /// not the release's, whose Secrets the controller may list.
    pub ca_namespace: String,
    pub cluster_id: Option<ClusterId>,
    pub pod_cidrs: Vec<IpNet>,
    pub service_cidrs: Vec<IpNet>,
    /// Ranges for external machines (`Peer` addresses), signed beside the pod and service
    /// ranges: `None` keeps those the current Secret records; `Some` replaces them (empty:
    /// none).
    pub peer_cidrs: Option<Vec<IpNet>>,
    pub finish: Finish,
    /// Days the certificate is valid.
    pub days: i64,
    /// The chart, values and `--set`s of the helm install.
    pub chart: PathBuf,
    pub value_files: Vec<PathBuf>,
    pub sets: Vec<String>,
    pub timeout: String,
    pub helm_program: String,
}

/// A cluster ID from a kubeconfig context name: lowercase, other characters as `-`.
pub fn cluster_id_from_context(context: &str) -> Option<ClusterId> {
    let mapped: String = context
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    trimmed.trim_end_matches('-').parse().ok()
}

/// The pod and service ranges of the cluster, checked against its nodes, and whether the
/// service ranges must be given to the chart (the cluster has no ServiceCIDR objects).
struct ClusterRanges {
    pods: Found,
    services: Found,
    services_for_chart: bool,
}

async fn cluster_ranges(
    client: &kube::Client,
    options: &EnableOptions,
) -> anyhow::Result<ClusterRanges> {
    let label = options.target.label();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing the nodes of {label}"))?
        .items;
    let node_cidrs = ranges::node_pod_cidrs(&nodes);
    let controller_manager: Vec<Pod> =
        if options.pod_cidrs.is_empty() || options.service_cidrs.is_empty() {
            let pods = Api::<Pod>::namespaced(client.clone(), "kube-system");
            let params = ListParams::default().labels(ranges::CONTROLLER_MANAGER_SELECTOR);
            match pods.list(&params).await {
                Ok(list) => list.items,
                // Managed clusters hide their control plane: other sources, or the user, say.
                Err(e) if matches!(api_code(&e), Some(403 | 404)) => Vec::new(),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("listing the kube-controller-manager pods of {label}")
                    });
                }
            }
        } else {
            Vec::new()
        };

    let pods = if !options.pod_cidrs.is_empty() {
        Found {
            nets: options.pod_cidrs.clone(),
            source: "--pod-cidr".into(),
        }
    } else if let Some(found) =
        ranges::from_controller_manager(&controller_manager, "--cluster-cidr")
    {
        found
    } else {
        let seen: Vec<IpNet> = node_cidrs.iter().map(|(_, c)| *c).collect();
        let offer = if seen.is_empty() {
            "its nodes have no pod CIDR yet".to_string()
        } else {
            format!(
                "its nodes have {}; a range covering them is {}",
                ranges::list(&seen),
                ranges::list(&ranges::covering(&seen))
            )
        };
        bail!(
            "cannot tell the pod range of {label} (no kube-controller-manager --cluster-cidr \
             visible): {offer}; pass --pod-cidr with the cluster's whole pod range"
        );
    };
    ranges::check_nodes_inside(&pods.nets, &node_cidrs)?;

    let (services, services_for_chart) = if !options.service_cidrs.is_empty() {
        let found = Found {
            nets: options.service_cidrs.clone(),
            source: "--service-cidr".into(),
        };
        (found, true)
    } else {
        let objects = match Api::<ServiceCIDR>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list.items,
            // Before Kubernetes 1.33 there is no such API; a user without cluster-wide
            // reads may not list it: other sources, or the user, say.
            Err(e) if matches!(api_code(&e), Some(403 | 404)) => Vec::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("listing the ServiceCIDRs of {label}"));
            }
        };
        if let Some(found) = ranges::from_service_cidrs(&objects) {
            (found, false)
        } else if let Some(found) =
            ranges::from_controller_manager(&controller_manager, "--service-cluster-ip-range")
        {
            (found, true)
        } else {
            bail!(
                "cannot tell the service range of {label} (no ServiceCIDR objects, no \
                 kube-controller-manager --service-cluster-ip-range visible): pass --service-cidr"
            );
        }
    };
    ranges::check_disjoint(&pods.nets, &services.nets)?;
    Ok(ClusterRanges {
        pods,
        services,
        services_for_chart,
    })
}

/// The CA `source` names, if any: `(CA, where it was found)`.
async fn given_ca(
    client: &kube::Client,
    source: &CaSource,
    namespace: &str,
) -> anyhow::Result<Option<(CertifiedKey, String)>> {
    let from_cluster = |client: kube::Client, label: String| async move {
        let secrets = Api::<Secret>::namespaced(client, namespace);
        let found = secrets
            .get_opt(CA_SECRET)
            .await
            .with_context(|| format!("reading Secret {namespace}/{CA_SECRET} in {label}"))?;
        let ca = match found {
            Some(secret) => Some((
                certificate::ca_from_secret(&secret)
                    .with_context(|| format!("the mesh CA in {label}"))?,
                format!("Secret {namespace}/{CA_SECRET} of {label}"),
            )),
            None => None,
        };
        anyhow::Ok(ca)
    };
    let ca = match source {
        CaSource::Own => from_cluster(client.clone(), "this cluster".into()).await?,
        CaSource::Context { name, client } => {
            let label = format!("context {name}");
            let Some(ca) = from_cluster(client.clone(), label.clone()).await? else {
                bail!(
                    "{label} holds no mesh CA (Secret {namespace}/{CA_SECRET}): name the context \
                     whose `trellis mesh enable` created it (a certificate's issuer, \"Trellis \
                     mesh CA <cluster>\", names that cluster)"
                );
            };
            Some(ca)
        }
        CaSource::Dir(dir) => {
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the mesh CA {}", path.display()))
            };
            let ca = CertifiedKey {
                cert_pem: read(CA_CERT_FILE)?,
                key_pem: read(CA_KEY_FILE)?,
            };
            Some((ca, format!("{}", dir.display())))
        }
    };
    if let Some((ca, origin)) = &ca {
        certificate::check_ca(ca).with_context(|| format!("the mesh CA in {origin}"))?;
    }
    Ok(ca)
}

/// Prepares the cluster `client` reaches and finishes with its helm install (see the module).
pub async fn enable(
    client: &kube::Client,
    ca_source: CaSource,
    options: &EnableOptions,
    helm: &dyn Helm,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let label = options.target.label();
    let ns = options.target.namespace.as_str();
    let dry = options.finish == Finish::DryRun;
    if options.ca_namespace == ns {
        bail!(
            "--ca-namespace {ns} is Trellis's namespace, whose Secrets the controller reads: the \
             mesh CA's key would be readable by every controller's ServiceAccount; keep it in \
             another namespace (default kube-system)"
        );
    }
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);

    let secret_there = secrets
        .get_opt(TLS_SECRET)
        .await
        .with_context(|| format!("reading Secret {ns}/{TLS_SECRET} in {label}"))?;
    let (existing, unusable): (Option<TlsMaterial>, Option<String>) =
        match secret_there.as_ref().map(certificate::tls_from_secret) {
            Some(Ok(material)) => (Some(material), None),
            Some(Err(e)) => (None, Some(format!("the Secret there is unusable: {e:#}"))),
            None => (None, None),
        };
    let existing_id = existing
        .as_ref()
        .and_then(|m| certificate::read_leaf(&m.cert_pem).ok())
        .map(|leaf| leaf.id);
    let id = match (&options.cluster_id, existing_id) {
        (Some(given), Some(current)) if *given != current => bail!(
            "{label} is already cluster {current} (its certificate in Secret {ns}/{TLS_SECRET}): \
             a cluster's ID cannot change under its peers; pass --cluster-id {current}, or \
             delete that Secret (and disconnect its peers) to start over"
        ),
        (Some(given), _) => given.clone(),
        (None, Some(current)) => current,
        (None, None) => match options
            .target
            .context
            .as_deref()
            .and_then(cluster_id_from_context)
        {
            Some(id) => id,
            None => bail!("pass --cluster-id: there is no context name to take it from"),
        },
    };
    writeln!(out, "{label}: cluster {id}")?;

    let namespaces = Api::<Namespace>::all(client.clone());
    let have_namespace = namespaces
        .get_opt(ns)
        .await
        .with_context(|| format!("reading namespace {ns} in {label}"))?
        .is_some();
    if have_namespace {
        writeln!(out, "  namespace {ns}: exists")?;
    } else if dry {
        writeln!(out, "  namespace {ns}: would be created")?;
    } else {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.to_string()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match namespaces.create(&PostParams::default(), &namespace).await {
            Ok(_) => writeln!(out, "  namespace {ns}: created")?,
            // Created meanwhile (helm, or another run): what we wanted.
            Err(e) if api_code(&e) == Some(409) => writeln!(out, "  namespace {ns}: exists")?,
            Err(e) => {
                return Err(e).with_context(|| format!("creating namespace {ns} in {label}"));
            }
        }
    }

    let ranges = cluster_ranges(client, options).await?;
    writeln!(out, "  pod ranges: {}", ranges.pods)?;
    writeln!(out, "  service ranges: {}", ranges.services)?;
    let peers = match &options.peer_cidrs {
        Some(given) if given.is_empty() => Found {
            nets: Vec::new(),
            source: "--no-peer-cidrs".into(),
        },
        Some(given) => Found {
            nets: given.clone(),
            source: "--peer-cidr".into(),
        },
        None => Found {
            nets: match &secret_there {
                Some(secret) => certificate::recorded_peer_ranges(secret).with_context(|| {
                    format!(
                        "Secret {ns}/{TLS_SECRET} of {label}: pass --peer-cidr (or \
                         --no-peer-cidrs) to say which ranges are for external machines"
                    )
                })?,
                None => Vec::new(),
            },
            source: format!("recorded in Secret {ns}/{TLS_SECRET}"),
        },
    };
    ranges::check_peer_ranges(&peers.nets, &ranges.pods.nets, &ranges.services.nets)?;
    if !peers.nets.is_empty() {
        writeln!(out, "  peer ranges: {peers}")?;
    }
    let claim: Vec<IpNet> = ranges
        .pods
        .nets
        .iter()
        .chain(&ranges.services.nets)
        .chain(&peers.nets)
        .copied()
        .collect();

    let ca_ns = options.ca_namespace.as_str();
    let ca = given_ca(client, &ca_source, ca_ns).await?;
    // The cluster's own CA never overrides the one its certificate is from: after joining
    // another cluster's mesh it would cut this cluster off from it.
    let explicit = !matches!(ca_source, CaSource::Own);
    let now = unix_now();
    let verdict = match &existing {
        Some(material) => certificate::judge(
            material,
            ca.as_ref()
                .filter(|_| explicit)
                .map(|(ca, _)| ca.cert_pem.as_str()),
            &id,
            &claim,
            now,
        ),
        None => Verdict::Reissue(unusable.unwrap_or_else(|| "there is none yet".into())),
    };
    let identity = trellis_controller::certs::identity_name(&id);
    match verdict {
        Verdict::Keep(leaf) => {
            let ca_name = existing
                .as_ref()
                .map(|m| certificate::subject_name(&m.ca_pem))
                .unwrap_or_default();
            writeln!(
                out,
                "  certificate {identity}: kept (from {ca_name:?}, valid until {}) in Secret \
                 {ns}/{TLS_SECRET}",
                certificate::date(leaf.not_after)
            )?;
        }
        Verdict::Reissue(reason) => {
            // The mesh CA the Secret there names, read on its own: a Secret unusable for
            // another reason (a lost key, a broken certificate) still says which mesh this
            // cluster is in, and a new CA would cut it off from its peers.
            let current_ca = secret_there
                .as_ref()
                .and_then(certificate::ca_of_tls_secret);
            let current_ca = current_ca.as_deref();
            let ca = match (ca, current_ca) {
                (Some(ca), _) if explicit => ca,
                (Some(own), None) => own,
                (Some(own), Some(current)) if certificate::same_ca(&own.0.cert_pem, current) => own,
                (_, Some(current)) => bail!(
                    "the certificate in Secret {ns}/{TLS_SECRET} of {label} must be reissued \
                     ({reason}), but its mesh CA ({:?}) is not in this cluster: pass \
                     --ca-from-context with the context of the cluster that holds it, or --ca-dir",
                    certificate::subject_name(current)
                ),
                (None, None) => {
                    let ca_secrets = Api::<Secret>::namespaced(client.clone(), ca_ns);
                    create_ca(&ca_secrets, &id, &label, ca_ns, dry, out).await?
                }
            };
            let (ca, origin) = &ca;
            if dry {
                writeln!(
                    out,
                    "  certificate {identity}: would be issued by {:?} ({reason}) into Secret \
                     {ns}/{TLS_SECRET}",
                    certificate::subject_name(&ca.cert_pem)
                )?;
            } else {
                let leaf = generate_cluster_cert_with_ranges(
                    ca,
                    &id,
                    &claim,
                    Validity::days_from_now(options.days),
                )
                .map_err(anyhow::Error::from)?;
                let material = TlsMaterial {
                    ca_pem: ca.cert_pem.clone(),
                    cert_pem: leaf.cert_pem,
                    key_pem: leaf.key_pem,
                };
                let secret = certificate::tls_secret(ns, &material, &peers.nets);
                secrets
                    .patch(
                        TLS_SECRET,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&secret),
                    )
                    .await
                    .with_context(|| format!("writing Secret {ns}/{TLS_SECRET} in {label}"))?;
                let until = certificate::read_leaf(&material.cert_pem)?.not_after;
                writeln!(
                    out,
                    "  certificate {identity}: issued by {:?} from {origin} ({reason}), valid \
                     until {}, in Secret {ns}/{TLS_SECRET}",
                    certificate::subject_name(&ca.cert_pem),
                    certificate::date(until)
                )?;
            }
        }
    }

    let settings = InstallSettings {
        chart: options.chart.clone(),
        cluster_id: id.to_string(),
        service_cidrs: if ranges.services_for_chart {
            ranges.services.nets.iter().map(IpNet::to_string).collect()
        } else {
            Vec::new()
        },
        value_files: options.value_files.clone(),
        sets: options.sets.clone(),
        timeout: options.timeout.clone(),
    };
    let args = install_args(&options.target, &settings);
    let line = shell_line(&options.helm_program, &args);
    match options.finish {
        Finish::DryRun => writeln!(out, "would run: {line}")?,
        Finish::Print => {
            writeln!(
                out,
                "install or upgrade Trellis with (or re-run with --install):"
            )?;
            writeln!(out, "{line}")?;
        }
        Finish::Install => {
            writeln!(out, "$ {line}")?;
            out.flush()?;
            helm.change(&args)?;
        }
    }
    Ok(())
}

/// Creates the mesh CA in this cluster's `trellis-mesh-ca` (in `ns`, `--ca-namespace`); if
/// another run created one meanwhile, that one is used (a CA is never replaced).
async fn create_ca(
    secrets: &Api<Secret>,
    id: &ClusterId,
    label: &str,
    ns: &str,
    dry: bool,
    out: &mut dyn Write,
) -> anyhow::Result<(CertifiedKey, String)> {
    let origin = format!("Secret {ns}/{CA_SECRET} of this cluster");
    let ca =
        generate_ca(id.as_str(), Validity::days_from_now(3650)).map_err(anyhow::Error::from)?;
    let name = certificate::subject_name(&ca.cert_pem);
    if dry {
        writeln!(
            out,
            "  mesh CA: {name:?} would be created in Secret {ns}/{CA_SECRET}"
        )?;
        return Ok((ca, origin));
    }
    match secrets
        .create(&PostParams::default(), &certificate::ca_secret(ns, &ca))
        .await
    {
        Ok(_) => {
            writeln!(
                out,
                "  mesh CA: {name:?} created in Secret {ns}/{CA_SECRET} (back up its key; other \
                 clusters join with --ca-from-context {})",
                label.strip_prefix("context ").unwrap_or("<this context>")
            )?;
            Ok((ca, origin))
        }
        Err(e) if api_code(&e) == Some(409) => {
            let secret = secrets
                .get(CA_SECRET)
                .await
                .with_context(|| format!("reading Secret {ns}/{CA_SECRET} in {label}"))?;
            let ca = certificate::ca_from_secret(&secret)?;
            writeln!(
                out,
                "  mesh CA: {:?}, created meanwhile in Secret {ns}/{CA_SECRET}",
                certificate::subject_name(&ca.cert_pem)
            )?;
            Ok((ca, origin))
        }
        Err(e) => Err(e).with_context(|| format!("creating Secret {ns}/{CA_SECRET} in {label}")),
    }
}
