//! `palisade`: Palisade's translations and admission decisions, offline. Exit status: 0 when
//! everything passes, 1 when a verdict or an expectation fails (a denied manifest, a failed
//! test case, an unenforced part with `--fail-on-unenforced`), 2 for unusable input.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use palisade_cli::{admit, advisories, input, render, sbom, suite, who_can};

/// `<version> (commit <commit>)`, as the operator and the webhook print theirs.
fn version() -> &'static str {
    let (version, commit) = palisade_webhook::VERSION;
    Box::leak(format!("{version} (commit {commit})").into_boxed_str())
}

#[derive(Parser)]
#[command(
    name = "palisade",
    version = version(),
    about = "Palisade, offline: render, admit, who-can, test"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The objects the operator generates for AuthPolicies, RateLimitPolicies and
    /// SecretBindings (Vault policies with --operator-config), with their notes.
    Render {
        /// Files or directories of manifests.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The operator's configuration (translation settings, Vault).
        #[arg(long)]
        operator_config: Option<PathBuf>,
        /// Namespace of objects that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: Output,
        /// Exit 1 when part of a resource would not be enforced (Unsupported notes, refusals).
        #[arg(long)]
        fail_on_unenforced: bool,
    },
    /// The validating webhook's verdict on each manifest with a pod (template) in it, as a
    /// CREATE; Namespace manifests among them give their labels. Image signatures are not
    /// verified offline.
    Admit {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The webhook's configuration (listen and tls may be left out).
        #[arg(long)]
        webhook_config: Option<PathBuf>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: Output,
    },
    /// The AuthPolicies that apply to a workload, how they widen each other, and the decision
    /// on one request (without a token).
    WhoCan {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The workload's namespace.
        #[arg(long)]
        namespace: String,
        /// The workload's pod labels, key=value.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// The caller: namespace/serviceaccount, or plaintext.
        #[arg(long)]
        from: Option<String>,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// HTTP method (with --path); plain TCP without.
        #[arg(long, requires = "path")]
        method: Option<String>,
        #[arg(long, requires = "method")]
        path: Option<String>,
        #[arg(long)]
        operator_config: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: Output,
    },
    /// The components of every running workload's images, from their verified CycloneDX SBOM
    /// attestations; with --package or --advisory, which workloads are affected. Reads the
    /// cluster of the current kubeconfig and the images' registries.
    Sbom(SbomArgs),
    /// Checks the expected outcomes in DIR/palisade-test.yaml.
    Test {
        /// Directories with a palisade-test.yaml.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct SbomArgs {
    /// Only this namespace (default: every namespace).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// A PEM public key the SBOM attestations are signed with (repeatable).
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Workloads containing this package ...
    #[arg(long)]
    package: Option<String>,
    /// ... in this version range (a semver requirement, e.g. "<1.6.1").
    #[arg(long, requires = "package")]
    range: Option<String>,
    /// Workloads affected by this advisory (RUSTSEC-...), from --advisory-db.
    #[arg(long, requires = "advisory_db")]
    advisory: Option<String>,
    /// A RustSec advisory database (a checkout or snapshot with crates/).
    #[arg(long)]
    advisory_db: Option<PathBuf>,
    /// Registries (host:port) read over plain HTTP.
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
    /// A registry whose certificate chains to a private CA: HOST[:PORT]=PEM-FILE (repeatable).
    #[arg(long = "registry-ca", value_name = "HOST=FILE")]
    registry_cas: Vec<String>,
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    output: Output,
}

