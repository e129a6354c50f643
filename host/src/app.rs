//! Assembles a running host from a configuration, in the order that loses
//! nothing: the ledger and plugins first, then the listener, and only once
//! the listener accepts, the event source's registration (the 2017
//! framework registered first and dropped what arrived before its server
//! was up).
//!
//! This is the one place that names concrete implementations: the redb
//! ledger and the Nutanix source. Everything it hands them to uses the
//! interfaces (`ledger::Ledger`, `source::EventSource`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::{AdminConfig, Config, StorageBackend};
use crate::dispatch::{DispatchOptions, Dispatcher};
use crate::ledger::{
    JetStreamLedger, JetStreamOptions, Jitter, LedgerOptions, RedbLedger, RetryPolicy, SharedLedger,
};
use crate::listener::{self, Ingest};
use crate::nutanix::NutanixSource;
use crate::registry::Registry;
use crate::reload::{self, Reloader, Report};
use crate::runtime::kv_store::KvStore;
use crate::runtime::{Runtime, RuntimeOptions};
use crate::secret::Secret;
use crate::serve::{self, ServeLimits};
use crate::source::{EndpointStatus, EventSource, SourceContext};
use crate::telemetry::{HandleDurations, ListenerStats};

/// Shorter admin tokens are refused: the API can replay and drop events.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// The admin API's token, read and checked: long enough, and spelled so
/// that a client can send it (`Authorization: Bearer` takes visible ASCII,
/// and spaces around it would be lost on the way).
pub fn admin_token(admin: &AdminConfig) -> anyhow::Result<Option<Secret>> {
    let Some(source) = &admin.token else {
        return Ok(None);
    };
    let token = source.resolve().context("reading `admin.token`")?;
    let text = token.expose();
    if text.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        anyhow::bail!(
            "`admin.token` is shorter than {MIN_ADMIN_TOKEN_CHARS} characters; \
             use a long random one (`openssl rand -hex 32`)"
        );
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "`admin.token` holds a space or a character beyond visible ASCII, which a \
             client cannot send in a header; use a random hex or base64 one"
        );
    }
    Ok(Some(token))
}

pub struct App {
    pub config: Arc<Config>,
    pub listener_addr: SocketAddr,
    pub ledger: SharedLedger,
    pub registry: Registry,
    pub runtime: Arc<Runtime>,
    pub dispatcher: Dispatcher,
    pub reloader: Reloader,
    pub source: Arc<dyn EventSource>,
    pub stats: Arc<ListenerStats>,
    /// Where the admin API listens (the bound port when configured as `:0`).
    pub admin_addr: SocketAddr,
    /// The admin API's view of this host; its `ready` flag is the
    /// listener's `accepting`.
    pub admin: AdminState,
    /// Reports of the first plugin load.
    pub loaded: Vec<Report>,
    accepting: Arc<AtomicBool>,
    shutdown_admin: tokio::sync::watch::Sender<bool>,
    admin_task: JoinHandle<()>,
    shutdown_listener: tokio::sync::watch::Sender<bool>,
    listener_task: JoinHandle<()>,
    dispatcher_task: JoinHandle<()>,
    reload_task: JoinHandle<()>,
    prune_task: JoinHandle<()>,
    expire_task: JoinHandle<()>,
    watcher: Option<notify::RecommendedWatcher>,
}

