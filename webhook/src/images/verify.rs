//! Cosign signature and attestation checks over blobs already fetched from a registry: pure,
//! ring-backed (through rustls-webpki), no I/O.
//!
//! - Signatures (`sha256-<hex>.sig`): each layer is a "simple signing" payload
//!   (`application/vnd.dev.cosign.simplesigning.v1+json`) whose signature is in the layer
//!   annotation `dev.cosignproject.cosign/signature`; the payload must name the image digest.
//! - Attestations (`sha256-<hex>.att`): each layer is a DSSE envelope
//!   (`application/vnd.dsse.envelope.v1+json`) over an in-toto statement; the signature covers
//!   the DSSE pre-authentication encoding, the statement's subject must be the image digest.
//! - Sigstore bundles (cosign v3's default: OCI referrers of the image, artifact type
//!   `application/vnd.dev.sigstore.bundle.v0.3+json`): each bundle's DSSE envelope is read as an
//!   attestation layer ([`bundle_layer`]); a signature is an in-toto statement of predicate type
//!   `https://sigstore.dev/cosign/sign/v1` about the image digest, attestations carry their own
//!   predicate type, and a keyless bundle's certificate becomes the layer's certificate.
//! - Keys: an ECDSA P-256 public key (`cosign generate-key-pair`), or keyless: a certificate in
//!   the layer annotations that chains to a configured CA, carries the code-signing usage and the
//!   expected issuer and subject.

use std::collections::{BTreeMap, BTreeSet};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use rustls_pki_types::{CertificateDer, SubjectPublicKeyInfoDer, UnixTime, pem::PemObject};
use serde::Deserialize;

/// Media type of a cosign signature payload.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Media type of a DSSE envelope (cosign attestations).
pub const DSSE: &str = "application/vnd.dsse.envelope.v1+json";
/// Layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Layer annotation holding a keyless signer's certificate (PEM).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// Layer annotation holding the certificate chain (PEM).
pub const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";
/// Artifact and media type of a Sigstore bundle.
pub const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Predicate type of the statement cosign signs in a bundle-format image signature.
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
/// `id-kp-codeSigning`, the extended key usage of a signing certificate (DER of the OID).
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// One layer of a `.sig` or `.att` manifest: its media type, annotations and content.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Media type.
    pub media_type: String,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Content (digest-checked when fetched).
    pub blob: Vec<u8>,
}

/// Why a signature or attestation does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The configured key or CA is unusable.
    #[error("unusable {what}: {why}")]
    Config {
        /// What (public key, CA).
        what: &'static str,
        /// Cause.
        why: String,
    },
    /// Nothing signed by this authority was found.
    #[error("{0}")]
    NoMatch(String),
}

/// A string test: exact, or a regular expression that must match the whole string.
#[derive(Clone, Debug)]
pub enum Matcher {
    /// Equal to this.
    Exact(String),
    /// Matched by this (anchored at both ends).
    Pattern(regex::Regex),
}

impl Matcher {
    /// A matcher for a regular expression, anchored so it must match the whole value.
    pub fn pattern(re: &str) -> Result<Self, String> {
        regex::Regex::new(&format!("^(?:{re})$"))
            .map(Matcher::Pattern)
            .map_err(|e| format!("regular expression {re:?}: {e}"))
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == value,
            Matcher::Pattern(re) => re.is_match(value),
        }
    }
}

/// An accepted keyless signer: the certificate's OIDC issuer and subject.
#[derive(Clone, Debug)]
pub struct IdentityMatcher {
    /// OIDC issuer (Fulcio extension).
    pub issuer: Matcher,
    /// Subject (email or URI SAN).
    pub subject: Matcher,
}

/// Who must have signed.
#[derive(Clone, Debug)]
pub enum Signer {
    /// A public key (PEM SubjectPublicKeyInfo).
    Key(Vec<u8>),
    /// A certificate chaining to one of `roots` (PEM), with one of these identities.
    Keyless {
        /// Trusted CA certificates (PEM).
        roots: Vec<u8>,
        /// Accepted identities; any one may match.
        identities: Vec<IdentityMatcher>,
    },
}

