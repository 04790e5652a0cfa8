//! Palisade's admission webhook. Every check reads the pod through [`workload`] (Pods and the
//! pod templates of every workload kind) and its containers through [`pods`] (init, regular and
//! ephemeral), so no kind of object or container escapes a check.

pub mod cluster;
pub mod config;
pub mod decide;
pub mod identity;
pub mod images;
pub mod log;
pub mod metrics;
pub mod pods;
pub mod report;
pub mod review;
pub mod scan;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod workload;

/// This build's version (the crate version) and source commit (`PALISADE_COMMIT` at build time;
/// `unknown` without it), printed by `--version` and exported as the build-info metric.
pub const VERSION: (&str, &str) = (
    env!("CARGO_PKG_VERSION"),
    match option_env!("PALISADE_COMMIT") {
        Some(c) => c,
        None => "unknown",
    },
);

/// Starts the log: JSON lines on stderr, or human-readable text with `PALISADE_LOG_FORMAT=text`;
/// `RUST_LOG` filters (default `info,kube=warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(log::stderr());
    if std::env::var("PALISADE_LOG_FORMAT").as_deref() == Ok("text") {
        log.init();
    } else {
        log.json().init();
    }
    // A panic's message comes after the lines that led to it.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        log::flush();
        report(info);
    }));
}

/// Why a fact could not be read from the cluster (a namespace, a Secret or ConfigMap key).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FactError {
    /// A namespace the cache does not know, with no live source to ask.
    #[error("namespace {0} is not in the webhook's cache")]
    NotCached(String),
    /// The object does not exist (`Secret ns/name`, `namespace x`).
    #[error("{0} does not exist")]
    Missing(String),
    /// The object exists without the key.
    #[error("{object} has no key {key}")]
    NoKey {
        /// `Secret ns/name` or `ConfigMap ns/name`.
        object: String,
        /// The key.
        key: String,
    },
    /// Not read yet (the refresher has not reached it).
    #[error("{0} not read yet")]
    NotReadYet(String),
    /// The API server refused or failed the read.
    #[error("cannot read {object}: {why}")]
    Api {
        /// What was read.
        object: String,
        /// The client's error.
        why: String,
    },
}

/// The guarded value even if another thread panicked while holding the lock. Every map the
/// webhook guards stays consistent between statements, and refusing to read it (an empty
/// policy list, say) would fail open.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