impl App {
    pub async fn start(mut config: Config) -> anyhow::Result<App> {
        // Bound first (not yet serving) so that a `:0` port is known before
        // anything derives the callback URL from it.
        let tcp = tokio::net::TcpListener::bind(config.listener.listen)
            .await
            .with_context(|| format!("binding the listener to {}", config.listener.listen))?;
        config.listener.listen = tcp.local_addr()?;
        // The admin port too: a port already taken is a configuration error
        // worth failing on before anything else starts.
        let admin_tcp = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| {
                format!(
                    "binding the admin API to {} (`admin.listen`)",
                    config.admin.listen
                )
            })?;
        config.admin.listen = admin_tcp.local_addr()?;
        let admin_token = admin_token(&config.admin)?;
        let config = Arc::new(config);
        let data = &config.storage.data_dir;
        // The ledger holds every notification's body, kv the plugins'
        // state, and webhook-credentials a password: for this user only.
        crate::secret::create_private_dir(data)
            .with_context(|| format!("creating data directory {}", data.display()))?;
        if !crate::secret::is_private(data).unwrap_or(false) {
            tracing::warn!(
                dir = %data.display(),
                "the data directory is open to other users: it holds every notification's body \
                 and the webhook passwords; make it 0700 (StateDirectoryMode=0700 under systemd)"
            );
        }

        let (ledger, shared_kv) = open_ledger(&config).await?;

        let mut rt_opts = RuntimeOptions::new(data.join("kv.redb"));
        rt_opts.kv = shared_kv;
        rt_opts.cache_dir = Some(data.join("cache"));
        rt_opts.cache_max_bytes = config.plugins.cache_max_mib.saturating_mul(1 << 20);
        rt_opts.tiered = config.plugins.tiered;
        rt_opts.max_file_bytes = config.plugins.max_file_mib.saturating_mul(1 << 20);
        rt_opts.proxy_from_env = config.proxy_from_env;
        let runtime = Runtime::new(rt_opts).context("starting the plugin runtime")?;
        let registry = Registry::default();
        let reload::Started {
            reloader,
            reports: loaded,
            watcher,
            task: reload_task,
        } = reload::start(runtime.clone(), registry.clone(), config.clone())
            .await
            .context("loading plugins")?;

