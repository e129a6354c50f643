//! The `prismhook` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use prismhook::admin::client as admin;
use prismhook::app::App;
use prismhook::config::Config;

#[derive(Parser)]
#[command(
    name = "prismhook",
    version,
    about = "Turns Nutanix Prism events into actions on other systems through sandboxed WebAssembly plugins"
)]
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
        /// Remove this host's webhooks from every cluster at shutdown (not
        /// for hosts that share one URL: theirs is the service's webhook).
        #[arg(long)]
        deregister_on_exit: bool,
        /// Override `listener.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override `admin.listen`.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Override `storage.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override `plugins.dir`.
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
    },
    /// Run a VM lifecycle on embedded Prism and PAN-OS simulators and show
    /// the firewall's table after each step.
    #[cfg(feature = "simulators")]
    Demo {
        /// Directory with paloalto.wasm (default: target/plugins).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Start a simulator on loopback for tests and local runs.
    #[cfg(feature = "simulators")]
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
    /// The running host's plugins (through its admin API).
    Plugins {
        #[command(subcommand)]
        action: PluginsAction,
    },
    /// The running host's clusters and their webhooks (admin API).
    Clusters {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The prismhook hosts sharing the running host's ledger (admin API).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Dead letters of the running host (admin API).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Deliver a plugin's events received since a time again (admin API).
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        plugin: String,
        /// An RFC 3339 time (2024-05-01T12:00:00Z) or a duration before now (1h).
        #[arg(long)]
        since: String,
    },
    /// Hand every plugin the clusters' VM inventory now (admin API).
    Reconcile {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
    },
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Each plugin: version, file hash, state, subscriptions and counts.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rescan the plugins directory now.
    Reload {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Each host: its partitions, their undelivered deliveries, and which host leads.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters by plugin and event id, without their bodies.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        plugin: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Make dead letters pending again (all of them, a plugin's, or by event id).
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        plugin: Option<String>,
        ids: Vec<u64>,
    },
    /// Delete dead letters for good: a plugin's, by event id, or `--all`.
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        plugin: Option<String>,
        ids: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
}

#[cfg(feature = "simulators")]
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
    /// F5 BIG-IP iControl REST simulator (LTM pool members).
    Bigip {
        #[arg(long, default_value = prismhook_sim::bigip::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// A pool that exists from the start (`web` or `/Tenant/web`); repeatable.
        #[arg(long = "pool")]
        pools: Vec<String>,
    },
    /// Cisco Secure FMC REST simulator (dynamic objects and their mappings).
    Fmc {
        #[arg(long, default_value = prismhook_sim::fmc::DEFAULT_LISTEN)]
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
    /// Parse a configuration and read what it names (secrets, TLS
    /// certificates and keys); exit 1 with every problem found.
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
    /// Write a minimal working plugin skeleton into DIR/NAME.
    New {
        /// The plugin's name: lower case, digits and `-`.
        name: String,
        #[arg(long, value_enum)]
        lang: NewLang,
        /// Parent directory of the new plugin's directory.
        #[arg(long, default_value = "plugins")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum NewLang {
    Rust,
    Python,
    Js,
    Go,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; logs would drown it.
    #[cfg(feature = "simulators")]
    let quiet = matches!(cli.command, Command::Demo { .. });
    #[cfg(not(feature = "simulators"))]
    let quiet = false;
    let default_level = if quiet { "warn" } else { "info" };
    init_tracing(cli.log_format, default_level);
    prismhook::serve::bound_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Run {
            config,
            deregister_on_exit,
            listen,
            admin_listen,
            data_dir,
            plugins_dir,
        } => {
            // Flags win over the environment, which wins over the file.
            let config = Config::load_adjusted(&config, |config| {
                if let Some(l) = listen {
                    config.listener.listen = l;
                }
                if let Some(l) = admin_listen {
                    config.admin.listen = l;
                }
                if let Some(d) = data_dir {
                    config.storage.data_dir = d;
                }
                if let Some(d) = plugins_dir {
                    config.plugins.dir = d;
                }
            })?;
            prismhook::serve::raise_open_files_limit();
            prismhook::serve::fail_writes_past_the_file_size_limit();
            // Before the start, so that a SIGHUP during it does not end the
            // process (its default action).
            let hangup = Hangup::listen();
            let app = App::start(config).await?;
            #[cfg(unix)]
            prismhook::systemd::ready(&serving(&app));
            let storage_failed = serve_until_signal(&app, hangup).await;
            #[cfg(unix)]
            prismhook::systemd::stopping();
            if let Some(why) = &storage_failed {
                tracing::error!("stopping, so that the service manager starts the host again and the failed file is checked and recovered: {why}");
            }
            tracing::info!(
                "shutting down: no new notifications accepted; finishing in-flight batches"
            );
            // A stop for a restart keeps the webhooks it will serve again.
            let deregister = deregister_on_exit && storage_failed.is_none();
            let shutdown = app.shutdown(deregister, Duration::from_secs(10));
            tokio::select! {
                r = shutdown => r?,
                _ = wait_for_signal() => {
                    tracing::warn!("second signal: exiting at once; unfinished deliveries will be redelivered");
                    return Ok(std::process::ExitCode::from(130));
                }
            }
            if storage_failed.is_some() {
                return Ok(std::process::ExitCode::FAILURE);
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "simulators")]
        Command::Demo { plugins } => {
            prismhook::demo::run(plugins).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "simulators")]
        Command::Sim {
            which: Sim::Panos { listen },
        } => {
            prismhook_sim::panos::run(listen, Default::default()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "simulators")]
        Command::Sim {
            which: Sim::Prism { listen },
        } => {
            prismhook_sim::prism::run(listen, Default::default()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "simulators")]
        Command::Sim {
            which: Sim::Bigip { listen, pools },
        } => {
            let config = prismhook_sim::bigip::BigipConfig {
                pools,
                ..Default::default()
            };
            prismhook_sim::bigip::run(listen, config).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "simulators")]
        Command::Sim {
            which: Sim::Fmc { listen },
        } => {
            prismhook_sim::fmc::run(listen, Default::default()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Webhooks { action } => prismhook::cli::webhooks(action.into()).await,
        Command::Config {
            action: ConfigAction::Check { file },
        } => Ok(prismhook::cli::config_check(&file)),
        Command::Plugin {
            action: PluginAction::Check { file, config },
        } => {
            let config: serde_json::Value =
                serde_json::from_str(&config).context("--config is not JSON")?;
            prismhook::cli::plugin_check(&file, config).await
        }
        Command::Plugin {
            action: PluginAction::New { name, lang, dir },
        } => {
            let lang = match lang {
                NewLang::Rust => prismhook::scaffold::Lang::Rust,
                NewLang::Python => prismhook::scaffold::Lang::Python,
                NewLang::Js => prismhook::scaffold::Lang::JavaScript,
                NewLang::Go => prismhook::scaffold::Lang::Go,
            };
            prismhook::cli::plugin_new(&dir, &name, lang)
        }
        Command::Plugins { action } => Ok(match action {
            PluginsAction::List { config } => {
                admin::plugins_list(&Config::load(&config)?).await?;
                std::process::ExitCode::SUCCESS
            }
            // Scripts and the unit's ExecReload see a failed load.
            PluginsAction::Reload { config } => {
                match admin::plugins_reload(&Config::load(&config)?).await? {
                    true => std::process::ExitCode::SUCCESS,
                    false => std::process::ExitCode::FAILURE,
                }
            }
        }),
        Command::Clusters { config } => {
            admin::clusters_list(&Config::load(&config)?).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Cluster {
            action: ClusterAction::Status { config },
        } => {
            admin::cluster_status(&Config::load(&config)?).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Dlq { action } => {
            match action {
                DlqAction::List {
                    config,
                    plugin,
                    limit,
                } => admin::dlq_list(&Config::load(&config)?, plugin.as_deref(), limit).await?,
                DlqAction::Replay {
                    config,
                    plugin,
                    ids,
                } => admin::dlq_replay(&Config::load(&config)?, plugin.as_deref(), &ids).await?,
                DlqAction::Drop {
                    config,
                    plugin,
                    ids,
                    all,
                } => admin::dlq_drop(&Config::load(&config)?, plugin.as_deref(), &ids, all).await?,
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            plugin,
            since,
        } => {
            admin::replay(&Config::load(&config)?, &plugin, &since).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Reconcile { config, cluster } => {
            admin::reconcile(&Config::load(&config)?, cluster.as_deref()).await?;
            Ok(std::process::ExitCode::SUCCESS)
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

/// SIGHUP, caught from the moment it is listened for.
struct Hangup(#[cfg(unix)] tokio::signal::unix::Signal);

impl Hangup {
    fn listen() -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Hangup(signal(SignalKind::hangup()).expect("SIGHUP handler"))
        }
        #[cfg(not(unix))]
        Hangup()
    }
}

/// Returns at SIGTERM or Ctrl-C, or with why once the ledger's or the
/// plugins' kv file has failed for good. SIGHUP (`systemctl reload`) reloads the plugins meanwhile,
/// taking the main configuration's `[plugin.*]` tables as its file is now,
/// as `prismhook plugins reload` does.
async fn serve_until_signal(app: &App, hangup: Hangup) -> Option<String> {
    #[cfg(unix)]
    {
        let Hangup(mut hangup) = hangup;
        let stop = wait_for_signal();
        tokio::pin!(stop);
        let failed = app.storage_failed();
        tokio::pin!(failed);
        loop {
            tokio::select! {
                () = &mut stop => return None,
                why = &mut failed => return Some(why),
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the plugins and the main configuration's plugin settings");
                    prismhook::systemd::reloading();
                    app.reloader.reload().await;
                    prismhook::systemd::ready(&serving(app));
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = hangup;
        tokio::select! {
            () = wait_for_signal() => None,
            why = app.storage_failed() => Some(why),
        }
    }
}

/// What the service manager shows as the host's status.
#[cfg(unix)]
fn serving(app: &App) -> String {
    let loaded = app
        .registry
        .snapshot()
        .values()
        .filter(|e| e.plugin.is_some())
        .count();
    format!(
        "listening on {}; {loaded} plugin(s) loaded",
        app.listener_addr
    )
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
