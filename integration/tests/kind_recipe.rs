//! The kind recipe (`integration/kind/kind-mesh.sh`) as far as it can run here, with no Docker:
//! its dry run prints the commands `up` would run — clusters, image, `trellis mesh enable`
//! twice (the second inheriting the first's CA), `trellis mesh connect`, `trellis status
//! --wait` — in that order, and every `trellis mesh` command it prints is one the real CLI
//! accepts. (`shellcheck` checks the script in `helm.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use trellis_integration::bin_path;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The recipe with `args`, its settings left at their defaults.
fn recipe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(root().join("integration/kind/kind-mesh.sh"))
        .args(args)
        .current_dir(root());
    for name in [
        "TRELLIS",
        "HELM",
        "TRELLIS_IMAGE",
        "TRELLIS_KIND_PREFIX",
        "KIND_NODE_IMAGE",
        "TRELLIS_SKIP_BUILD",
        "TRELLIS_KIND_DRY_RUN",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

/// The commands a dry run printed (`+ ...` lines), without the `+ `.
fn commands(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "the dry run failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("+ "))
        .map(str::to_string)
        .collect()
}

const ENABLE_FLAGS: &str = "--install --helm helm --set image.repository=trellis \
     --set image.tag=dev --set image.pullPolicy=Never --set peering.service.nodePort=30743";

#[test]
fn the_dry_run_of_up_prints_mesh_enable_connect_and_status_in_order() {
    let printed = commands(&recipe(&["up", "--dry-run"], &[]));
    let expected = [
        "kind create cluster --name trellis-c1 --config target/kind/c1.kind.yaml".to_string(),
        "kind create cluster --name trellis-c2 --config target/kind/c2.kind.yaml".to_string(),
        "docker build -t trellis:dev .".to_string(),
        "kind load docker-image trellis:dev --name trellis-c1".to_string(),
        "kind load docker-image trellis:dev --name trellis-c2".to_string(),
        "cargo build --release -p trellis --bin trellis".to_string(),
        format!(
            "target/release/trellis mesh enable --context kind-trellis-c1 --cluster-id c1 {ENABLE_FLAGS}"
        ),
        format!(
            "target/release/trellis mesh enable --context kind-trellis-c2 --cluster-id c2 {ENABLE_FLAGS} --ca-from-context kind-trellis-c1"
        ),
        "target/release/trellis mesh connect --context kind-trellis-c1 --destination-context kind-trellis-c2 --helm helm".to_string(),
        "target/release/trellis status --context kind-trellis-c1 --wait --timeout 5m".to_string(),
        "target/release/trellis status --context kind-trellis-c2 --wait --timeout 5m".to_string(),
    ];
    // In this order, other commands between them.
    let mut at = 0;
    for want in &expected {
        match printed[at..].iter().position(|c| c == want) {
            Some(offset) => at += offset + 1,
            None => panic!("{want:?} is not printed after line {at} of:\n{printed:#?}"),
        }
    }
    // The certificates and peers are no longer made by hand.
    assert!(
        !printed
            .iter()
            .any(|c| c.contains("certs ca") || c.contains("create secret") || c.contains("peers[")),
        "{printed:#?}"
    );
    // The clusters' nodes get rp_filter off before Trellis is installed.
    let rp_filter = printed
        .iter()
        .position(|c| c.starts_with("docker exec trellis-c1-worker sysctl"))
        .expect("rp_filter off on c1's worker");
    assert!(
        rp_filter
            < printed
                .iter()
                .position(|c| c.contains("mesh enable"))
                .unwrap()
    );
}

#[test]
fn the_dry_run_follows_the_settings_and_the_environment_switch() {
    let printed = commands(&recipe(
        &["up"],
        &[
            ("TRELLIS_KIND_DRY_RUN", "1"),
            ("TRELLIS", "/opt/trellis"),
            ("HELM", "helm4"),
            ("TRELLIS_KIND_PREFIX", "t"),
            ("TRELLIS_SKIP_BUILD", "1"),
        ],
    ));
    assert!(
        !printed
            .iter()
            .any(|c| c.starts_with("cargo ") || c.starts_with("docker build"))
    );
    assert!(
        printed.iter().any(|c| c
            == "/opt/trellis mesh connect --context kind-t-c1 --destination-context kind-t-c2 --helm helm4"),
        "{printed:#?}"
    );
    let down = commands(&recipe(&["down", "--dry-run"], &[]));
    assert_eq!(
        down,
        [
            "kind delete cluster --name trellis-c1",
            "kind delete cluster --name trellis-c2"
        ]
    );
    let bad = recipe(&["sideways", "--dry-run"], &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage:"));
}

/// Every `trellis mesh` command of the recipe parses with the real CLI: with no kubeconfig it
/// gets as far as reading one (exit 1), where a flag the CLI does not know would stop clap
/// (exit 2).
#[test]
fn the_recipe_s_mesh_commands_are_ones_the_cli_accepts() {
    let printed = commands(&recipe(&["up", "--dry-run"], &[]));
    let mesh: Vec<&String> = printed
        .iter()
        .filter(|c| c.starts_with("target/release/trellis mesh "))
        .collect();
    assert_eq!(mesh.len(), 3, "{printed:#?}");
    let kubeconfig = tempfile::tempdir().unwrap();
    for line in mesh {
        let args: Vec<&str> = line.split(' ').skip(1).collect();
        let out = Command::new(bin_path("trellis"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig.path().join("missing"))
            .env("HOME", kubeconfig.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{line}: {stderr}");
        assert!(stderr.contains("kubeconfig"), "{line}: {stderr}");
    }
}
