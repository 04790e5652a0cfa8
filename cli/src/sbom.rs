//! `palisade sbom`: for every workload running in the cluster (or one namespace), the components
//! of its images from their verified CycloneDX SBOM attestations, and which workloads contain a
//! package in a version range or are affected by an advisory. An image whose SBOM is missing or
//! does not verify with the given keys is reported as unknown, never left out: "not affected"
//! is said only of images whose verified SBOM shows it.
//!
//! The cluster part (which images run where) and the registry part (fetching and verifying the
//! attestations, with the webhook's own registry client and DSSE verification) are I/O; the
//! query over the SBOMs is [`answer`], pure.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{Api, Client, api::ListParams};
use oci_client::secrets::RegistryAuth;
use palisade_webhook::images::{
    registry::{Budget, Registry},
    verify::{Signer, verify_attestations},
};
use serde::Serialize;
use serde_json::Value;

use crate::advisories::Database;

/// The predicate type of a CycloneDX SBOM attestation (`cosign attest --type cyclonedx`).
pub const CYCLONEDX: &str = "https://cyclonedx.org/bom";

/// A workload and the images its pods run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `Deployment shop/orders` (a pod's top controller, or the pod itself).
    pub name: String,
    /// Image references, as the pods name them (digest-pinned where the kubelet reported the
    /// digest it runs).
    pub images: Vec<String>,
}

/// What is known about one image's contents.
#[derive(Clone, Debug)]
pub enum Contents {
    /// The components of its verified SBOM(s): (name, version).
    Verified {
        /// The digest the SBOM is about.
        digest: String,
        /// Components.
        components: Vec<(String, String)>,
    },
    /// No verified SBOM, and why.
    Unknown(String),
}

/// What is asked.
#[derive(Clone, Debug, Default)]
pub struct Question {
    /// A package name, with a version requirement (`None`: any version).
    pub package: Option<(String, Option<semver::VersionReq>)>,
    /// An advisory id, looked up in the database.
    pub advisory: Option<String>,
}

/// The answer for one workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// The workload.
    pub workload: String,
    /// `affected`, `not-affected` or `unknown` (a question asked); `listed` otherwise.
    pub status: &'static str,
    /// Per image: what matched, the components (without a question), or why it is unknown.
    pub images: Vec<ImageAnswer>,
}

/// The answer for one image of a workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageAnswer {
    /// The reference.
    pub image: String,
    /// The digest its SBOM is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Components that match the question (`name version`, with the advisory).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<String>,
    /// Every component (without a question).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// Why its contents are unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// Whether `bom` is a CycloneDX document that lists components (an empty list counts): anything
/// else, though signed, says nothing about what the image contains.
pub fn is_cyclonedx(bom: &Value) -> bool {
    bom["bomFormat"] == "CycloneDX" && bom["components"].is_array()
}

