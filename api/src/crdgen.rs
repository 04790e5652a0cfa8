//! Renders the CustomResourceDefinitions of the four kinds as the YAML committed in `crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{AuthPolicy, ImagePolicy, RateLimitPolicy, SecretBinding};

/// The command that regenerates `crds/`, named in the drift test's failure message.
pub const REGENERATE: &str = "cargo run -p palisade-api --bin crdgen -- crds";

/// Every CRD with the file name it is committed under.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("authpolicies.palisade.dev.yaml", AuthPolicy::crd()),
        (
            "ratelimitpolicies.palisade.dev.yaml",
            RateLimitPolicy::crd(),
        ),
        ("secretbindings.palisade.dev.yaml", SecretBinding::crd()),
        ("imagepolicies.palisade.dev.yaml", ImagePolicy::crd()),
    ]
}

/// One CRD as YAML, with a header saying it is generated.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated from palisade-api; do not edit. Regenerate with: {REGENERATE}\n{body}"
    ))
}
