//! The `prismhook` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use prismhook::app::App;
use prismhook::config::Config;

#[derive(Parser)]
#[command(name = "prismhook", version, about = "Turns Nutanix Prism events into actions on other systems through sandboxed WebAssembly plugins")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: listener, plugins, webhook registration, reconcile.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Remove this host's webhooks from every cluster at shutdown.
        #[arg(long)]
        deregister_on_exit: bool,
        /// Override `listener.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run a VM lifecycle on embedded Prism and PAN-OS simulators and show
    /// the firewall's table after each step.
    Demo {
        /// Directory with paloalto.wasm (default: target/plugins).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Start a simulator on loopback for tests and local runs.
    Sim {
        #[command(subcommand)]
        which: Sim,
    },
    /// Inspect or change this host's webhooks in Prism.
    Webhooks {
        #[command(subcommand)]
        action: WebhookAction,
    },
    /// Validate a configuration file without starting anything.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
}

#[derive(Subcommand)]
enum Sim {
    /// PAN-OS XML API simulator.
    Panos {
        #[arg(long, default_value = prismhook_sim::panos::DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
    /// Nutanix Prism v3 API simulator that delivers webhooks.
    Prism {
        #[arg(long, default_value = prismhook_sim::prism::DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum WebhookAction {
    /// List every webhook of each cluster, marking this host's.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Register or update this host's webhook for the plugins in the
    /// plugins directory, and remove its duplicates.
    Sync {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove this host's webhooks from every cluster.
    Remove {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Parse and check a configuration; exit 1 with the reason if invalid.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum PluginAction {
    /// Load a component and say whether it fits the host's WIT world.
    Check {
        file: PathBuf,
        /// Plugin configuration (JSON) to hand to `init`.
        #[arg(long, default_value = "{}")]
        config: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; logs would drown it.
    let default_level = if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "info" };
    init_tracing(cli.log_format, default_level);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PRISMHOOK_LOG")
        .unwrap_or_else(|_| format!("{default_level},wasmtime=warn,cranelift=warn").into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Run { config, deregister_on_exit, listen } => {
            let mut config = Config::load(&config)?;
            if let Some(l) = listen {
                config.listener.listen = l;
            }
            let app = App::start(config).await?;
            wait_for_signal().await;
            tracing::info!("shutting down: no new notifications accepted; finishing in-flight batches");
            let shutdown = app.shutdown(deregister_on_exit, Duration::from_secs(10));
            tokio::select! {
                r = shutdown => r?,
                _ = wait_for_signal() => {
                    tracing::warn!("second signal: exiting at once; unfinished deliveries will be redelivered");
                    return Ok(std::process::ExitCode::from(130));
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Demo { plugins } => {
            prismhook::demo::run(plugins).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Sim { which: Sim::Panos { listen } } => {
            prismhook_sim::panos::run(listen, Default::default()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Sim { which: Sim::Prism { listen } } => {
            prismhook_sim::prism::run(listen, Default::default()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Webhooks { action } => prismhook::cli::webhooks(action.into()).await,
        Command::Config { action: ConfigAction::Check { file } } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: valid ({} cluster(s), {} plugin setting(s), listener {})",
                    file.display(),
                    c.clusters.len(),
                    c.plugin.len(),
                    c.listener.listen
                );
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(std::process::ExitCode::FAILURE)
            }
        },
        Command::Plugin { action: PluginAction::Check { file, config } } => {
            let config: serde_json::Value = serde_json::from_str(&config).context("--config is not JSON")?;
            prismhook::cli::plugin_check(&file, config).await
        }
    }
}

impl From<WebhookAction> for prismhook::cli::WebhookCommand {
    fn from(a: WebhookAction) -> Self {
        use prismhook::cli::WebhookCommand as W;
        match a {
            WebhookAction::List { config } => W::List(config),
            WebhookAction::Sync { config } => W::Sync(config),
            WebhookAction::Remove { config } => W::Remove(config),
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