/// Every component (name, version) of a CycloneDX SBOM: the described component itself
/// (`metadata.component`), the listed ones and those nested inside them, and for a component
/// known only by its package URL, the name and version the URL gives.
pub fn components(bom: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = bom["components"].as_array().into_iter().flatten().collect();
    if bom["metadata"]["component"].is_object() {
        stack.push(&bom["metadata"]["component"]);
    }
    while let Some(c) = stack.pop() {
        stack.extend(c["components"].as_array().into_iter().flatten());
        let version = match &c["version"] {
            Value::String(v) => v.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if let Some(name) = c["name"].as_str() {
            out.push((name.to_owned(), version.clone()));
        }
        // pkg:type/namespace/name@version: the package a file came from, say.
        if let Some((name, v)) = c["purl"].as_str().and_then(purl_package)
            && (c["name"].as_str() != Some(name.as_str()) || version != v)
        {
            out.push((name, v));
        }
    }
    out
}

/// (name, version) of a package URL.
fn purl_package(purl: &str) -> Option<(String, String)> {
    let rest = purl.strip_prefix("pkg:")?;
    let rest = rest.split(['?', '#']).next()?;
    let (path, version) = rest.rsplit_once('@').unwrap_or((rest, ""));
    let name = path.rsplit('/').next()?;
    (!name.is_empty()).then(|| (name.to_owned(), version.to_owned()))
}

/// Whether `version` is within `req`. A pre-release counts as the release it leads to (semver
/// ranges leave pre-releases out unless they name one, which would hide `1.6.0-rc.1` from
/// `<1.6.1`); a version that does not parse is within every range (unknown is not safe).
pub fn within(req: &semver::VersionReq, version: &str) -> bool {
    let Ok(v) = semver::Version::parse(version.trim_start_matches('v')) else {
        return true;
    };
    let release = semver::Version::new(v.major, v.minor, v.patch);
    req.matches(&v) || req.matches(&release)
}

/// Answers `question` for `workloads` from what is known of their images. `db` is needed for
/// an advisory question.
pub fn answer(
    workloads: &[Workload],
    contents: &BTreeMap<String, Contents>,
    question: &Question,
    db: Option<&Database>,
) -> Result<Vec<Answer>> {
    let asked = question.package.is_some() || question.advisory.is_some();
    let advisory = match (&question.advisory, db) {
        (Some(id), Some(db)) => Some(
            db.advisory(id)
                .with_context(|| format!("advisory {id} is not in the database"))?,
        ),
        (Some(_), None) => anyhow::bail!("an advisory question needs the advisory database"),
        _ => None,
    };
    let mut out = Vec::new();
    for w in workloads {
        let mut images = Vec::new();
        let (mut any_match, mut any_unknown) = (false, false);
        for image in &w.images {
            let mut a = ImageAnswer {
                image: image.clone(),
                digest: None,
                matches: Vec::new(),
                components: Vec::new(),
                unknown: None,
            };
            match contents.get(image) {
                None => a.unknown = Some("not looked up".to_owned()),
                Some(Contents::Unknown(why)) => a.unknown = Some(why.clone()),
                Some(Contents::Verified { digest, components }) => {
                    a.digest = Some(digest.clone());
                    if let Some((name, req)) = &question.package {
                        for (n, v) in components.iter().filter(|(n, _)| n == name) {
                            if req.as_ref().is_none_or(|r| within(r, v)) {
                                a.matches.push(format!("{n} {v}"));
                            }
                        }
                    }
                    // The advisory asked about, whatever its kind (a notice too).
                    if let Some(adv) = advisory {
                        for (n, v) in components.iter().filter(|(n, _)| *n == adv.package) {
                            if adv.affects_version(v) {
                                a.matches.push(format!("{n} {v}: {}", adv.id));
                            }
                        }
                    }
                    if !asked {
                        a.components = components.iter().map(|(n, v)| format!("{n} {v}")).collect();
                    }
                }
            }
            any_match |= !a.matches.is_empty();
            any_unknown |= a.unknown.is_some();
            images.push(a);
        }
        let status = match (asked, any_match, any_unknown) {
            (false, _, _) => "listed",
            (true, true, _) => "affected",
            (true, false, true) => "unknown",
            (true, false, false) => "not-affected",
        };
        out.push(Answer {
            workload: w.name.clone(),
            status,
            images,
        });
    }
    Ok(out)
}

/// The workloads running in `namespace` (every namespace when `None`): each pod under its top
/// controller (a ReplicaSet's Deployment), with the images its containers run.
pub async fn workloads(client: &Client, namespace: Option<&str>) -> Result<Vec<Workload>> {
    let (pods, sets): (Api<Pod>, Api<ReplicaSet>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let sets = sets.list(&ListParams::default()).await?;
    let owner_of_set: BTreeMap<(String, String), String> = sets
        .items
        .iter()
        .filter_map(|rs| {
            let ns = rs.metadata.namespace.clone()?;
            let name = rs.metadata.name.clone()?;
            let owner = rs
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map_or_else(
                    || format!("ReplicaSet {ns}/{name}"),
                    |o| format!("{} {ns}/{}", o.kind, o.name),
                );
            Some(((ns, name), owner))
        })
        .collect();
    let mut by_workload: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in pods.list(&ListParams::default()).await?.items {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let workload = match pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
        {
            Some(o) if o.kind == "ReplicaSet" => owner_of_set
                .get(&(ns.clone(), o.name.clone()))
                .cloned()
                .unwrap_or_else(|| format!("ReplicaSet {ns}/{}", o.name)),
            Some(o) => format!("{} {ns}/{}", o.kind, o.name),
            None => format!("Pod {ns}/{name}"),
        };
        let images = by_workload.entry(workload).or_default();
        for image in running_images(&pod) {
            if !images.contains(&image) {
                images.push(image);
            }
        }
    }
    Ok(by_workload
        .into_iter()
        .map(|(name, images)| Workload { name, images })
        .collect())
}

/// The images of a pod's containers (init, regular, ephemeral): the digest the kubelet reports
/// running where it has one, otherwise the reference in the spec.
fn running_images(pod: &Pod) -> Vec<String> {
    let mut running: BTreeMap<String, String> = BTreeMap::new();
    if let Some(status) = &pod.status {
        for s in status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .chain(status.ephemeral_container_statuses.iter().flatten())
        {
            if let Some((_, digest)) = s.image_id.split_once("@sha256:") {
                let repo = s.image.split('@').next().unwrap_or(&s.image);
                let repo = strip_tag(repo);
                running.insert(s.name.clone(), format!("{repo}@sha256:{digest}"));
            }
        }
    }
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let named = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default())),
        );
    named
        .map(|(name, image)| running.remove(&name).unwrap_or(image))
        .filter(|i| !i.is_empty())
        .collect()
}

