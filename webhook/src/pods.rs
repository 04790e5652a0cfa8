//! Every container of a pod spec, whatever list it sits in.
//!
//! Admission checks iterate [`containers`] rather than `spec.containers`, so init and ephemeral
//! containers (the `kubectl debug` path that other admission tools have missed) are always
//! checked too.

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, PodSpec};

/// Which list of the pod spec a container came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContainerKind {
    /// `spec.initContainers`
    Init,
    /// `spec.containers`
    Regular,
    /// `spec.ephemeralContainers`
    Ephemeral,
}

impl ContainerKind {
    /// The field of the pod spec, for messages: `initContainers`, `containers`,
    /// `ephemeralContainers`.
    pub fn field(self) -> &'static str {
        match self {
            ContainerKind::Init => "initContainers",
            ContainerKind::Regular => "containers",
            ContainerKind::Ephemeral => "ephemeralContainers",
        }
    }
}

/// The parts of a container that admission checks look at.
#[derive(Clone, Copy, Debug)]
pub struct ContainerView<'a> {
    /// Which list it came from.
    pub kind: ContainerKind,
    /// Its position in that list.
    pub index: usize,
    /// Container name.
    pub name: &'a str,
    /// Image reference as written.
    pub image: Option<&'a str>,
    /// Environment variables.
    pub env: &'a [EnvVar],
    /// Environment sources.
    pub env_from: &'a [EnvFromSource],
}

impl ContainerView<'_> {
    /// The JSON path of the container in the pod spec, e.g. `spec.initContainers[0]`.
    pub fn path(&self) -> String {
        format!("spec.{}[{}]", self.kind.field(), self.index)
    }
}

/// Builds a view of a `Container` or an `EphemeralContainer` (distinct types, same fields).
macro_rules! view {
    ($kind:expr, $index:expr, $c:expr) => {
        ContainerView {
            kind: $kind,
            index: $index,
            name: &$c.name,
            image: $c.image.as_deref(),
            env: $c.env.as_deref().unwrap_or_default(),
            env_from: $c.env_from.as_deref().unwrap_or_default(),
        }
    };
}

/// Names of the `imagePullSecrets` of `spec`.
pub fn pull_secrets(spec: &PodSpec) -> Vec<String> {
    spec.image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The ServiceAccount a pod runs as (`default` when it names none).
pub fn service_account(spec: &PodSpec) -> String {
    spec.service_account_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// One place in a pod spec that names an image: a container of any list, or an image volume
/// (`volumes[].image.reference`, which the kubelet pulls like a container image).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUse<'a> {
    /// The reference as written.
    pub image: &'a str,
    /// Who uses it, for messages: `containers "app"`, `volumes "data"`.
    pub user: String,
    /// JSON pointer of the field within the pod spec (`/containers/0/image`).
    pub pointer: String,
}

/// Every image `spec` names: each container's (init, regular, ephemeral) and each image
/// volume's.
pub fn image_uses(spec: &PodSpec) -> Vec<ImageUse<'_>> {
    let mut out: Vec<ImageUse<'_>> = containers(spec)
        .filter_map(|c| {
            c.image.map(|image| ImageUse {
                image,
                user: format!("{} {:?}", c.kind.field(), c.name),
                pointer: format!("/{}/{}/image", c.kind.field(), c.index),
            })
        })
        .collect();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if let Some(image) = v.image.as_ref().and_then(|s| s.reference.as_deref()) {
            out.push(ImageUse {
                image,
                user: format!("volumes {:?}", v.name),
                pointer: format!("/volumes/{i}/image/reference"),
            });
        }
    }
    out
}

/// The image uses of `spec` that `old` (the pod spec an update replaces) did not have: a use is
/// unchanged only where the same field held the same reference (the same string elsewhere in
/// the old pod is no verdict for this field). Without `old`, every use.
pub fn new_image_uses<'a>(spec: &'a PodSpec, old: Option<&PodSpec>) -> Vec<ImageUse<'a>> {
    let before: std::collections::BTreeSet<(String, String)> = old
        .map(|o| {
            image_uses(o)
                .into_iter()
                .map(|u| (u.pointer, u.image.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    image_uses(spec)
        .into_iter()
        .filter(|u| !before.contains(&(u.pointer.clone(), u.image.to_owned())))
        .collect()
}

/// Every container of `spec`: init containers, then containers, then ephemeral containers.
pub fn containers(spec: &PodSpec) -> impl Iterator<Item = ContainerView<'_>> {
    let init = (spec.init_containers.iter().flatten().enumerate())
        .map(|(i, c)| view!(ContainerKind::Init, i, c));
    let regular =
        (spec.containers.iter().enumerate()).map(|(i, c)| view!(ContainerKind::Regular, i, c));
    let ephemeral = (spec.ephemeral_containers.iter().flatten().enumerate())
        .map(|(i, c)| view!(ContainerKind::Ephemeral, i, c));
    init.chain(regular).chain(ephemeral)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_lists_are_visited_in_order() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "initContainers": [{"name": "migrate", "image": "r/m:1"}],
            "containers": [{"name": "app", "image": "r/a:1"}, {"name": "proxy", "image": "r/p:1"}],
            "ephemeralContainers": [{"name": "debug", "image": "busybox",
                                      "env": [{"name": "X", "value": "y"}]}]
        }))
        .expect("pod spec");
        let seen: Vec<(String, Option<&str>, usize)> = containers(&spec)
            .map(|c| (c.path(), c.image, c.env.len()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("spec.initContainers[0]".to_owned(), Some("r/m:1"), 0),
                ("spec.containers[0]".to_owned(), Some("r/a:1"), 0),
                ("spec.containers[1]".to_owned(), Some("r/p:1"), 0),
                ("spec.ephemeralContainers[0]".to_owned(), Some("busybox"), 1),
            ]
        );
    }
}