impl Signer {
    /// Checks that the configured key or CA parses.
    pub fn validate(&self) -> Result<(), VerifyError> {
        match self {
            Signer::Key(pem) => SubjectPublicKeyInfoDer::from_pem_slice(pem)
                .map(|_| ())
                .map_err(|e| VerifyError::Config {
                    what: "public key",
                    why: e.to_string(),
                }),
            Signer::Keyless { roots, .. } => roots_of(roots).map(|_| ()),
        }
    }

    /// Whether `sig` over `msg` was made by this signer, using the layer's certificate
    /// annotations for keyless signers: `Ok` names who signed (the key, or the certificate's
    /// issuer and subject), so that two authorities naming the same key or overlapping
    /// identities are not both satisfied by one signer. `Err` says why not.
    fn check(
        &self,
        annotations: &BTreeMap<String, String>,
        msg: &[u8],
        sig: &[u8],
    ) -> Result<String, String> {
        match self {
            Signer::Key(pem) => {
                let spki =
                    SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|e| e.to_string())?;
                let key =
                    webpki::RawPublicKeyEntity::try_from(&spki).map_err(|e| format!("{e:?}"))?;
                if !SIGNATURE_ALGORITHMS
                    .iter()
                    .any(|alg| key.verify_signature(*alg, msg, sig).is_ok())
                {
                    // id-Ed25519 (1.3.101.112) in the key's algorithm identifier.
                    if spki
                        .as_ref()
                        .windows(5)
                        .any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70])
                    {
                        return Err("signature does not verify with the key (an Ed25519 key: \
                                    Palisade verifies pure Ed25519 signatures, while cosign signs \
                                    images with Ed25519ph; sign with an ECDSA or RSA key)"
                            .to_owned());
                    }
                    return Err("signature does not verify with the key".to_owned());
                }
                Ok(format!("key {}", B64.encode(spki.as_ref())))
            }
            Signer::Keyless { roots, identities } => {
                keyless(annotations, roots, identities, msg, sig)
            }
        }
    }
}

/// What a key may sign with: what cosign generates and imports and what KMS keys commonly are —
/// ECDSA P-256 and P-384 (SHA-256 or SHA-384), RSA (PKCS#1 v1.5 or PSS, SHA-256 to SHA-512,
/// 2048 bits or more), and pure Ed25519 (cosign signs images with Ed25519ph, which is not
/// verified: such signatures are refused, saying so). A key is only ever checked with the algorithms of its own type
/// (the key's algorithm identifier must match), so accepting several never lets one kind of
/// signature pass for another.
const SIGNATURE_ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

fn roots_of(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| VerifyError::Config {
            what: "CA",
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(VerifyError::Config {
            what: "CA",
            why: "no certificate".into(),
        });
    }
    Ok(certs)
}

/// Keyless check: chain, code-signing usage, identity, then the signature with the leaf's key.
/// Without a transparency log there is no trusted signing time, so the chain is checked at the
/// leaf's `notBefore` (short-lived signing certificates have expired by the time they are used).
fn keyless(
    annotations: &BTreeMap<String, String>,
    roots: &[u8],
    identities: &[IdentityMatcher],
    msg: &[u8],
    sig: &[u8],
) -> Result<String, String> {
    let leaf_pem = annotations
        .get(CERTIFICATE_ANNOTATION)
        .ok_or("no signing certificate (not a keyless signature)")?;
    let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).map_err(|e| e.to_string())?;
    let chain: Vec<CertificateDer<'static>> = match annotations.get(CHAIN_ANNOTATION) {
        Some(p) => CertificateDer::pem_slice_iter(p.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let roots = roots_of(roots).map_err(|e| e.to_string())?;
    let anchors = roots
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA: {e:?}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?;
    let not_before = u64::try_from(x509.validity().not_before.timestamp()).unwrap_or(0);
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("{e:?}"))?;
    ee.verify_for_usage(
        SIGNATURE_ALGORITHMS,
        &anchors,
        &chain,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_before)),
        webpki::KeyUsage::required(EKU_CODE_SIGNING),
        None,
        None,
    )
    .map_err(|e| format!("certificate does not chain to the trusted CA: {e:?}"))?;
    let subject = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|g| match g {
                x509_parser::extensions::GeneralName::RFC822Name(s)
                | x509_parser::extensions::GeneralName::URI(s) => Some((*s).to_owned()),
                _ => None,
            })
        })
        .ok_or("certificate has no email or URI subject")?;
    let issuer = x509
        .extensions()
        .iter()
        .find_map(|e| match e.oid.to_id_string().as_str() {
            "1.3.6.1.4.1.57264.1.8" => x509_parser::der_parser::parse_der(e.value)
                .ok()
                .and_then(|(_, o)| o.as_str().ok().map(str::to_owned)),
            "1.3.6.1.4.1.57264.1.1" => std::str::from_utf8(e.value).ok().map(str::to_owned),
            _ => None,
        })
        .ok_or("certificate has no OIDC issuer extension")?;
    if !identities
        .iter()
        .any(|i| i.issuer.matches(&issuer) && i.subject.matches(&subject))
    {
        return Err(format!(
            "signed by {subject} via {issuer}, which no accepted identity matches"
        ));
    }
    if !SIGNATURE_ALGORITHMS
        .iter()
        .any(|alg| ee.verify_signature(*alg, msg, sig).is_ok())
    {
        return Err("signature does not verify with the certificate's key".to_owned());
    }
    Ok(format!("identity {issuer} {subject}"))
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: SignedImage,
}

