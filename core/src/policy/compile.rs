//! The compiler: a node's [`Ruleset`] from the mesh's [`PolicyInputs`].

use super::model::PolicyInputs;
use super::ruleset::Ruleset;

/// The ruleset `node` enforces for its pods.
pub fn compile(inputs: &PolicyInputs, node: &str) -> Ruleset {
    let mut ruleset = Ruleset::default();
    for endpoint in inputs.local_endpoints(node) {
        ruleset
            .local_pods
            .extend(endpoint.addresses.iter().copied());
    }
    ruleset
}
