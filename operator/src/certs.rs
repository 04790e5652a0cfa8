//! The webhook's serving certificate, generated and rotated by the operator (the chart's
//! `certificates.source: operator`): a CA and a serving certificate for the webhook Service's DNS
//! names are kept in a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`), renewed
//! `renewBeforeDays` before they expire, and the CA is written into the `caBundle` of every
//! webhook of the named Validating and Mutating configurations. The webhook reloads the mounted
//! files when they change.
//!
//! Deciding and generating are pure ([`plan`], [`generate`]); [`ensure`] does the I/O.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::Secret,
    },
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde::Deserialize;

/// Annotation on the Secret with the serving certificate's expiry (RFC 3339).
pub const NOT_AFTER: &str = "palisade.dev/not-after";

/// Settings (config `webhookCertificate`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertSettings {
    /// The Secret holding the certificate.
    pub secret_name: String,
    /// Namespace of the Secret and of the webhook Service.
    pub namespace: String,
    /// The webhook Service; the certificate is for `<service>.<namespace>.svc` (and `.cluster.local`).
    pub service_name: String,
    /// Validating and Mutating webhook configurations whose `caBundle` is kept current.
    #[serde(default)]
    pub webhook_configurations: Vec<String>,
    /// How long a new certificate is valid, in days.
    #[serde(default = "default_validity")]
    pub validity_days: u32,
    /// How long before expiry it is replaced, in days.
    #[serde(default = "default_renew_before")]
    pub renew_before_days: u32,
    /// How often the Secret and the `caBundle`s are checked, in seconds.
    #[serde(default = "default_check_interval")]
    pub check_interval_seconds: u64,
}

fn default_check_interval() -> u64 {
    600
}

fn default_validity() -> u32 {
    365
}

fn default_renew_before() -> u32 {
    30
}

/// A generated CA and serving certificate, PEM.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// CA certificate.
    pub ca: String,
    /// Serving certificate.
    pub cert: String,
    /// Serving key.
    pub key: String,
    /// Expiry of both.
    pub not_after: Timestamp,
}

/// Why the Secret must be (re)written, or `None` when it is current.
pub fn plan(secret: Option<&Secret>, settings: &CertSettings, now: Timestamp) -> Option<String> {
    let Some(secret) = secret else {
        return Some("the Secret does not exist".into());
    };
    let data = secret.data.clone().unwrap_or_default();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        if data.get(key).is_none_or(|v| v.0.is_empty()) {
            return Some(format!("the Secret has no {key}"));
        }
    }
    let not_after = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NOT_AFTER))
        .and_then(|t| t.parse::<Timestamp>().ok());
    let Some(not_after) = not_after else {
        return Some(format!("the Secret has no valid {NOT_AFTER} annotation"));
    };
    let renew_at = not_after
        .checked_sub(SignedDuration::from_hours(
            24 * i64::from(settings.renew_before_days),
        ))
        .unwrap_or(not_after);
    (now >= renew_at).then(|| format!("the certificate expires at {not_after}"))
}

/// A new CA and a serving certificate from it for the webhook Service.
pub fn generate(settings: &CertSettings, now: Timestamp) -> Result<Bundle, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let not_after = now
        .checked_add(SignedDuration::from_hours(
            24 * i64::from(settings.validity_days),
        ))
        .unwrap_or(now);
    let to_offset = |t: Timestamp| {
        time::OffsetDateTime::from_unix_timestamp(t.as_second())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "palisade webhook CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = to_offset(now);
    ca.not_after = to_offset(not_after);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let svc = format!("{}.{}.svc", settings.service_name, settings.namespace);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![svc.clone(), format!("{svc}.cluster.local")])?;
    leaf.distinguished_name.push(DnType::CommonName, svc);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = to_offset(now);
    leaf.not_after = to_offset(not_after);
    let cert = leaf.signed_by(&key, &issuer)?.pem();
    Ok(Bundle {
        ca: ca_pem,
        cert,
        key: key.serialize_pem(),
        not_after,
    })
}

/// The Secret holding `bundle`.
pub fn secret(settings: &CertSettings, bundle: &Bundle) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("tls.crt", &bundle.cert),
        ("tls.key", &bundle.key),
        ("ca.crt", &bundle.ca),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(settings.namespace.clone()),
            annotations: Some(BTreeMap::from([(
                NOT_AFTER.to_owned(),
                bundle.not_after.to_string(),
            )])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "palisade-operator".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// What [`ensure`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Why the certificate was replaced, when it was.
    pub renewed: Option<String>,
    /// Webhook configurations whose `caBundle` was updated.
    pub patched: Vec<String>,
}