#[derive(Deserialize)]
struct SignedImage {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

#[derive(Deserialize)]
struct Bundle {
    #[serde(rename = "verificationMaterial", default)]
    material: Material,
    #[serde(rename = "dsseEnvelope")]
    dsse: Option<serde_json::Value>,
}

#[derive(Default, Deserialize)]
struct Material {
    certificate: Option<RawBytes>,
    #[serde(rename = "x509CertificateChain")]
    chain: Option<CertChain>,
}

#[derive(Deserialize)]
struct RawBytes {
    #[serde(rename = "rawBytes")]
    raw: String,
}

#[derive(Deserialize)]
struct CertChain {
    certificates: Vec<RawBytes>,
}

/// PEM of base64 DER.
fn pem_of(der_b64: &str) -> Result<String, String> {
    let der = B64
        .decode(der_b64)
        .map_err(|e| format!("certificate is not base64: {e}"))?;
    let body = B64.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    Ok(format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    ))
}

/// A Sigstore bundle (JSON) as a DSSE layer: its envelope, with its signing certificate (and
/// chain) as the layer's certificate annotations. Only DSSE bundles are read; cosign writes
/// those for signatures and attestations alike.
pub fn bundle_layer(blob: &[u8]) -> Result<Layer, String> {
    let bundle: Bundle =
        serde_json::from_slice(blob).map_err(|e| format!("a bundle that does not parse: {e}"))?;
    let envelope = bundle
        .dsse
        .ok_or("a bundle without a DSSE envelope (message signatures are not read)")?;
    let mut annotations = BTreeMap::new();
    let mut certs = Vec::new();
    if let Some(c) = &bundle.material.certificate {
        certs.push(pem_of(&c.raw)?);
    }
    for c in bundle.material.chain.iter().flat_map(|c| &c.certificates) {
        certs.push(pem_of(&c.raw)?);
    }
    if let Some((leaf, chain)) = certs.split_first() {
        annotations.insert(CERTIFICATE_ANNOTATION.to_owned(), leaf.clone());
        if !chain.is_empty() {
            annotations.insert(CHAIN_ANNOTATION.to_owned(), chain.concat());
        }
    }
    Ok(Layer {
        media_type: DSSE.to_owned(),
        annotations,
        blob: serde_json::to_vec(&envelope).map_err(|e| e.to_string())?,
    })
}