fn print(output: Output, value: &impl serde::Serialize) -> Result<()> {
    match output {
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

fn operator_config(path: Option<&PathBuf>) -> Result<palisade_operator::config::Config> {
    Ok(match path {
        Some(p) => palisade_operator::config::Config::load(p)
            .with_context(|| format!("{}", p.display()))?,
        None => palisade_operator::config::Config::default(),
    })
}

fn run_sbom(args: SbomArgs) -> Result<bool> {
    let SbomArgs {
        namespace,
        keys,
        package,
        range,
        advisory,
        advisory_db,
        insecure,
        registry_cas,
        output,
    } = args;
    let cas = registry_cas
        .iter()
        .map(|arg| {
            let (host, file) = arg
                .split_once('=')
                .with_context(|| format!("--registry-ca {arg}: not HOST=FILE"))?;
            let pem = std::fs::read(file).with_context(|| format!("--registry-ca {arg}"))?;
            Ok((host.to_owned(), pem))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let keys = keys
        .iter()
        .map(|k| std::fs::read(k).with_context(|| format!("{}", k.display())))
        .collect::<Result<Vec<_>>>()?;
    let range = range
        .map(|r| semver::VersionReq::parse(&r).with_context(|| format!("--range {r}")))
        .transpose()?;
    let question = sbom::Question {
        package: package.map(|p| (p, range)),
        advisory,
    };
    let db = advisory_db
        .map(|p| advisories::Database::load(&p))
        .transpose()?;
    let answers = tokio::runtime::Runtime::new()?.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_default().await?;
        let workloads = sbom::workloads(&client, namespace.as_deref()).await?;
        let registry = palisade_webhook::images::registry::Registry::with_cas(&insecure, &cas)?;
        let mut contents = BTreeMap::new();
        for image in workloads.iter().flat_map(|w| &w.images) {
            if !contents.contains_key(image) {
                let c = sbom::contents(&registry, image, &keys).await;
                contents.insert(image.clone(), c);
            }
        }
        sbom::answer(&workloads, &contents, &question, db.as_ref())
    })?;
    print(output, &answers)?;
    // Exit 1 when a workload is affected, or when its contents are not all known.
    Ok(answers.iter().all(|a| match a.status {
        "not-affected" => true,
        "listed" => a.images.iter().all(|i| i.unknown.is_none()),
        _ => false,
    }))
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Render {
            files,
            operator_config: config,
            namespace,
            output,
            fail_on_unenforced,
        } => {
            let config = operator_config(config.as_ref())?;
            let objects = input::load(&files)?;
            let sections =
                render::render(&objects, &config.context, config.vault.as_ref(), &namespace)?;
            match output {
                Output::Yaml => print!("{}", render::to_yaml(&sections)?),
                Output::Json => print(output, &sections)?,
            }
            Ok(!(fail_on_unenforced && sections.iter().any(render::Section::unenforced)))
        }
        Command::Admit {
            files,
            webhook_config,
            namespace,
            output,
        } => {
            let text = match &webhook_config {
                Some(p) => {
                    Some(std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?)
                }
                None => None,
            };
            let config = admit::config(text.as_deref())?;
            let outcomes = admit::admit(&input::load(&files)?, &config, &namespace)?;
            print(output, &outcomes)?;
            eprintln!("palisade admit: image signatures are not verified offline");
            Ok(outcomes.iter().all(|o| o.verdict != "deny"))
        }
        Command::WhoCan {
            files,
            namespace,
            labels,
            from,
            port,
            method,
            path,
            operator_config: config,
            output,
        } => {
            let config = operator_config(config.as_ref())?;
            let mut parsed = BTreeMap::new();
            for l in &labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("--label {l:?}: write key=value");
                };
                parsed.insert(k.to_owned(), v.to_owned());
            }
            let request = match from {
                Some(f) => Some(who_can::Probe {
                    from: suite::caller(&f)?,
                    port,
                    http: method.zip(path),
                }),
                None => None,
            };
            let query = who_can::Query {
                namespace,
                labels: parsed,
                request,
            };
            let report = who_can::who_can(
                &input::load(&files)?,
                &query,
                &config.context.trust_domain,
                &config.context.mesh_root_namespace,
                "default",
            )?;
            print(output, &report)?;
            Ok(report.allowed != Some(false))
        }
        Command::Sbom(args) => run_sbom(args),
        Command::Test { dirs } => {
            let mut ok = true;
            for dir in dirs {
                for r in suite::run(&dir)? {
                    match &r.failure {
                        None => println!("PASS {}: {}", dir.display(), r.name),
                        Some(why) => {
                            ok = false;
                            println!("FAIL {}: {}: {why}", dir.display(), r.name);
                        }
                    }
                }
            }
            Ok(ok)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("palisade: {e:#}");
            ExitCode::from(2)
        }
    }
}
