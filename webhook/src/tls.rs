//! Where the serving certificate comes from: a certificate and key on disk, reloaded when both
//! change (cert-manager, a mounted Secret), or an X.509-SVID from the SPIFFE Workload API,
//! replaced whenever the agent rotates it. Either way rustls asks [`ServingCert`] for the current
//! key on every handshake, so a rotation never needs a restart.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::config::TlsFiles;

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("cannot load {path}: {why}")]
    Load {
        /// File.
        path: String,
        /// Cause.
        why: String,
    },
    /// The SPIFFE Workload API gave no usable SVID.
    #[error("no X.509-SVID from the SPIFFE Workload API at {endpoint}: {why}")]
    Svid {
        /// Workload API endpoint.
        endpoint: String,
        /// Cause.
        why: String,
    },
}

/// The certificate rustls serves; swapped atomically by whichever source feeds it.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ServingCert {
    fn new(key: CertifiedKey) -> Self {
        ServingCert {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// When the certificate served now expires (Unix time), if it parses.
    pub fn not_after(&self) -> Option<i64> {
        let chain = self.chain();
        let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// The certificate chain (DER, leaf first) currently served.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.current
            .load()
            .cert
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let err = |path: &PathBuf, why: String| TlsError::Load {
        path: path.display().to_string(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| err(&files.cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&files.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(&files.cert_file, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| err(&files.key_file, e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| err(&files.key_file, e.to_string()))?;
    Ok(CertifiedKey::new(certs, signer))
}

/// Serves the certificate in `files`, reloading it when both files have changed.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    serving: Arc<ServingCert>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    /// Loads the certificate now; fails when it cannot.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let key = load_key(&files)?;
        let stamps = (mtime(&files.cert_file), mtime(&files.key_file));
        Ok(Arc::new(ReloadingCert {
            files,
            serving: Arc::new(ServingCert::new(key)),
            stamps: Mutex::new(stamps),
        }))
    }

    /// What rustls serves.
    pub fn serving(&self) -> Arc<ServingCert> {
        Arc::clone(&self.serving)
    }

    /// Reloads when both files changed since the last load; returns whether it did. A pair that
    /// does not load keeps the current certificate in service.
    pub fn reload_if_changed(&self) -> bool {
        let now = (mtime(&self.files.cert_file), mtime(&self.files.key_file));
        let Ok(mut stamps) = self.stamps.lock() else {
            return false;
        };
        if now.0 == stamps.0 || now.1 == stamps.1 {
            return false;
        }
        match load_key(&self.files) {
            Ok(key) => {
                self.serving.current.store(Arc::new(key));
                *stamps = now;
                tracing::info!("serving certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "new certificate does not load; keeping the current one");
                false
            }
        }
    }

    /// Checks the files every `period` until the task is dropped.
    pub fn spawn_reloader(self: Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                self.reload_if_changed();
            }
        })
    }
}

/// Serves the X.509-SVID the SPIFFE Workload API hands this process, following rotations.
pub struct SvidCert {
    source: spiffe::X509Source,
    serving: Arc<ServingCert>,
}

fn svid_key(svid: &spiffe::X509Svid) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(chain, signer))
}

impl SvidCert {
    /// Connects to the Workload API at `endpoint` (`unix:///path/to/agent.sock`) and waits up to
    /// `wait` for the first SVID; fails (and the webhook does not start) when none arrives.
    pub async fn connect(endpoint: &str, wait: Duration) -> Result<Arc<Self>, TlsError> {
        let err = |why: String| TlsError::Svid {
            endpoint: endpoint.to_string(),
            why,
        };
        let source = tokio::time::timeout(
            wait,
            spiffe::X509SourceBuilder::new().endpoint(endpoint).build(),
        )
        .await
        .map_err(|_| err(format!("nothing within {}s", wait.as_secs())))?
        .map_err(|e| err(e.to_string()))?;
        let svid = source.svid().map_err(|e| err(e.to_string()))?;
        let key = svid_key(&svid).map_err(err)?;
        tracing::info!(spiffe_id = %svid.spiffe_id(), "serving the X.509-SVID from the Workload API");
        Ok(Arc::new(SvidCert {
            source,
            serving: Arc::new(ServingCert::new(key)),
        }))
    }

