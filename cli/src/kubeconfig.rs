//! The Kubernetes client of the commands that act on a cluster from a user's machine
//! (`trellis mesh`, `status --context`, `diagnose`, `sysdump`, `peer add`): the user's kubeconfig,
//! as kubectl reads it (`KUBECONFIG`, else `~/.kube/config`), at the context they name.
//!
//! Commands take a `kube::Client`, so their tests hand them one whose API server answers with
//! scripted responses (see `test_api` in the tests of this module's users).

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// A client for `context` of the user's kubeconfig (its current context when `None`).
pub async fn client(context: Option<&str>) -> anyhow::Result<kube::Client> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let kubeconfig =
        Kubeconfig::read().context("reading the kubeconfig (KUBECONFIG or ~/.kube/config)")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| match context {
            Some(name) => format!("using context {name:?} of the kubeconfig"),
            None => "using the kubeconfig's current context".to_string(),
        })?;
    kube::Client::try_from(config).context("building the Kubernetes client")
}
