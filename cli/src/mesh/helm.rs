//! Helm, behind a seam: the mesh commands read a release's values and upgrade it by running the
//! `helm` the user has, printing every command that changes something. Tests replace [`Helm`]
//! with a recorder and assert the exact commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The Helm release of Trellis in every cluster (the chart's resource names derive from it).
pub const RELEASE: &str = "trellis";

/// What running `helm` gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelmOutput {
    /// It exited 0: its standard output.
    Success(String),
    /// It exited non-zero: its standard error.
    Failure(String),
}

/// Runs helm. `read` is for commands whose output we parse; `change` for the commands the user
/// watches (their output goes to the terminal).
pub trait Helm {
    /// `helm args`, captured; an error only when helm could not be run at all.
    fn read(&self, args: &[String]) -> anyhow::Result<HelmOutput>;
    /// `helm args` with the terminal as its output; an error when it fails.
    fn change(&self, args: &[String]) -> anyhow::Result<()>;
}

/// The `helm` binary on this machine.
#[derive(Debug, Clone)]
pub struct HelmBinary {
    pub program: PathBuf,
}

impl HelmBinary {
    fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new(&self.program);
        command.args(args).stdin(Stdio::null());
        command
    }

    fn not_started(&self) -> String {
        format!(
            "running {} (install helm v3.14 or later, or pass --helm PATH)",
            self.program.display()
        )
    }
}

impl Helm for HelmBinary {
    fn read(&self, args: &[String]) -> anyhow::Result<HelmOutput> {
        let output = self
            .command(args)
            .output()
            .with_context(|| self.not_started())?;
        Ok(if output.status.success() {
            HelmOutput::Success(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            HelmOutput::Failure(String::from_utf8_lossy(&output.stderr).trim().to_string())
        })
    }

    fn change(&self, args: &[String]) -> anyhow::Result<()> {
        let status = self
            .command(args)
            .status()
            .with_context(|| self.not_started())?;
        if !status.success() {
            bail!("helm failed ({status}): see its output above");
        }
        Ok(())
    }
}

/// Where a release lives: its kubeconfig context (the current one when `None`) and namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub context: Option<String>,
    pub namespace: String,
}

impl Target {
    /// helm's flags selecting the cluster and namespace.
    fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(context) = &self.context {
            flags.extend(["--kube-context".to_string(), context.clone()]);
        }
        flags.extend(["--namespace".to_string(), self.namespace.clone()]);
        flags
    }

    /// How messages name the cluster.
    pub fn label(&self) -> String {
        match &self.context {
            Some(context) => format!("context {context}"),
            None => "the current context".to_string(),
        }
    }
}

/// `helm get values trellis -o json`: the values the user gave the release.
pub fn get_values_args(target: &Target) -> Vec<String> {
    let mut args: Vec<String> = ["get", "values", RELEASE].map(String::from).into();
    args.extend(target.flags());
    args.extend(["--output".to_string(), "json".to_string()]);
    args
}

/// The user-supplied values of the release (`{}` when it has none), or `None` when it is not
/// installed.
pub fn release_values(helm: &dyn Helm, target: &Target) -> anyhow::Result<Option<Value>> {
    match helm.read(&get_values_args(target))? {
        HelmOutput::Success(stdout) => {
            let values: Value = serde_json::from_str(stdout.trim()).with_context(|| {
                format!(
                    "reading the values of release {RELEASE} in {} (`helm get values`)",
                    target.label()
                )
            })?;
            // A release installed without values has `null` ones.
            Ok(Some(if values.is_null() {
                Value::Object(Default::default())
            } else {
                values
            }))
        }
        HelmOutput::Failure(stderr) if stderr.contains("not found") => Ok(None),
        HelmOutput::Failure(stderr) => bail!(
            "`helm get values {RELEASE}` in {} failed: {stderr}",
            target.label()
        ),
    }
}

/// `helm upgrade trellis CHART --reuse-values --set-json peers=[...]`: the release's peer list
/// replaced, every other value kept.
pub fn upgrade_peers_args(target: &Target, chart: &Path, peers: &[Value]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "upgrade".into(),
        RELEASE.into(),
        chart.display().to_string(),
    ];
    args.extend(target.flags());
    args.push("--reuse-values".into());
    args.push("--set-json".into());
    args.push(format!("peers={}", Value::Array(peers.to_vec())));
    args
}

/// What `trellis mesh enable` gives the chart besides the user's own values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallSettings {
    pub chart: PathBuf,
    pub cluster_id: String,
    /// `cluster.serviceCIDRs`: only for clusters without ServiceCIDR objects, which the
    /// controller would otherwise read.
    pub service_cidrs: Vec<String>,
    pub value_files: Vec<PathBuf>,
    pub sets: Vec<String>,
    /// helm's `--timeout` for `--wait`.
    pub timeout: String,
}