        let handle_durations = HandleDurations::default();
        let dispatcher = Dispatcher::new(
            ledger.clone(),
            registry.clone(),
            DispatchOptions {
                batch_max: config.delivery.batch_max,
                batch_window: config.delivery.batch_window,
                workers_per_plugin: 2,
                quarantine_after: config.delivery.quarantine_after,
                quarantine_pause: config.delivery.quarantine_pause,
                handle_durations: Some(handle_durations.clone()),
            },
        );
        // Retention: delivered events older than the retention period go.
        let prune_task = tokio::spawn({
            let ledger = ledger.clone();
            async move {
                let mut every = tokio::time::interval(Duration::from_secs(300));
                loop {
                    every.tick().await;
                    match ledger.prune().await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(events = n, "pruned delivered events past retention")
                        }
                        Err(e) => tracing::warn!("pruning the ledger failed: {e}"),
                    }
                }
            }
        });
        // Deliveries of a plugin removed for good expire to the dead letters.
        let expiry = config.delivery.removed_plugin_expiry;
        let expire_task = tokio::spawn({
            let dispatcher = dispatcher.clone();
            async move {
                if expiry.is_zero() {
                    return;
                }
                let mut gone_since = HashMap::new();
                let mut every = tokio::time::interval(
                    (expiry / 4).clamp(Duration::from_millis(100), Duration::from_secs(300)),
                );
                loop {
                    every.tick().await;
                    if let Err(e) = dispatcher.expire_removed(&mut gone_since, expiry).await {
                        tracing::warn!("expiring the deliveries of removed plugins failed: {e}");
                    }
                }
            }
        });
        let dispatcher_task = tokio::spawn({
            let d = dispatcher.clone();
            async move { d.run().await }
        });

        let source: Arc<dyn EventSource> =
            Arc::new(NutanixSource::new(config.clone()).context("setting up the clusters")?);
        let accepting = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(ListenerStats::default());
        let ingest = Ingest::new(
            ledger.clone(),
            registry.clone(),
            config.listener.max_body_bytes,
            config.listener.body_read_timeout,
            accepting.clone(),
            stats.clone(),
        );
        let listener_addr = config.listener.listen;
        let (shutdown_listener, mut stop_rx) = tokio::sync::watch::channel(false);
        let app_router = listener::router(source.routes(ingest));
        let tls = match &config.listener.tls {
            Some(files) => Some(
                serve::tls_acceptor(&files.cert, &files.key)
                    .context("setting up `listener.tls`")?,
            ),
            None => None,
        };
        let limits = config.listener.limits();
        let listener_serve = Arc::new(serve::ServeStats::default());
        let listener_task = tokio::spawn({
            let stats = listener_serve.clone();
            async move {
                let stopped = async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                };
                serve::serve("listener", tcp, app_router, tls, limits, stats, stopped).await;
            }
        });
        tracing::info!(addr = %listener_addr, source = source.kind(), "listening for notifications");

        // Only now, with the listener accepting, tell the source's systems
        // where to post.
        source.start(SourceContext {
            subscriptions: registry.watch_subscriptions(),
            inventory: Arc::new(dispatcher.clone()),
            leadership: ledger.leadership(),
        })?;

        let admin = AdminState {
            ledger: ledger.clone(),
            registry: registry.clone(),
            dispatcher: dispatcher.clone(),
            source: source.clone(),
            listener_stats: stats.clone(),
            listener_serve,
            reloader: reloader.clone(),
            runtime: runtime.clone(),
            token: admin_token,
            hosts: config.admin.hosts.clone(),
            ready: accepting.clone(),
            handle_durations,
            body_read_timeout: config.listener.body_read_timeout,
        };
        let admin_addr = config.admin.listen;
        let limits = ServeLimits {
            max_connections: config.admin.max_connections,
            max_connections_per_peer: config.admin.max_connections_per_peer,
            ..config.listener.limits()
        };
        let admin_tls = match &config.admin.tls {
            Some(files) => Some(
                serve::tls_acceptor(&files.cert, &files.key).context("setting up `admin.tls`")?,
            ),
            None => {
                if !admin_addr.ip().is_loopback() {
                    tracing::warn!(addr = %admin_addr, "the admin API listens beyond loopback without TLS: its token crosses the network in the clear (set `admin.tls`)");
                }
                None
            }
        };
        let (shutdown_admin, mut admin_stop) = tokio::sync::watch::channel(false);
        let admin_task = tokio::spawn({
            let admin = admin.clone();
            async move {
                let stopped = async move {
                    let _ = admin_stop.wait_for(|s| *s).await;
                };
                admin::serve(admin, admin_tcp, admin_tls, limits, stopped).await;
            }
        });

        Ok(App {
            config,
            listener_addr,
            ledger,
            registry,
            runtime,
            dispatcher,
            reloader,
            source,
            stats,
            admin_addr,
            admin,
            loaded,
            accepting,
            shutdown_admin,
            admin_task,
            shutdown_listener,
            listener_task,
            dispatcher_task,
            reload_task,
            prune_task,
            expire_task,
            watcher,
        })
    }

    pub fn cluster_status(&self) -> Vec<EndpointStatus> {
        self.source.status()
    }

    /// Returns why, once the ledger's file or the plugins' kv file has
    /// failed for good: the host must stop, and opening the file again
    /// checks and recovers it.
    pub async fn storage_failed(&self) -> String {
        tokio::select! {
            why = self.ledger.failed() => why,
            why = self.runtime.kv().failed() => why,
        }
    }

    /// Stops accepting (503), lets in-flight batches finish up to
    /// `deadline`, optionally removes this host's webhooks, and closes the
    /// ledger.
    pub async fn shutdown(self, deregister: bool, deadline: Duration) -> anyhow::Result<()> {
        self.accepting.store(false, Ordering::Relaxed);
        self.dispatcher.stop();
        // Registration and reconcile stop alongside the batches; removing
        // the webhooks waits for any sync still running, which could
        // re-create them.
        let source = self.source.clone();
        let source_stopped = tokio::spawn(async move { source.stop(deregister).await });
        let mut dispatcher_task = self.dispatcher_task;
        if tokio::time::timeout(deadline, &mut dispatcher_task)
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight batches did not finish within {deadline:?}; they will be redelivered"
            );
            // Stopped, not left running: its calls hold the runtime and the
            // ledger, which close below.
            dispatcher_task.abort();
            let _ = dispatcher_task.await;
        }
        let _ = source_stopped.await;
        let _ = self.shutdown_listener.send(true);
        // `serve` closes what is left after its drain; the ledger must
        // outlive the requests it lets finish.
        let _ =
            tokio::time::timeout(serve::DRAIN + Duration::from_secs(1), self.listener_task).await;
        // The admin API answers (readiness 503) until here; its state holds
        // the reloader, which must be gone before the reload task can end.
        let _ = self.shutdown_admin.send(true);
        let mut admin_task = self.admin_task;
        if tokio::time::timeout(Duration::from_secs(5), &mut admin_task)
            .await
            .is_err()
        {
            // A client holding a connection open must not hold up the exit.
            admin_task.abort();
            let _ = admin_task.await;
        }
        drop(self.admin);
        // Every task holding the runtime or the ledger must be gone before
        // they close, so the same data directory can be opened again.
        self.prune_task.abort();
        let _ = self.prune_task.await;
        self.expire_task.abort();
        let _ = self.expire_task.await;
        drop((self.watcher, self.reloader));
        let _ = self.reload_task.await;
        self.ledger.close().await.context("closing the ledger")?;
        Ok(())
    }
}

