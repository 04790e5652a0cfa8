//! Palisade's operator. Controllers read Palisade objects, call pure translators
//! (spec → desired objects), apply the result and write status.

pub mod certs;
pub mod config;
pub mod controller;
pub mod diff;
pub mod metrics;
pub mod model;
pub mod names;
pub mod run;
#[cfg(feature = "strategies")]
pub mod strategies;
pub mod translate;
pub mod vault;

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
        .with_writer(std::io::stderr);
    if std::env::var("PALISADE_LOG_FORMAT").as_deref() == Ok("text") {
        log.init();
    } else {
        log.json().init();
    }
}