/// `repo:tag` without its tag (a port's colon is kept).
fn strip_tag(image: &str) -> &str {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

/// Fetches and verifies the SBOM attestations of `image` (a digest reference) with `keys` (PEM
/// public keys): the components of every CycloneDX SBOM one of them signed about the digest.
pub async fn contents(registry: &Registry, image: &str, keys: &[Vec<u8>]) -> Contents {
    // A tag is what runs only when the kubelet says which digest it pulled; without that (not
    // started yet, or no digest reported) the tag may point elsewhere by now.
    if !image.contains("@sha256:") {
        return Contents::Unknown(
            "no digest known: the kubelet reports none for it and the spec names a tag, which \
             may point at another image now"
                .to_owned(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let auth = RegistryAuth::Anonymous;
    let (reference, digest) = match registry.resolve(image, &auth, deadline).await {
        Ok(r) => r,
        Err(e) => return Contents::Unknown(format!("cannot resolve: {e}")),
    };
    let budget = Budget::default();
    let mut layers = match registry
        .cosign_layers_within(&reference, (&digest, "att"), &auth, deadline, &budget)
        .await
    {
        Ok(l) => l,
        Err(e) => return Contents::Unknown(format!("cannot read its attestations: {e}")),
    };
    if layers.is_empty() {
        match registry
            .bundle_layers(&reference, &digest, &auth, deadline, &budget)
            .await
        {
            Ok(l) => layers = l,
            Err(e) => return Contents::Unknown(format!("cannot read its attestations: {e}")),
        }
    }
    let mut boms = Vec::new();
    let mut why = Vec::new();
    for key in keys {
        match verify_attestations(&layers, &digest, CYCLONEDX, &Signer::Key(key.clone())) {
            Ok(found) => {
                let (good, odd): (Vec<Value>, Vec<Value>) =
                    found.into_iter().partition(is_cyclonedx);
                if !odd.is_empty() {
                    why.push(format!(
                        "{} signed predicate(s) that are no CycloneDX document with components",
                        odd.len()
                    ));
                }
                boms.extend(good);
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    if boms.is_empty() {
        return Contents::Unknown(format!(
            "no CycloneDX SBOM attestation of {digest} verifies with the given keys: {}",
            why.join("; ")
        ));
    }
    let components = boms.iter().flat_map(components).collect();
    Contents::Verified { digest, components }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(components: &[(&str, &str)]) -> Contents {
        let bom = serde_json::json!({"components": components.iter().map(|(n, v)|
            serde_json::json!({"type": "library", "name": n, "version": v})).collect::<Vec<_>>()});
        Contents::Verified {
            digest: "sha256:ab".into(),
            components: super::components(&bom),
        }
    }

    #[test]
    fn components_nested_described_and_by_package_url_count() {
        let bom = serde_json::json!({
            "bomFormat": "CycloneDX",
            "metadata": {"component": {"type": "application", "name": "palisade-webhook", "version": "0.1.0"}},
            "components": [
                {"type": "application", "name": "orders", "components": [
                    {"type": "library", "name": "smallvec", "version": "1.6.0"}]},
                {"type": "file", "name": "/etc/ssl/certs/ca-certificates.crt",
                 "purl": "pkg:deb/debian/ca-certificates@20230311+deb12u1?arch=all"},
                {"type": "framework", "name": "time"},
            ]
        });
        let got = components(&bom);
        for want in [
            ("smallvec", "1.6.0"),
            ("palisade-webhook", "0.1.0"),
            ("ca-certificates", "20230311+deb12u1"),
            ("time", ""),
        ] {
            assert!(
                got.contains(&(want.0.to_owned(), want.1.to_owned())),
                "{want:?} in {got:?}"
            );
        }
        assert!(is_cyclonedx(&bom));
        assert!(!is_cyclonedx(&serde_json::json!({})));
        assert!(!is_cyclonedx(
            &serde_json::json!({"bomFormat": "CycloneDX"})
        ));
    }

    #[test]
    fn pre_releases_and_unparsed_versions_are_within_ranges() {
        let req = |r: &str| semver::VersionReq::parse(r).expect("req");
        assert!(within(&req("<1.6.1"), "1.6.0-rc.1"));
        assert!(within(&req(">=1.0, <1.6.1"), "1.5.0-beta"));
        assert!(within(&req("*"), "1.6.0-rc.1"));
        assert!(within(&req("<1.6.1"), "v1.6.0"));
        assert!(within(&req("<1.6.1"), "not a version"));
        assert!(!within(&req("<1.6.1"), "1.6.1"));
        assert!(!within(&req("<1.6.1"), "1.7.0-rc.1"));
    }

    /// The advisory database snapshot beside the project (or `$PALISADE_ADVISORY_DB`).
    fn database() -> Database {
        let path = std::env::var_os("PALISADE_ADVISORY_DB").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/advisory-db"),
            std::path::PathBuf::from,
        );
        Database::load(&path).expect("the advisory database snapshot")
    }

    #[test]
    fn an_advisory_question_misses_no_shape_of_component_nor_kind_of_advisory() {
        let db = database();
        let workload = |name: &str| Workload {
            name: format!("Deployment a/{name}"),
            images: vec![format!("r/{name}@sha256:00")],
        };
        let bom = |c: serde_json::Value| Contents::Verified {
            digest: "sha256:00".into(),
            components: components(
                &serde_json::json!({"bomFormat": "CycloneDX", "components": [c]}),
            ),
        };
        let cases = [
            (
                "nested",
                serde_json::json!({"type": "application", "name": "app", "components": [
                {"type": "library", "name": "smallvec", "version": "1.6.0"}]}),
            ),
            (
                "versionless",
                serde_json::json!({"type": "library", "name": "smallvec"}),
            ),
            (
                "framework",
                serde_json::json!({"type": "framework", "name": "smallvec", "version": "1.6.0"}),
            ),
            (
                "numeric",
                serde_json::json!({"type": "library", "name": "smallvec", "version": 1.6}),
            ),
            (
                "prerelease",
                serde_json::json!({"type": "library", "name": "smallvec", "version": "1.6.0-rc.1"}),
            ),
            (
                "purl",
                serde_json::json!({"type": "file", "name": "/lib/x", "purl": "pkg:cargo/smallvec@1.6.0"}),
            ),
        ];
        let workloads: Vec<Workload> = cases.iter().map(|(n, _)| workload(n)).collect();
        let contents: BTreeMap<String, Contents> = cases
            .iter()
            .map(|(n, c)| (format!("r/{n}@sha256:00"), bom(c.clone())))
            .collect();
        let q = Question {
            package: None,
            advisory: Some("RUSTSEC-2021-0003".into()),
        };
        for a in answer(&workloads, &contents, &q, Some(&db)).expect("answer") {
            assert_eq!(a.status, "affected", "{}", a.workload);
        }
        // The gate's findings see the same components.
        for (n, c) in &cases {
            let sbom = serde_json::json!({"bomFormat": "CycloneDX", "components": [c]});
            assert!(!db.bom_findings(&sbom).is_empty(), "{n}");
        }
        // A notice asked about by name is answered, not filtered away.
        let notice = db
            .advisory("RUSTSEC-2026-0174")
            .expect("a notice in the snapshot");
        assert_eq!(notice.informational.as_deref(), Some("notice"));
        let contents = BTreeMap::from([(
            "r/web@sha256:00".to_owned(),
            bom(serde_json::json!({"type": "library", "name": notice.package, "version": "0.0.1"})),
        )]);
        let q = Question {
            package: None,
            advisory: Some(notice.id.clone()),
        };
        let got = answer(&[workload("web")], &contents, &q, Some(&db)).expect("answer");
        assert_eq!(got[0].status, "affected");
    }

    #[tokio::test]
    async fn a_tag_without_a_running_digest_is_unknown() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = Registry::new(&[]).expect("registry");
        let c = contents(&registry, "reg.example/app:1", &[]).await;
        assert!(matches!(c, Contents::Unknown(why) if why.contains("no digest known")));
    }

    #[test]
    fn unknown_is_never_not_affected() {
        let workloads = vec![
            Workload {
                name: "Deployment a/old".into(),
                images: vec!["r/old:1".into()],
            },
            Workload {
                name: "Deployment a/new".into(),
                images: vec!["r/new:1".into()],
            },
            Workload {
                name: "Deployment a/dark".into(),
                images: vec!["r/new:1".into(), "r/unsigned:1".into()],
            },
        ];
        let contents = BTreeMap::from([
            ("r/old:1".to_owned(), verified(&[("smallvec", "1.6.0")])),
            ("r/new:1".to_owned(), verified(&[("smallvec", "1.13.2")])),
            (
                "r/unsigned:1".to_owned(),
                Contents::Unknown("no attestation".into()),
            ),
        ]);
        let q = Question {
            package: Some((
                "smallvec".into(),
                Some(semver::VersionReq::parse("<1.6.1").expect("req")),
            )),
            advisory: None,
        };
        let got = answer(&workloads, &contents, &q, None).expect("answer");
        let status: Vec<_> = got.iter().map(|a| a.status).collect();
        assert_eq!(status, ["affected", "not-affected", "unknown"]);
        assert_eq!(got[0].images[0].matches, ["smallvec 1.6.0"]);
        // Any version: both match.
        let q = Question {
            package: Some(("smallvec".into(), None)),
            advisory: None,
        };
        let got = answer(&workloads, &contents, &q, None).expect("answer");
        assert_eq!(got[1].status, "affected");
        // An advisory question without the database is refused, not answered "not affected".
        let q = Question {
            package: None,
            advisory: Some("RUSTSEC-2021-0003".into()),
        };
        assert!(answer(&workloads, &contents, &q, None).is_err());
    }

    #[test]
    fn a_running_digest_is_preferred_to_the_tag() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "image": "reg:5000/x:1"}, {"name": "b", "image": "reg:5000/y:2"}]},
            "status": {"containerStatuses": [{"name": "a", "image": "reg:5000/x:1", "imageID": "reg:5000/x@sha256:00ff",
              "ready": true, "restartCount": 0}]}
        }))
        .expect("pod");
        assert_eq!(
            running_images(&pod),
            ["reg:5000/x@sha256:00ff", "reg:5000/y:2"]
        );
    }
}