/// The ledger the configuration names: the redb file in the data directory, or the JetStream
/// stream of `[storage.jetstream]`; with the latter, the plugins' kv shared by the hosts of that
/// stream (`None`: each host keeps its own, in the data directory).
async fn open_ledger(config: &Config) -> anyhow::Result<(SharedLedger, Option<KvStore>)> {
    let storage = &config.storage;
    let retry = RetryPolicy {
        initial: config.delivery.retry_initial,
        max_delay: config.delivery.retry_max,
        max_attempts: config.delivery.max_attempts,
        max_age: config.delivery.max_age,
        jitter: Jitter::Decorrelated,
    };
    match (storage.backend, &storage.jetstream) {
        (StorageBackend::Jetstream, Some(js)) => {
            let auth = js
                .sign_in()
                .map_err(|(k, m)| anyhow::anyhow!("storage.jetstream.{k}: {m}"))?;
            let opts = JetStreamOptions {
                stream: js.stream.clone(),
                replicas: js.replicas,
                auth,
                tls_ca: js.ca_file.clone(),
                client_name: format!("prismhook {}", config.instance),
                ack_timeout: js.ack_timeout,
                dedupe_window: storage.dedupe_window,
                max_backlog: storage.max_backlog,
                max_bytes: storage.max_ledger_mib.saturating_mul(1 << 20),
                retention: storage.retention,
                retry,
                ..JetStreamOptions::new(js.servers.clone())
            };
            let ledger = JetStreamLedger::open(opts).await.with_context(|| {
                format!(
                    "opening the ledger's JetStream stream `{}` on {}",
                    js.stream,
                    js.servers.join(", ")
                )
            })?;
            let kv = ledger
                .plugin_kv()
                .await
                .context("opening the plugins' kv on JetStream")?;
            Ok((Arc::new(ledger), Some(KvStore::new(Arc::new(kv)))))
        }
        _ => {
            let data = &storage.data_dir;
            let ledger = RedbLedger::open(LedgerOptions {
                path: data.join("ledger.redb"),
                dedupe_window: storage.dedupe_window,
                max_backlog: storage.max_backlog,
                max_file_bytes: storage.max_ledger_mib.saturating_mul(1 << 20),
                retention: storage.retention,
                retry,
            })
            .with_context(|| format!("opening the ledger in {}", data.display()))?;
            Ok((Arc::new(ledger), None))
        }
    }
}