/// The signers whose signature — a `.sig` layer, or a bundle's signed statement — names
/// `digest`: each named once however many signatures it made (see [`Signer::check`]). `Err`
/// explains, per layer, why none did.
pub fn verify_signatures(
    layers: &[Layer],
    digest: &str,
    signer: &Signer,
) -> Result<BTreeSet<String>, VerifyError> {
    let mut why = Vec::new();
    let mut signers = BTreeSet::new();
    if layers.iter().any(|l| l.media_type == DSSE) {
        match signed_statements(layers, digest, COSIGN_SIGN_PREDICATE, signer) {
            Ok(found) => signers.extend(found.into_iter().map(|(who, _)| who)),
            Err(e) => why.push(e.to_string()),
        }
    }
    for layer in layers.iter().filter(|l| l.media_type == SIMPLE_SIGNING) {
        let Some(sig) = layer
            .annotations
            .get(SIGNATURE_ANNOTATION)
            .and_then(|s| B64.decode(s).ok())
        else {
            why.push("a layer without a readable signature".to_owned());
            continue;
        };
        let who = match signer.check(&layer.annotations, &layer.blob, &sig) {
            Ok(who) => who,
            Err(e) => {
                why.push(e);
                continue;
            }
        };
        match serde_json::from_slice::<SimpleSigning>(&layer.blob) {
            Ok(p)
                if p.critical.kind == "cosign container image signature"
                    && p.critical.image.digest == digest =>
            {
                signers.insert(who);
            }
            Ok(p) => why.push(format!(
                "a valid signature for another image ({})",
                p.critical.image.digest
            )),
            Err(e) => why.push(format!("a signed payload that does not parse: {e}")),
        }
    }
    if !signers.is_empty() {
        return Ok(signers);
    }
    Err(VerifyError::NoMatch(if why.is_empty() {
        "no signature".into()
    } else {
        distinct(&why)
    }))
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<DsseSignature>,
}

#[derive(Deserialize)]
struct DsseSignature {
    sig: String,
}

#[derive(Deserialize)]
struct Statement {
    #[serde(rename = "predicateType")]
    predicate_type: String,
    subject: Vec<Subject>,
    #[serde(default)]
    predicate: serde_json::Value,
}

#[derive(Deserialize)]
struct Subject {
    digest: BTreeMap<String, String>,
}

/// DSSE pre-authentication encoding: what a DSSE signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    v.extend_from_slice(payload);
    v
}

/// The predicates of `.att` layers signed by `signer`, about `digest`, of `predicate_type`.
/// `Err` explains why none qualified.
pub fn verify_attestations(
    layers: &[Layer],
    digest: &str,
    predicate_type: &str,
    signer: &Signer,
) -> Result<Vec<serde_json::Value>, VerifyError> {
    signed_statements(layers, digest, predicate_type, signer)
        .map(|found| found.into_iter().map(|(_, p)| p).collect())
}

/// (who signed, predicate) of every DSSE statement in `layers` signed by `signer`, about
/// `digest`, of `predicate_type`. `Err` explains why none qualified.
fn signed_statements(
    layers: &[Layer],
    digest: &str,
    predicate_type: &str,
    signer: &Signer,
) -> Result<Vec<(String, serde_json::Value)>, VerifyError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let mut found = Vec::new();
    let mut why = Vec::new();
    for layer in layers.iter().filter(|l| l.media_type == DSSE) {
        let env: Envelope = match serde_json::from_slice(&layer.blob) {
            Ok(e) => e,
            Err(e) => {
                why.push(format!("an envelope that does not parse: {e}"));
                continue;
            }
        };
        let Ok(payload) = B64.decode(&env.payload) else {
            why.push("an envelope whose payload is not base64".into());
            continue;
        };
        let msg = pae(&env.payload_type, &payload);
        let mut failed = "no signature".to_owned();
        let who = env.signatures.iter().find_map(|s| {
            B64.decode(&s.sig)
                .map_err(|_| "a signature that is not base64".to_owned())
                .and_then(|sig| signer.check(&layer.annotations, &msg, &sig))
                .map_err(|e| failed = e)
                .ok()
        });
        let Some(who) = who else {
            why.push(format!(
                "an envelope not signed by this authority ({failed})"
            ));
            continue;
        };
        let statement: Statement = match serde_json::from_slice(&payload) {
            Ok(s) => s,
            Err(e) => {
                why.push(format!("a statement that does not parse: {e}"));
                continue;
            }
        };
        if statement.predicate_type != predicate_type {
            // A bundle-format signature is no attestation: not worth a reason.
            if statement.predicate_type != COSIGN_SIGN_PREDICATE {
                why.push(format!(
                    "an attestation of type {}",
                    statement.predicate_type
                ));
            }
            continue;
        }
        if !statement
            .subject
            .iter()
            .any(|s| s.digest.get("sha256").map(String::as_str) == Some(hex))
        {
            why.push("an attestation about another image".into());
            continue;
        }
        found.push((who, statement.predicate));
    }
    if found.is_empty() {
        Err(VerifyError::NoMatch(if why.is_empty() {
            format!("no {predicate_type} attestation")
        } else {
            distinct(&why)
        }))
    } else {
        Ok(found)
    }
}