    /// What rustls serves.
    pub fn serving(&self) -> Arc<ServingCert> {
        Arc::clone(&self.serving)
    }

    /// The SPIFFE ID of the SVID in service.
    pub fn spiffe_id(&self) -> Option<String> {
        self.source.try_svid().map(|s| s.spiffe_id().to_string())
    }

    /// Whether the source can still provide a valid SVID.
    pub fn healthy(&self) -> bool {
        self.source.is_healthy()
    }

    /// Swaps in every rotated SVID until the source closes.
    pub fn spawn_follower(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut updates = self.source.updated();
            while updates.changed().await.is_ok() {
                match self.source.svid().map_err(|e| e.to_string()).and_then(|s| {
                    let id = s.spiffe_id().to_string();
                    svid_key(&s).map(|k| (id, k))
                }) {
                    Ok((id, key)) => {
                        self.serving.current.store(Arc::new(key));
                        tracing::info!(spiffe_id = %id, "X.509-SVID rotated");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rotated SVID unusable; keeping the current one");
                    }
                }
            }
            tracing::warn!("SPIFFE Workload API source closed; the last SVID stays in service");
        })
    }
}

/// The client certificate check of `tls.clientCAFile`, re-read when the file changes, so a
/// rotated API-server client CA is accepted without a restart. A client that presents a
/// certificate must chain it to the current CAs; one that presents none is let through the
/// handshake and answered on the probe paths only (see `server::serve_connection`).
pub struct ClientCa {
    path: Option<PathBuf>,
    current: ArcSwap<ClientVerifier>,
    pem: Mutex<Vec<u8>>,
}

/// One built verifier.
struct ClientVerifier(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl std::fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCa")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn client_verifier(roots: rustls::RootCertStore) -> Result<ClientVerifier, TlsError> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map(ClientVerifier)
    .map_err(|e| TlsError::Load {
        path: "client CA".into(),
        why: e.to_string(),
    })
}

impl ClientCa {
    /// A fixed set of CAs.
    pub fn from_roots(roots: rustls::RootCertStore) -> Result<Self, TlsError> {
        Ok(ClientCa {
            path: None,
            current: ArcSwap::from_pointee(client_verifier(roots)?),
            pem: Mutex::new(Vec::new()),
        })
    }

    /// The CAs in the PEM file at `path`, re-read by [`ClientCa::reload`].
    pub fn load(path: PathBuf) -> Result<Self, TlsError> {
        let pem = std::fs::read(&path).map_err(|e| TlsError::Load {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let roots = crate::config::parse_roots(&path, &pem).map_err(|e| TlsError::Load {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Ok(ClientCa {
            current: ArcSwap::from_pointee(client_verifier(roots)?),
            pem: Mutex::new(pem),
            path: Some(path),
        })
    }

    /// Re-reads the file when its content changed; `Ok(true)` when new CAs are in use. A file
    /// that cannot be read or holds no CA keeps the CAs in use (and says why).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let failed = |why: String| TlsError::Load {
            path: path.display().to_string(),
            why,
        };
        let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
        if *crate::lock(&self.pem) == pem {
            return Ok(false);
        }
        let roots = crate::config::parse_roots(path, &pem).map_err(|e| failed(e.to_string()))?;
        self.current.store(Arc::new(client_verifier(roots)?));
        *crate::lock(&self.pem) = pem;
        Ok(true)
    }

    /// Re-reads the file every `every` until the process ends.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let ca = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match ca.reload() {
                    Ok(true) => tracing::info!("client CA reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "client CA not reloaded; the previous CAs stay in use");
                    }
                }
            }
        })
    }
}

impl rustls::server::danger::ClientCertVerifier for ClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints: the API server presents the certificate it is configured with anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}
