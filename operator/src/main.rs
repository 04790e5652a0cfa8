//! `palisade-operator [--config FILE]`: reconciles AuthPolicies, RateLimitPolicies and
//! SecretBindings. `palisade-operator --config FILE --vault-policy` prints the Vault policy the
//! operator's own Vault login role needs for that configuration, and exits.
//! `--version` prints the build. Logs are JSON lines on stderr, or text with
//! `PALISADE_LOG_FORMAT=text` (`RUST_LOG` filters them); SIGINT/SIGTERM stop it gracefully.

use std::{path::PathBuf, process::ExitCode};

use palisade_operator::config::Config;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["--version"] {
        let (version, commit) = palisade_operator::VERSION;
        println!("palisade-operator {version} (commit {commit})");
        return ExitCode::SUCCESS;
    }
    palisade_operator::init_logging();
    let config = match args.as_slice() {
        [] => Config::default(),
        [flag, path] if flag == "--config" => match Config::load(&PathBuf::from(path)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("palisade-operator: {e}");
                return ExitCode::from(2);
            }
        },
        [flag, path, print] if flag == "--config" && print == "--vault-policy" => {
            return match Config::load(&PathBuf::from(path)) {
                Ok(Config { vault: Some(v), .. }) => {
                    print!("{}", v.operator_policy());
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("palisade-operator: {path} has no vault section");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("palisade-operator: {e}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {
            eprintln!("usage: palisade-operator [--config FILE [--vault-policy]] | --version");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade-operator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let client = kube::Client::try_default().await?;
        palisade_operator::run::run(client, config, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "operator stopped");
            ExitCode::FAILURE
        }
    }
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