/// `why`, each reason once, in order, joined with `; ` (a registry can list the same bad
/// signature many times; the denial says it once).
fn distinct(why: &[String]) -> String {
    let mut seen = std::collections::HashSet::new();
    why.iter()
        .filter(|w| seen.insert(w.as_str()))
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _},
    };

    use super::*;

    const DIGEST: &str = "sha256:0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a09080706050403020100f";

    /// A P-256 key pair, the public half as SPKI PEM (what `cosign generate-key-pair` writes).
    fn key() -> (EcdsaKeyPair, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        // SubjectPublicKeyInfo for id-ecPublicKey / prime256v1, then the uncompressed point.
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            B64.encode(spki)
        );
        (pair, pem.into_bytes())
    }

    fn pem(spki: &[u8]) -> Vec<u8> {
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            B64.encode(spki)
        )
        .into_bytes()
    }

    #[test]
    fn p384_and_ed25519_keys_verify_and_never_stand_in_for_each_other() {
        use ring::signature::{ECDSA_P384_SHA384_ASN1_SIGNING, Ed25519KeyPair};
        let rng = SystemRandom::new();
        let msg = b"payload";
        // ECDSA P-384 (SHA-384), as KMS keys often are.
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &rng).expect("key");
        let p384 = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let mut spki = vec![
            0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
        ];
        spki.extend_from_slice(p384.public_key().as_ref());
        let p384_key = Signer::Key(pem(&spki));
        p384_key.validate().expect("valid P-384 key");
        let p384_sig = p384.sign(&rng, msg).expect("sign");
        // Ed25519.
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let ed = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(ed.public_key().as_ref());
        let ed_key = Signer::Key(pem(&spki));
        let ed_sig = ed.sign(msg);
        let none = BTreeMap::new();
        assert!(p384_key.check(&none, msg, p384_sig.as_ref()).is_ok());
        assert!(ed_key.check(&none, msg, ed_sig.as_ref()).is_ok());
        // Each key refuses the other's signature, a changed message, and a P-256 signature.
        assert!(p384_key.check(&none, msg, ed_sig.as_ref()).is_err());
        assert!(ed_key.check(&none, msg, p384_sig.as_ref()).is_err());
        assert!(p384_key.check(&none, b"other", p384_sig.as_ref()).is_err());
        assert!(ed_key.check(&none, b"other", ed_sig.as_ref()).is_err());
        let (p256, _) = key();
        let p256_sig = p256.sign(&rng, msg).expect("sign");
        assert!(p384_key.check(&none, msg, p256_sig.as_ref()).is_err());
        assert!(ed_key.check(&none, msg, p256_sig.as_ref()).is_err());
    }

    fn sign(pair: &EcdsaKeyPair, msg: &[u8]) -> String {
        B64.encode(pair.sign(&SystemRandom::new(), msg).expect("sign"))
    }

    fn sig_layer(pair: &EcdsaKeyPair, digest: &str) -> Layer {
        let blob = serde_json::json!({"critical": {"identity": {"docker-reference": "r/app"},
            "image": {"docker-manifest-digest": digest}, "type": "cosign container image signature"},
            "optional": null})
        .to_string()
        .into_bytes();
        Layer {
            media_type: SIMPLE_SIGNING.into(),
            annotations: BTreeMap::from([(SIGNATURE_ANNOTATION.into(), sign(pair, &blob))]),
            blob,
        }
    }

    #[test]
    fn signatures_verify_only_with_the_key_and_for_the_digest() {
        let (pair, public) = key();
        let (_, other) = key();
        let layers = [sig_layer(&pair, DIGEST)];
        let who = verify_signatures(&layers, DIGEST, &Signer::Key(public.clone())).expect("signed");
        assert_eq!(who.len(), 1);
        // The same key written with other line breaks is the same signer.
        let rewrapped = String::from_utf8(public.clone())
            .expect("pem")
            .replace('\n', "\r\n");
        assert_eq!(
            verify_signatures(&layers, DIGEST, &Signer::Key(rewrapped.into_bytes())).ok(),
            Some(who)
        );
        let err = verify_signatures(&layers, DIGEST, &Signer::Key(other)).expect_err("wrong key");
        assert!(
            err.to_string().contains("does not verify with the key"),
            "{err}"
        );
        // A valid signature, but for another image.
        let err = verify_signatures(
            &[sig_layer(&pair, "sha256:00")],
            DIGEST,
            &Signer::Key(public.clone()),
        )
        .expect_err("other digest");
        assert!(err.to_string().contains("another image"), "{err}");
        // A payload changed after signing.
        let mut tampered = sig_layer(&pair, DIGEST);
        tampered.blob[10] ^= 1;
        assert!(verify_signatures(&[tampered], DIGEST, &Signer::Key(public.clone())).is_err());
        assert_eq!(
            verify_signatures(&[], DIGEST, &Signer::Key(public)),
            Err(VerifyError::NoMatch("no signature".into()))
        );
        assert!(Signer::Key(b"not a key".to_vec()).validate().is_err());
    }

    fn att_layer(pair: &EcdsaKeyPair, digest_hex: &str, predicate_type: &str) -> Layer {
        let statement = serde_json::json!({"_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": predicate_type,
            "subject": [{"name": "r/app", "digest": {"sha256": digest_hex}}],
            "predicate": {"builder": {"id": "https://ci.example/builder"}}})
        .to_string();
        let payload_type = "application/vnd.in-toto+json";
        let sig = sign(pair, &pae(payload_type, statement.as_bytes()));
        let blob =
            serde_json::json!({"payloadType": payload_type, "payload": B64.encode(&statement),
            "signatures": [{"keyid": "", "sig": sig}]})
            .to_string()
            .into_bytes();
        Layer {
            media_type: DSSE.into(),
            annotations: BTreeMap::new(),
            blob,
        }
    }

    /// A Sigstore bundle (cosign v3's default) around `att_layer`'s envelope.
    fn bundle(pair: &EcdsaKeyPair, digest_hex: &str, predicate_type: &str) -> Vec<u8> {
        let envelope: serde_json::Value =
            serde_json::from_slice(&att_layer(pair, digest_hex, predicate_type).blob).unwrap();
        serde_json::json!({"mediaType": BUNDLE,
            "verificationMaterial": {"publicKey": {"hint": "k"}},
            "dsseEnvelope": envelope})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn bundle_signatures_verify_with_their_key_for_their_digest() {
        let (pair, public) = key();
        let (_, other) = key();
        let hex = "ab".repeat(32);
        let digest = format!("sha256:{hex}");
        let layer = bundle_layer(&bundle(&pair, &hex, COSIGN_SIGN_PREDICATE)).unwrap();
        assert!(
            verify_signatures(
                std::slice::from_ref(&layer),
                &digest,
                &Signer::Key(public.clone())
            )
            .is_ok()
        );
        let err = verify_signatures(std::slice::from_ref(&layer), &digest, &Signer::Key(other))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify with the key"), "{err}");
        let elsewhere = format!("sha256:{}", "cd".repeat(32));
        let err = verify_signatures(
            std::slice::from_ref(&layer),
            &elsewhere,
            &Signer::Key(public.clone()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("about another image"), "{err}");
        // An attestation bundle is not a signature, but is an attestation.
        let att = bundle_layer(&bundle(&pair, &hex, "https://slsa.dev/provenance/v0.2")).unwrap();
        assert!(
            verify_signatures(
                std::slice::from_ref(&att),
                &digest,
                &Signer::Key(public.clone())
            )
            .is_err()
        );
        assert!(
            verify_attestations(
                &[att],
                &digest,
                "https://slsa.dev/provenance/v0.2",
                &Signer::Key(public)
            )
            .is_ok()
        );
        assert!(bundle_layer(br#"{"mediaType": "x", "messageSignature": {}}"#).is_err());
        assert!(bundle_layer(b"not json").is_err());
    }

    #[test]
    fn attestations_need_signer_type_and_subject() {
        let (pair, public) = key();
        let (_, other) = key();
        let hex = DIGEST.trim_start_matches("sha256:");
        let slsa = "https://slsa.dev/provenance/v0.2";
        let layers = [att_layer(&pair, hex, slsa)];
        let found = verify_attestations(&layers, DIGEST, slsa, &Signer::Key(public.clone()))
            .expect("verifies");
        assert_eq!(found[0]["builder"]["id"], "https://ci.example/builder");
        let err = verify_attestations(
            &layers,
            DIGEST,
            "https://spdx.dev/Document",
            &Signer::Key(public.clone()),
        )
        .expect_err("wrong type");
        assert!(
            err.to_string()
                .contains("of type https://slsa.dev/provenance/v0.2"),
            "{err}"
        );
        let err =
            verify_attestations(&layers, DIGEST, slsa, &Signer::Key(other)).expect_err("wrong key");
        assert!(
            err.to_string().contains("not signed by this authority"),
            "{err}"
        );
        let err = verify_attestations(
            &[att_layer(&pair, "00ff", slsa)],
            DIGEST,
            slsa,
            &Signer::Key(public),
        )
        .expect_err("other image");
        assert!(err.to_string().contains("another image"), "{err}");
    }

    /// A CA, and a short-lived signing certificate from it in the Fulcio shape: email SAN, the
    /// OIDC issuer extension, code-signing usage. Returns (CA PEM, leaf PEM, leaf signing key).
    fn fulcio_like(subject: &str, issuer: &str) -> (String, String, EcdsaKeyPair) {
        use rcgen::{
            BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
            Issuer, KeyPair, KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer_ca = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        leaf.subject_alt_names = vec![SanType::Rfc822Name(subject.try_into().expect("email"))];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        leaf.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 57264, 1, 1],
            issuer.as_bytes().to_vec(),
        )];
        let leaf_pem = leaf.signed_by(&leaf_key, &issuer_ca).expect("leaf").pem();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &leaf_key.serialize_der(),
            &SystemRandom::new(),
        )
        .expect("signing key");
        (ca_pem, leaf_pem, pair)
    }

    #[test]
    fn keyless_signatures_need_the_ca_and_the_identity() {
        let (ca, leaf, pair) = fulcio_like("dev@example.com", "https://issuer.example");
        let (other_ca, _, _) = fulcio_like("dev@example.com", "https://issuer.example");
        let mut layer = sig_layer(&pair, DIGEST);
        layer
            .annotations
            .insert(CERTIFICATE_ANNOTATION.into(), leaf);
        let layers = [layer];
        let signer = |roots: &str, issuer: &str, subject: &str| Signer::Keyless {
            roots: roots.as_bytes().to_vec(),
            identities: vec![IdentityMatcher {
                issuer: Matcher::Exact(issuer.into()),
                subject: Matcher::pattern(subject).expect("pattern"),
            }],
        };
        assert_eq!(
            verify_signatures(
                &layers,
                DIGEST,
                &signer(&ca, "https://issuer.example", "dev@example.com")
            )
            .map(|who| who.into_iter().collect::<Vec<_>>()),
            Ok(vec![
                "identity https://issuer.example dev@example.com".to_owned()
            ])
        );
        let err = verify_signatures(
            &layers,
            DIGEST,
            &signer(&ca, "https://issuer.example", "eve@example.com"),
        )
        .expect_err("other subject");
        assert!(
            err.to_string().contains("signed by dev@example.com"),
            "{err}"
        );
        let err = verify_signatures(
            &layers,
            DIGEST,
            &signer(&ca, "https://other.example", "dev@example.com"),
        )
        .expect_err("other issuer");
        assert!(
            err.to_string().contains("via https://issuer.example"),
            "{err}"
        );
        let err = verify_signatures(
            &layers,
            DIGEST,
            &signer(&other_ca, "https://issuer.example", "dev@example.com"),
        )
        .expect_err("other CA");
        assert!(err.to_string().contains("does not chain"), "{err}");
        // A key-only signature (no certificate) is not a keyless signature.
        let err = verify_signatures(
            &[sig_layer(&pair, DIGEST)],
            DIGEST,
            &signer(&ca, "https://issuer.example", "dev@example.com"),
        )
        .expect_err("no certificate");
        assert!(err.to_string().contains("no signing certificate"), "{err}");
    }
}