/// Keeps the Secret current and the webhook configurations' `caBundle` equal to its CA.
pub async fn ensure(client: &Client, settings: &CertSettings) -> Result<Outcome, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let live = secrets.get_opt(&settings.secret_name).await?;
    let mut outcome = Outcome::default();
    let now = Timestamp::now();
    let ca = match plan(live.as_ref(), settings, now) {
        None => live
            .and_then(|s| s.data)
            .and_then(|d| d.get("ca.crt").cloned())
            .map(|b| b.0)
            .unwrap_or_default(),
        Some(why) => {
            let bundle = generate(settings, now).map_err(|e| kube::Error::Service(Box::new(e)))?;
            let mut new = secret(settings, &bundle);
            match live {
                Some(old) => {
                    new.metadata.resource_version = old.metadata.resource_version;
                    secrets
                        .replace(&settings.secret_name, &PostParams::default(), &new)
                        .await?;
                }
                None => {
                    secrets.create(&PostParams::default(), &new).await?;
                }
            }
            tracing::info!(secret = %settings.secret_name, reason = %why, not_after = %bundle.not_after, "webhook certificate issued");
            outcome.renewed = Some(why);
            bundle.ca.into_bytes()
        }
    };
    for name in &settings.webhook_configurations {
        let patched = [
            sync_ca::<ValidatingWebhookConfiguration>(client, name, &ca).await?,
            sync_ca::<MutatingWebhookConfiguration>(client, name, &ca).await?,
        ];
        outcome.patched.extend(patched.into_iter().flatten());
    }
    Ok(outcome)
}

/// Sets `caBundle` to `ca` on the webhooks of configuration `name` (of kind `K`, when it
/// exists) that do not have it yet, with a strategic merge patch keyed by webhook name;
/// `Kind/name` when anything was patched.
async fn sync_ca<K>(client: &Client, name: &str, ca: &[u8]) -> Result<Option<String>, kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    use base64::Engine as _;
    let api: Api<K> = Api::all(client.clone());
    let Some(config) = api.get_opt(name).await? else {
        return Ok(None);
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca);
    // Both kinds list `webhooks[]` with `name` and `clientConfig.caBundle` (base64 in JSON).
    let config = serde_json::to_value(&config).map_err(kube::Error::SerdeError)?;
    let stale: Vec<serde_json::Value> = config["webhooks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["clientConfig"]["caBundle"].as_str() != Some(encoded.as_str()))
        .map(|w| serde_json::json!({"name": w["name"], "clientConfig": {"caBundle": encoded}}))
        .collect();
    if stale.is_empty() {
        return Ok(None);
    }
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({ "webhooks": stale })),
    )
    .await?;
    Ok(Some(format!("{}/{name}", K::kind(&()))))
}

/// Runs [`ensure`] now and every `checkIntervalSeconds`, until `shutdown`.
pub async fn run(client: Client, settings: CertSettings, shutdown: impl Future<Output = ()>) {
    let every = std::time::Duration::from_secs(settings.check_interval_seconds.max(1));
    let work = async {
        loop {
            let wait = match ensure(&client, &settings).await {
                Ok(o) => {
                    if !o.patched.is_empty() {
                        tracing::info!(patched = ?o.patched, "webhook caBundle updated");
                    }
                    every
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot keep the webhook certificate current; retrying");
                    std::time::Duration::from_secs(10)
                }
            };
            tokio::time::sleep(wait).await;
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CertSettings {
        CertSettings {
            secret_name: "palisade-webhook-tls".into(),
            namespace: "palisade-system".into(),
            service_name: "palisade-webhook".into(),
            webhook_configurations: vec!["palisade-webhook".into()],
            validity_days: 365,
            renew_before_days: 30,
            check_interval_seconds: 600,
        }
    }

    #[test]
    fn a_fresh_certificate_is_kept_and_renewed_before_expiry() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let s = settings();
        assert_eq!(
            plan(None, &s, now).as_deref(),
            Some("the Secret does not exist")
        );
        let bundle = generate(&s, now).unwrap();
        let sec = secret(&s, &bundle);
        assert_eq!(plan(Some(&sec), &s, now), None);
        // 334 days later: still current; 336 days later: within 30 days of expiry.
        let later = |days: i64| {
            now.checked_add(SignedDuration::from_hours(24 * days))
                .unwrap()
        };
        assert_eq!(plan(Some(&sec), &s, later(334)), None);
        assert!(
            plan(Some(&sec), &s, later(336))
                .unwrap()
                .contains("expires at 2027-01-01")
        );
        let mut no_key = sec.clone();
        no_key.data.as_mut().unwrap().remove("tls.key");
        assert_eq!(
            plan(Some(&no_key), &s, now).as_deref(),
            Some("the Secret has no tls.key")
        );
        let mut unannotated = sec;
        unannotated.metadata.annotations = None;
        assert!(
            plan(Some(&unannotated), &s, now)
                .unwrap()
                .contains(NOT_AFTER)
        );
    }

    #[test]
    fn the_serving_certificate_chains_to_the_ca_for_the_service_name() {
        use rustls::{
            client::danger::ServerCertVerifier as _,
            pki_types::{CertificateDer, UnixTime, pem::PemObject as _},
        };
        let now = Timestamp::now();
        let bundle = generate(&settings(), now).unwrap();
        let ca = CertificateDer::from_pem_slice(bundle.ca.as_bytes()).unwrap();
        let leaf = CertificateDer::from_pem_slice(bundle.cert.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("palisade-webhook.palisade-system.svc")
            .unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .unwrap();
        let other = rustls::pki_types::ServerName::try_from("evil.palisade-system.svc").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf, &[], &other, &[], UnixTime::now())
                .is_err()
        );
    }
}
