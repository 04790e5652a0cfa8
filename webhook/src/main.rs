//! `palisade-webhook --config FILE`: the admission webhook server; `--version` prints the build.
//! Logs (including one security event per decision, target `palisade::security`) are JSON lines
//! on stderr, or text with `PALISADE_LOG_FORMAT=text`.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::FutureExt;
use kube::Client;
use palisade_webhook::{
    cluster::{ApiPullSecrets, ClusterFacts},
    config::Config,
    config::TlsSource,
    identity::IdentitySource,
    images::{check::ImageVerifier, registry::Registry},
    secrets::SecretsPolicy,
    server::{AppState, router, serve_tls},
    tls::{ReloadingCert, ServingCert, SvidCert},
};

fn main() -> ExitCode {
    let status = serve();
    // The log's buffered lines, before the process ends.
    palisade_webhook::log::flush();
    status
}

fn serve() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["--version"] {
        let (version, commit) = palisade_webhook::VERSION;
        println!("palisade-webhook {version} (commit {commit})");
        return ExitCode::SUCCESS;
    }
    palisade_webhook::init_logging();
    let [flag, path] = args.as_slice() else {
        eprintln!("usage: palisade-webhook --config FILE | --version");
        return ExitCode::from(2);
    };
    if flag != "--config" {
        eprintln!("usage: palisade-webhook --config FILE | --version");
        return ExitCode::from(2);
    }
    let config = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| Config::parse(&t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("palisade-webhook: invalid configuration {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade-webhook: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "webhook stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // The certificate comes first: without one there is nothing to serve.
    let (cert, _cert_task): (Arc<ServingCert>, _) = match config.tls.source() {
        Ok(TlsSource::Files(files)) => {
            let files = ReloadingCert::new(files)?;
            (
                files.serving(),
                files.spawn_reloader(Duration::from_secs(2)),
            )
        }
        Ok(TlsSource::WorkloadApi(endpoint)) => {
            let svid = SvidCert::connect(&endpoint, Duration::from_mins(1)).await?;
            (svid.serving(), svid.spawn_follower())
        }
        Err(e) => return Err(e.into()),
    };
    let secrets = SecretsPolicy::new()?;
    let client = Client::try_default().await?;
    let facts = ClusterFacts::start(
        client.clone(),
        config.identity_source == IdentitySource::Spire,
        Duration::from_secs(config.images.material_refresh_seconds),
    )
    .await?;
    // The HTTP client behind registry calls uses the process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let verifier = ImageVerifier::new(
        Registry::with_cas(
            &config.images.insecure_registries,
            &registry_cas(&config.images.registry_ca_files)?,
        )?,
        Duration::from_secs(config.images.cache_ttl_seconds),
        Duration::from_secs(config.images.negative_cache_ttl_seconds),
    )
    .with_pull_secrets(Arc::new(ApiPullSecrets(client.clone())));
    let status_writer = Arc::clone(&facts);
    let state = Arc::new(AppState {
        secrets,
        facts,
        images: Some(Arc::new(verifier)),
        permits: tokio::sync::Semaphore::new(64),
        counters: palisade_webhook::server::Counters::default(),
        config: config.clone(),
    });
    let _ = state.counters.certificate.set(Arc::clone(&cert));
    if config.policy_reports.enabled {
        tokio::spawn(palisade_webhook::scan::run(
            client.clone(),
            Arc::clone(&state),
            Duration::from_secs(config.policy_reports.interval_seconds.max(1)),
        ));
    }
    let (start_drain, draining) = tokio::sync::watch::channel(false);
    let shutdown = {
        let state = Arc::clone(&state);
        let drain = Duration::from_secs(config.drain_seconds);
        async move {
            shutdown_signal().await;
            // Not ready any more, but still serving: endpoints and the API server's connections
            // move to the other replicas meanwhile, and a late request still gets an answer.
            state.counters.draining.store(true, Ordering::Relaxed);
            // Clients are told to leave with their next answer (HTTP/1.1) or at once (HTTP/2).
            let _ = start_drain.send(true);
            tracing::info!(
                seconds = drain.as_secs(),
                "draining: not ready, still serving"
            );
            tokio::time::sleep(drain).await;
        }
        .shared()
    };
    let lease = tokio::spawn(palisade_lease::follow(
        client.clone(),
        config.leader_election.clone(),
        palisade_lease::identity("palisade-webhook"),
        status_writer.leading_flag(),
        {
            let facts = Arc::clone(&status_writer);
            move || {
                let facts = Arc::clone(&facts);
                tokio::spawn(async move { facts.write_all_status().await });
            }
        },
        shutdown.clone(),
    ));
    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr, Arc::clone(&state), shutdown.clone()).await?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, "serving admission reviews");
    let client_roots = client_roots(&config)?;
    serve_tls(
        listener,
        cert,
        router(state),
        draining,
        shutdown,
        client_roots,
    )
    .await?;
    // Give the Lease up, so a standby writes status at once rather than when it runs out.
    let _ = tokio::time::timeout(Duration::from_secs(5), lease).await;
    Ok(())
}

/// The CA of `tls.clientCAFile`, re-read every 2 s, when one is configured.
fn client_roots(config: &Config) -> anyhow::Result<Option<Arc<palisade_webhook::tls::ClientCa>>> {
    let Some(path) = &config.tls.client_ca_file else {
        return Ok(None);
    };
    let ca = Arc::new(palisade_webhook::tls::ClientCa::load(path.clone())?);
    let _reloader = ca.spawn_reloader(Duration::from_secs(2));
    tracing::info!("serving only clients with a certificate from tls.clientCAFile");
    Ok(Some(ca))
}

/// Serves `/metrics` on `addr` over plain HTTP, with the limits of
/// [`palisade_webhook::server::metrics_limits`], until `stop` resolves; the bind happens here,
/// so a taken port stops the start.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    state: Arc<AppState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(listen = %addr, "serving /metrics");
    let app = palisade_webhook::server::metrics_router(state);
    tokio::spawn(palisade_webhook::server::serve_plain(
        metrics,
        app,
        stop,
        palisade_webhook::server::metrics_limits(),
    ));
    Ok(())
}

/// The CA bundles of `images.registryCAFiles`, read once at start.
fn registry_cas(
    files: &std::collections::BTreeMap<String, std::path::PathBuf>,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    files
        .iter()
        .map(|(host, path)| {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!(
                    "images.registryCAFiles: cannot read {} for {host}: {e}",
                    path.display()
                )
            })?;
            Ok((host.clone(), pem))
        })
        .collect()
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