/// `helm upgrade --install`: installs the release, or upgrades it keeping the values it was
/// given before (its peers among them) under the chart's current defaults
/// (`--reset-then-reuse-values`, helm 3.14+), then the values given here on top.
pub fn install_args(target: &Target, settings: &InstallSettings) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "upgrade".into(),
        "--install".into(),
        RELEASE.into(),
        settings.chart.display().to_string(),
    ];
    args.extend(target.flags());
    args.push("--reset-then-reuse-values".into());
    args.extend([
        "--set".into(),
        format!("cluster.id={}", settings.cluster_id),
    ]);
    if !settings.service_cidrs.is_empty() {
        args.extend([
            "--set-json".into(),
            format!(
                "cluster.serviceCIDRs={}",
                Value::from(settings.service_cidrs.clone())
            ),
        ]);
    }
    for file in &settings.value_files {
        args.extend(["--values".into(), file.display().to_string()]);
    }
    for set in &settings.sets {
        args.extend(["--set".into(), set.clone()]);
    }
    args.extend([
        "--wait".into(),
        "--timeout".into(),
        settings.timeout.clone(),
    ]);
    args
}

/// A command line as a POSIX shell reads it back: arguments quoted where they need it.
pub fn shell_line(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_string())
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            context: Some("kind-trellis-c1".into()),
            namespace: "trellis-system".into(),
        }
    }

    #[test]
    fn command_lines_quote_only_what_the_shell_would_split() {
        let args: Vec<String> = [
            "--set-json",
            r#"peers=[{"id":"c2"}]"#,
            "--set",
            "a=it's",
            "",
            "x=1",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            shell_line("helm", &args),
            r#"helm --set-json 'peers=[{"id":"c2"}]' --set 'a=it'\''s' '' x=1"#
        );
    }

    #[test]
    fn the_install_command_keeps_earlier_values_and_waits() {
        let settings = InstallSettings {
            chart: "helm/trellis".into(),
            cluster_id: "c1".into(),
            service_cidrs: vec!["10.111.0.0/16".into()],
            value_files: vec!["kind.yaml".into()],
            sets: vec!["image.tag=dev".into()],
            timeout: "5m".into(),
        };
        assert_eq!(
            shell_line("helm", &install_args(&target(), &settings)),
            "helm upgrade --install trellis helm/trellis --kube-context kind-trellis-c1 \
             --namespace trellis-system --reset-then-reuse-values --set cluster.id=c1 \
             --set-json 'cluster.serviceCIDRs=[\"10.111.0.0/16\"]' --values kind.yaml \
             --set image.tag=dev --wait --timeout 5m"
        );
        let current = Target {
            context: None,
            namespace: "mesh".into(),
        };
        let args = get_values_args(&current);
        assert_eq!(
            shell_line("helm", &args),
            "helm get values trellis --namespace mesh --output json"
        );
    }

    /// The real runner against a stand-in `helm` script: output captured or shown, failures
    /// told apart, a missing binary named.
    #[test]
    fn the_helm_binary_is_run_and_its_failures_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("helm");
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$*\" in\n  *broken*) echo 'Error: cluster unreachable' >&2; exit 1 ;;\n  get*) echo '{\"peers\":[]}' ;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let helm = HelmBinary { program: script };
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            helm.read(&args("get values trellis")).unwrap(),
            HelmOutput::Success("{\"peers\":[]}\n".into())
        );
        assert_eq!(
            helm.read(&args("get values broken")).unwrap(),
            HelmOutput::Failure("Error: cluster unreachable".into())
        );
        helm.change(&args("upgrade trellis")).unwrap();
        assert!(helm.change(&args("upgrade broken")).is_err());
        let missing = HelmBinary {
            program: dir.path().join("no-helm"),
        };
        let err = format!("{:#}", missing.read(&args("get values")).unwrap_err());
        assert!(err.contains("--helm PATH"), "{err}");
    }

    struct Canned(HelmOutput);
    impl Helm for Canned {
        fn read(&self, _: &[String]) -> anyhow::Result<HelmOutput> {
            Ok(self.0.clone())
        }
        fn change(&self, _: &[String]) -> anyhow::Result<()> {
            unreachable!("reads only")
        }
    }

    #[test]
    fn release_values_tell_a_missing_release_from_a_failure() {
        let values = |out| release_values(&Canned(out), &target());
        assert_eq!(
            values(HelmOutput::Success("null\n".into())).unwrap(),
            Some(serde_json::json!({}))
        );
        assert_eq!(
            values(HelmOutput::Success(r#"{"cluster":{"id":"c1"}}"#.into())).unwrap(),
            Some(serde_json::json!({"cluster": {"id": "c1"}}))
        );
        assert_eq!(
            values(HelmOutput::Failure("Error: release: not found".into())).unwrap(),
            None
        );
        let err = values(HelmOutput::Failure(
            "Error: Kubernetes cluster unreachable".into(),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unreachable") && err.contains("kind-trellis-c1"),
            "{err}"
        );
    }
}
