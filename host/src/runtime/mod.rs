//! The sandbox: compiles plugin components, links them against the host's
//! imports, and runs each call in a fresh, bounded Store.
//!
//! One [`Runtime`] holds the wasmtime `Engine` and `Linker` (built once) and
//! the call environment every call shares (`state::CallEnv`: the kv store,
//! the outbound HTTP client, counters). Each loaded [`Plugin`] (`plugin.rs`)
//! keeps an `InstancePre`, its exports' indices and the call environment,
//! so a call costs one instantiation from the pooling allocator (and a WASI
//! context only if it calls WASI): a trap cannot poison the next call,
//! because nothing of the trapped instance survives it.
//!
//! Compilation is tiered when the runtime is built with `tiered`: a file the
//! cache does not know is first compiled by Winch, a baseline compiler 5-6
//! times faster than Cranelift whose code runs 1.1-1.5 times slower for the
//! shipped plugins, so a new plugin serves within milliseconds of being
//! dropped in. An [`Optimizer`] then compiles it with Cranelift on a thread
//! of its own, and [`Runtime::upgrade`] makes a plugin of that code to swap
//! in. Both tiers run the same sandbox: the same imports, limits and epoch
//! deadlines.
//!
//! A plugin whose `init` called no import at its load can then be
//! pre-initialised ([`Runtime::pre_initialise`], `snapshot.rs`): its calls
//! start a fresh instance of the component as `init` left it, and skip
//! `init`. Like Cranelift's code, the reload task swaps it in when ready.

pub mod bindings;
mod cache;
mod clusters;
pub mod feed;
pub mod file;
mod host;
pub mod kv_store;
mod plugin;
pub mod scrub;
mod session;
mod snapshot;
mod state;
pub use clusters::VmClusters;
pub use state::OutboundCounts;
mod stdio;

use plugin::Linked;
pub use plugin::Plugin;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, ComponentExportIndex, HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Strategy,
};

use bindings::{PluginIndices, PluginInfo};
use feed::FeedError;
use kv_store::KvStore;
use prismhook_core::config::valid_plugin_name;
pub use prismhook_core::config::PluginSettings;
pub use prismhook_core::limits::{self, LimitOverrides, Limits};
pub use prismhook_core::policy::{self, OutboundPolicy, TlsMode};
use state::{CallEnv, HostCalls, HostState, PluginIdentity};

/// How often the engine's epoch advances; the granularity of deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Why a plugin file could not be loaded. Each says what was expected and
/// what was found.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    File(#[from] file::FileError),
    #[error("{file}: not a WebAssembly file (expected the bytes `\\0asm`, found {found})")]
    NotWasm { file: PathBuf, found: String },
    #[error(
        "{file}: a core WebAssembly module, not a component; turn it into a component \
         (wit-component with the WASI preview1 adapter, as `cargo xtask plugins` does)"
    )]
    CoreModule { file: PathBuf },
    #[error("{file}: invalid component: {reason}")]
    Invalid { file: PathBuf, reason: String },
    #[error(
        "{file}: does not fit the host's world {}: {reason}",
        bindings::PACKAGE
    )]
    WorldMismatch { file: PathBuf, reason: String },
    #[error("{file}: sha256 is {found}, but the configuration pins {expected}")]
    HashMismatch {
        file: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{file}: init failed: {source}")]
    Init { file: PathBuf, source: CallError },
    #[error("{file}: init refused the configuration: {message}")]
    InitRefused { file: PathBuf, message: String },
    #[error("{file}: plugin name `{name}` is invalid (use lower case letters, digits and `-`)")]
    BadName { file: PathBuf, name: String },
    #[error(
        "{file}: subscription {subscription} is not an event type (`KIND.ACTION`), `KIND.*` or `*`"
    )]
    BadSubscription { file: PathBuf, subscription: String },
    #[error("{file}: tls: {reason}")]
    Tls { file: PathBuf, reason: String },
}

/// Why one call into a plugin failed. Every variant counts as `retry` for
/// the events of the call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("plugin `{plugin}` trapped in {export}: {message}")]
    Trap {
        plugin: String,
        export: &'static str,
        message: String,
    },
    #[error("plugin `{plugin}` exceeded its deadline of {deadline:?} in {export}")]
    Timeout {
        plugin: String,
        export: &'static str,
        deadline: Duration,
    },
    #[error("plugin `{plugin}` exceeded its memory limit of {limit_mib} MiB in {export}")]
    Memory {
        plugin: String,
        export: &'static str,
        limit_mib: usize,
    },
    #[error("plugin `{plugin}` refused its configuration in init: {message}")]
    Init { plugin: String, message: String },
    #[error("plugin `{plugin}` returned {got} outcomes for {expected} events")]
    OutcomeCount {
        plugin: String,
        expected: usize,
        got: usize,
    },
    /// The host could not store the call's kv writes, so the call's
    /// outcomes are void; `failure` says whose doing that was.
    #[error("plugin `{plugin}`: its kv writes could not be stored: {message}")]
    Kv {
        plugin: String,
        message: String,
        failure: KvFailure,
    },
    /// The host's listing broke off under a paged reconcile: not the
    /// plugin's doing, and nothing it wrote is kept.
    #[error("plugin `{plugin}` was not handed a whole inventory: {reason}")]
    Inventory { plugin: String, reason: FeedError },
}

/// Why a call's kv writes were not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFailure {
    /// Not the plugin's doing: this host's copy of the kv was behind a
    /// write. A key the call read was written since, by another call or
    /// host, so its writes were refused; made again once this host has
    /// read that write, the call reads it.
    Conflict,
    /// Not the plugin's doing: the store did not take the writes (a NATS
    /// cluster electing a leader, a write not read back in time, a kv file
    /// that failed, which stops the host), or this
    /// host had not read its own writes back when the call was to start
    /// (the call was not made). The events wait for the store, at no cost
    /// to their attempts.
    Unavailable,
    /// The writes themselves were refused, as they would be each time:
    /// they would take the plugin's kv past `limits.kv_mib`, a message was
    /// over the store's size limit, or storing them panicked. The events
    /// are retried like a failed call's, and die in the end.
    Refused,
}

impl CallError {
    /// The call's kv writes were not stored because of `error`.
    pub fn kv(plugin: String, error: &kv_store::KvError) -> CallError {
        use kv_store::KvError;
        let failure = match error {
            KvError::Conflict(_) => KvFailure::Conflict,
            KvError::Storage(_) | KvError::FileFailed(_) => KvFailure::Unavailable,
            _ => KvFailure::Refused,
        };
        CallError::Kv {
            plugin,
            message: error.to_string(),
            failure,
        }
    }

    /// A short machine-friendly label for metrics and status.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Trap { .. } => "trap",
            CallError::Timeout { .. } => "timeout",
            CallError::Memory { .. } => "memory",
            CallError::Init { .. } => "init",
            CallError::OutcomeCount { .. } => "outcome-count",
            CallError::Kv {
                failure: KvFailure::Conflict,
                ..
            } => "kv-conflict",
            CallError::Kv {
                failure: KvFailure::Unavailable,
                ..
            } => "kv-unavailable",
            CallError::Kv { .. } => "kv",
            CallError::Inventory { .. } => "inventory",
        }
    }
}

/// Process-wide options of the sandbox.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where plugin kv data lives (a redb file), unless `kv` is given.
    pub kv_path: PathBuf,
    /// A store shared with other hosts, used instead of the file at `kv_path`.
    pub kv: Option<KvStore>,
    /// Largest linear memory any plugin may have; per-plugin limits are
    /// checked below this by the Store's limiter.
    pub max_memory_bytes: usize,
    /// Instances that can exist at once (concurrent calls over all plugins).
    pub max_instances: u32,
    /// Where compiled components are cached between runs; `None` = no cache.
    pub cache_dir: Option<PathBuf>,
    /// Soft limit on the cache's size: the least recently used entries go
    /// beyond it; 0 = no limit.
    pub cache_max_bytes: u64,
    /// Compile files the cache does not know with Winch first, Cranelift
    /// later (see the module documentation).
    pub tiered: bool,
    /// Larger component files are refused without being read whole.
    pub max_file_bytes: u64,
    /// Plugins' `https://` requests go through `HTTPS_PROXY` (see
    /// [`crate::outbound`]); off: no proxy.
    pub proxy_from_env: bool,
}

impl RuntimeOptions {
    pub fn new(kv_path: PathBuf) -> RuntimeOptions {
        RuntimeOptions {
            kv_path,
            kv: None,
            max_memory_bytes: 1 << 30,
            max_instances: 128,
            cache_dir: None,
            cache_max_bytes: 1 << 30,
            tiered: false,
            max_file_bytes: 256 << 20,
            proxy_from_env: false,
        }
    }
}

/// Which compiler made a plugin's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Winch's code, serving until Cranelift's is ready.
    Baseline,
    /// Cranelift's code.
    Optimized,
}

pub struct Runtime {
    /// Cranelift: the code every plugin ends up running.
    engine: Engine,
    linker: Linker<HostState>,
    /// Winch, when compilation is tiered.
    baseline: Option<(Engine, Linker<HostState>)>,
    env: Arc<CallEnv>,
    cache: Option<Arc<cache::ComponentCache>>,
    max_file_bytes: u64,
    _ticker: EpochTicker,
}

/// What both tiers' engines share: epoch deadlines, a plugin's memory
/// reserved up front and initialised copy-on-write.
fn tier_config() -> Config {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        // Plugins' exports are synchronous: without this a Store sets up
        // component-model-async's task state and every `call_async` goes
        // through its event loop (wasmtime 48 turns it on whenever that
        // feature is compiled in, as a dependency may ask for it).
        .concurrency_support(false)
        // All of a 32-bit memory's index space, so compiled code needs no
        // bounds check on a load or store: the guard pages fault instead.
        // It costs address space only; the limiter and the pool's
        // `max_memory_size` bound what a plugin may use. (A reservation of
        // the size limit made every access compare and select first.)
        .memory_reservation(4 << 30)
        .memory_init_cow(true);
    config
}

fn engine_and_linker(config: &Config) -> anyhow::Result<(Engine, Linker<HostState>)> {
    let engine = Engine::new(config)?;
    let linker = host_linker(&engine)?;
    Ok((engine, linker))
}

impl Runtime {
    pub fn new(opts: RuntimeOptions) -> anyhow::Result<Arc<Runtime>> {
        let mut pool = PoolingAllocationConfig::default();
        // Guest components built with the WASI adapter hold two memories
        // and several core instances each.
        pool.total_component_instances(opts.max_instances)
            .total_core_instances(opts.max_instances * 16)
            .total_memories(opts.max_instances * 4)
            .total_tables(opts.max_instances * 8)
            .total_stacks(opts.max_instances)
            .max_memories_per_component(state::MEMORIES_PER_COMPONENT as u32)
            .max_core_instances_per_component(state::CORE_INSTANCES_PER_COMPONENT as u32)
            .max_tables_per_component(state::TABLES_PER_COMPONENT as u32)
            .table_elements(state::TABLE_ELEMENTS)
            .max_memory_size(opts.max_memory_bytes)
            .table_keep_resident(64 << 10);
        // Every call gets a fresh instance, so a slot is reset after every
        // call; what is kept resident is reset in place, the rest is given
        // back with madvise and faulted in again by the next call. Without
        // help the kept part is the lowest addresses, reset with memset, so
        // it stays small (64 KiB): Rust guests put their 1 MiB stack first,
        // pages no call touched, and madvise and the next call's page
        // faults stayed about half of a call (BENCHMARKS.md, "Wasm
        // runtime"). Where Linux reports which pages a call wrote
        // (PAGEMAP_SCAN, 6.7+), wasmtime copies only those back from the
        // image, so keeping 4 MiB costs a call nothing it did not touch and
        // spares a batch of 256 events the faults of its heap (9 % of a
        // profile's samples before, 0.3 % after), for up to 4 MiB of RSS
        // per warm memory.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(4 << 20);
        } else {
            pool.linear_memory_keep_resident(64 << 10);
        }
        let mut config = tier_config();
        config
            // Tiered, Cranelift compiles in the background: one core, so
            // the listener and the plugins keep the other.
            .parallel_compilation(!opts.tiered)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let (engine, linker) = engine_and_linker(&config)?;

        // Baseline instances live for the seconds Cranelift takes, so they
        // are allocated on demand rather than from a second reserved pool.
        let baseline = if opts.tiered {
            let mut config = tier_config();
            config.strategy(Strategy::Winch);
            match engine_and_linker(&config) {
                Ok(baseline) => Some(baseline),
                Err(e) => {
                    tracing::warn!("no baseline compiler on this platform ({e:#}); every plugin waits for Cranelift");
                    None
                }
            }
        } else {
            None
        };

        let http =
            plugin_client(opts.proxy_from_env, &TlsMode::System).map_err(anyhow::Error::msg)?;
        let kv = match opts.kv {
            Some(kv) => kv,
            None => KvStore::open(&opts.kv_path)?,
        };
        let cache = opts.cache_dir.map(|dir| {
            Arc::new(cache::ComponentCache::new(
                dir,
                &engine,
                opts.cache_max_bytes,
            ))
        });
        let mut engines = vec![engine.clone()];
        engines.extend(baseline.as_ref().map(|(e, _)| e.clone()));
        let ticker = EpochTicker::start(engines);
        Ok(Arc::new(Runtime {
            engine,
            linker,
            baseline,
            env: Arc::new(CallEnv {
                kv,
                http,
                proxy_from_env: opts.proxy_from_env,
                outbound: Arc::default(),
            }),
            cache,
            max_file_bytes: opts.max_file_bytes,
            _ticker: ticker,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The largest component file read.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_bytes
    }

    pub fn kv(&self) -> &KvStore {
        &self.env.kv
    }

    /// Bytes of compiled code in the on-disk cache, when there is one.
    pub fn compiled_cache_bytes(&self) -> Option<u64> {
        self.cache.as_ref().map(|c| c.bytes())
    }

    /// Plugins' outbound requests since start, by plugin, origin and result.
    pub fn outbound(&self) -> &OutboundCounts {
        &self.env.outbound
    }

    /// Reads, checks and compiles a component file. CPU-heavy: call it off
    /// the async threads (`spawn_blocking`).
    pub fn compile_file(
        &self,
        file: &Path,
        pinned_sha256: Option<&str>,
    ) -> Result<Compiled, LoadError> {
        let read = file::read_component(file, self.max_file_bytes)?;
        self.compile_read(file, read, pinned_sha256)
    }

    /// [`Runtime::compile_file`] for what was already read from `file`.
    pub fn compile_read(
        &self,
        file: &Path,
        read: file::ComponentBytes,
        pinned_sha256: Option<&str>,
    ) -> Result<Compiled, LoadError> {
        let file::ComponentBytes { bytes, sha256 } = read;
        if let Some(expected) = pinned_sha256 {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(LoadError::HashMismatch {
                    file: file.to_owned(),
                    expected: expected.to_owned(),
                    found: sha256,
                });
            }
        }
        check_header(file, &bytes)?;
        let started = Instant::now();
        let cached = self
            .cache
            .as_ref()
            .and_then(|c| c.get(&self.engine, &sha256));
        let from_cache = cached.is_some();
        let size = bytes.len();
        let (component, source) = match cached {
            Some(component) => (component, None),
            None => match self.compile_baseline(file, &bytes) {
                // Kept for Cranelift, which compiles a baseline plugin later.
                Some(component) => (component, Some(Arc::from(bytes))),
                None => (
                    self.optimizer_parts()
                        .compile_bytes(file, &bytes, &sha256)?,
                    None,
                ),
            },
        };
        Ok(Compiled {
            from_cache,
            source,
            file: file.to_owned(),
            sha256,
            size,
            compile_time: started.elapsed(),
            component,
        })
    }

    /// Winch's compilation of `bytes`, when compilation is tiered and Winch
    /// can compile it. A file Winch refuses (one using a proposal it lacks,
    /// or not valid at all) goes to Cranelift, whose error is the one
    /// reported.
    fn compile_baseline(&self, file: &Path, bytes: &[u8]) -> Option<Component> {
        let (engine, _) = self.baseline.as_ref()?;
        Component::new(engine, bytes)
            .inspect_err(|e| tracing::debug!(file = %file.display(), "Winch cannot compile this component: {e:#}"))
            .ok()
    }

    fn optimizer_parts(&self) -> Optimizer {
        Optimizer {
            engine: self.engine.clone(),
            cache: self.cache.clone(),
        }
    }

    /// What compiles baseline plugins with Cranelift, on a thread of the
    /// caller's; `None` when compilation is not tiered. It holds neither the
    /// runtime nor its kv file, so it may outlive both.
    pub fn optimizer(&self) -> Option<Optimizer> {
        self.baseline.as_ref().map(|_| self.optimizer_parts())
    }

    /// A plugin like `baseline` running `optimized` (what
    /// [`Optimizer::compile`] made of its [`Plugin::source`]). Its `init` runs once
    /// more before it serves, so the new code has answered before the swap.
    pub async fn upgrade(
        self: &Arc<Self>,
        baseline: &Plugin,
        optimized: Component,
    ) -> Result<Plugin, LoadError> {
        let file = baseline.file.clone();
        let pre = self.pre(&self.linker, &optimized, &file)?;
        let plugin = Plugin {
            engine: self.engine.clone(),
            paged: paged_export(&optimized),
            pre,
            source: None,
            ..baseline.clone()
        };
        let (_, init_calls) = plugin.init().await?;
        Ok(Plugin {
            init_calls,
            ..plugin
        })
    }

    /// `plugin` running from a snapshot of its instance after `init`, when
    /// its `init` made no call to the host and the snapshot can be made
    /// (see `snapshot.rs`); else `plugin` as it is, which runs `init` in
    /// every call. Cranelift's code only. It compiles twice (through the
    /// cache), so a load does not wait for it: the reload task asks for it
    /// once a plugin serves, and swaps the result in.
    pub async fn pre_initialise(self: &Arc<Self>, plugin: Plugin) -> Plugin {
        let name = plugin.name().to_owned();
        if !plugin.awaits_snapshot() {
            return plugin;
        }
        if let Some(why) = plugin.init_calls.keep_init_from_snapshot() {
            return refused(plugin, Refusal::Expected, why);
        }
        let started = Instant::now();
        let read = {
            let (file, max) = (plugin.file.clone(), self.max_file_bytes);
            tokio::task::spawn_blocking(move || file::read_component(&file, max)).await
        };
        let bytes = match read {
            Ok(Ok(read)) if read.sha256 == plugin.sha256 => read.bytes,
            _ => {
                return refused(
                    plugin,
                    Refusal::Expected,
                    "its file changed or went since it loaded",
                )
            }
        };
        // Neither the runtime nor the plugin goes to the blocking thread:
        // they hold the kv file, which must close when the host stops while
        // this may still be compiling (so `Optimizer`, for the same reason).
        let optimizer = self.optimizer_parts();
        let (file, config, limits) = (plugin.file.clone(), plugin.config.clone(), plugin.limits());
        let instance = plugin.instance().map(str::to_owned);
        let made = tokio::task::spawn_blocking(move || {
            let compile = |bytes: &[u8]| {
                optimizer
                    .compile_cached(&file, bytes)
                    .map_err(|e| snapshot::SnapshotError::Compile(e.to_string()))
            };
            let (image, info) = tokio::runtime::Handle::current().block_on(snapshot::snapshot(
                &optimizer.engine,
                &bytes,
                &config,
                instance,
                limits,
                compile,
            ))?;
            Ok::<_, snapshot::SnapshotError>((compile(&image)?, info))
        })
        .await;
        let (component, info) = match made {
            Ok(Ok(made)) => made,
            Ok(Err(e)) => return refused(plugin, Refusal::Expected, &e.to_string()),
            Err(e) => {
                return refused(
                    plugin,
                    Refusal::Unexpected,
                    &format!("its snapshot panicked: {e}"),
                )
            }
        };
        if (&info.name, &info.version, &info.subscriptions)
            != (
                &plugin.info.name,
                &plugin.info.version,
                &plugin.info.subscriptions,
            )
        {
            return refused(
                plugin,
                Refusal::Expected,
                "its `init` answered differently from one run to the next",
            );
        }
        let candidate = match self.pre(&self.linker, &component, &plugin.file) {
            Ok(pre) => Plugin {
                paged: paged_export(&component),
                pre,
                pre_initialised: true,
                ..plugin.clone()
            },
            Err(e) => {
                return refused(
                    plugin,
                    Refusal::Unexpected,
                    &format!("its snapshot does not link: {e}"),
                )
            }
        };
        // The snapshot instantiates (and exports what the plugin did) before
        // it serves.
        if let Err(e) = candidate.init().await {
            return refused(
                plugin,
                Refusal::Unexpected,
                &format!("its snapshot does not start: {e}"),
            );
        }
        tracing::info!(plugin = %name, took_ms = started.elapsed().as_millis() as u64, "pre-initialised: each call starts from the state `init` left");
        candidate
    }

    fn pre(
        &self,
        linker: &Linker<HostState>,
        component: &Component,
        file: &Path,
    ) -> Result<Linked, LoadError> {
        linker
            .instantiate_pre(component)
            .and_then(|instance_pre| {
                Ok(Linked {
                    exports: PluginIndices::new(&instance_pre)?,
                    instance_pre,
                })
            })
            .map_err(|e| LoadError::WorldMismatch {
                file: file.to_owned(),
                reason: format!("{e:#}"),
            })
    }

    /// Links a compiled component, runs its `init` with `settings`, and
    /// returns a plugin ready for calls.
    ///
    /// `instance`: the name the operator runs this component under
    /// (`[plugin.fw-dc1] component = …`), which then names the plugin in
    /// the registry, kv, deliveries and metrics; `None`: the plugin is
    /// known by the name its `init` gives.
    pub async fn instantiate(
        self: &Arc<Self>,
        compiled: Compiled,
        settings: PluginSettings,
        instance: Option<String>,
    ) -> Result<Plugin, LoadError> {
        let file = compiled.file.clone();
        let (engine, linker) = match (compiled.tier(), &self.baseline) {
            (Tier::Baseline, Some((engine, linker))) => (engine, linker),
            _ => (&self.engine, &self.linker),
        };
        let pre = self.pre(linker, &compiled.component, &file)?;
        let config = serde_json::to_string(&settings.config).unwrap_or_else(|_| "{}".into());
        // Until init names it, a plugin running as itself is known by its
        // file name.
        let provisional = instance.clone().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plugin".into())
        });
        // A plugin with its own trust gets its own connection pool; the
        // others share one.
        let http = match &settings.tls {
            TlsMode::System => None,
            tls => Some(
                plugin_client(self.env.proxy_from_env, tls).map_err(|reason| LoadError::Tls {
                    file: file.clone(),
                    reason,
                })?,
            ),
        };
        let mut plugin = Plugin {
            env: self.env.clone(),
            identity: Arc::new(PluginIdentity {
                name: provisional,
                instance: instance.clone(),
                limits: settings.limits,
                sessions: Arc::new(session::Sessions::new(settings.policy.logins().len())),
                memory_peak: Arc::default(),
                policy: settings.policy,
                http,
            }),
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
                subscriptions: Vec::new(),
            },
            config,
            engine: engine.clone(),
            paged: paged_export(&compiled.component),
            pre,
            pre_initialised: false,
            init_calls: HostCalls::default(),
            init_every_call: None,
            source: compiled.source,
            sha256: compiled.sha256,
            file: file.clone(),
            size: compiled.size,
            from_cache: compiled.from_cache,
        };
        let (info, init_calls) = plugin.init().await?;
        if !valid_plugin_name(&info.name) {
            return Err(LoadError::BadName {
                file,
                name: info.name,
            });
        }
        // Subscriptions are registered with Prism as event types.
        if let Some(bad) = info
            .subscriptions
            .iter()
            .find(|s| !crate::event::valid_subscription(s))
        {
            let shown: String = bad.chars().take(64).collect();
            return Err(LoadError::BadSubscription {
                file,
                subscription: format!("{shown:?}"),
            });
        }
        let provisional = &plugin.identity;
        plugin.identity = Arc::new(PluginIdentity {
            name: instance.unwrap_or_else(|| info.name.clone()),
            instance: provisional.instance.clone(),
            limits: provisional.limits,
            policy: provisional.policy.clone(),
            http: provisional.http.clone(),
            // The same sessions: init may have signed in already.
            sessions: provisional.sessions.clone(),
            memory_peak: provisional.memory_peak.clone(),
        });
        plugin.info = info;
        plugin.init_calls = init_calls;
        Ok(plugin)
    }

    /// `compile_file` off the async threads, then `instantiate`.
    pub async fn load(
        self: &Arc<Self>,
        file: &Path,
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        self.load_read(file, None, settings, None).await
    }

    /// [`Runtime::load`], with the file's bytes when they were already read.
    pub async fn load_read(
        self: &Arc<Self>,
        file: &Path,
        read: Option<file::ComponentBytes>,
        settings: PluginSettings,
        instance: Option<String>,
    ) -> Result<Plugin, LoadError> {
        let rt = self.clone();
        let path = file.to_owned();
        let pin = settings.sha256.clone();
        let compile = move || match read {
            Some(read) => rt.compile_read(&path, read, pin.as_deref()),
            None => rt.compile_file(&path, pin.as_deref()),
        };
        let compiled =
            tokio::task::spawn_blocking(compile)
                .await
                .map_err(|e| LoadError::Invalid {
                    file: file.to_owned(),
                    reason: format!("compilation panicked: {e}"),
                })??;
        self.instantiate(compiled, settings, instance).await
    }
}

/// Whether a snapshot's refusal is the plugin's way (its `init`, its
/// file) or points at a fault of the host's, which is logged louder.
#[derive(Clone, Copy)]
enum Refusal {
    Expected,
    Unexpected,
}

/// `plugin` as it was, noting why its calls go on running `init`.
fn refused(plugin: Plugin, refusal: Refusal, why: &str) -> Plugin {
    let name = plugin.name();
    match refusal {
        Refusal::Expected => tracing::info!(plugin = %name, "runs `init` in every call: {why}"),
        Refusal::Unexpected => tracing::warn!(plugin = %name, "runs `init` in every call: {why}"),
    }
    Plugin {
        init_every_call: Some(why.into()),
        ..plugin
    }
}

/// Where a component exports the paged reconcile (`paged-plugin`), if it
/// does.
fn paged_export(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, bindings::PAGED)?;
    component.get_export_index(Some(&interface), "reconcile")
}

/// The host's imports: WASI preview 2 and the plugin world's own.
fn host_linker(engine: &Engine) -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::<HostState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    // Interface by interface, so that only the calls that keep an `init`
    // from its snapshot are counted (WASI's through `HostState::ctx`): one
    // that logs and reads its context is still captured (`snapshot.rs`).
    use bindings::prismhook::plugin::{context, http, inventory, kv, log, types};
    fn stateful(s: &mut HostState) -> &mut HostState {
        s.host_calls.stateful += 1;
        s
    }
    types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    context::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    kv::add_to_linker::<_, HasSelf<_>>(&mut linker, stateful)?;
    http::add_to_linker::<_, HasSelf<_>>(&mut linker, stateful)?;
    inventory::add_to_linker::<_, HasSelf<_>>(&mut linker, stateful)?;
    Ok(linker)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Tells a component from a core module or a file that is not Wasm, so the
/// error says which of the three the operator dropped in.
fn check_header(file: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        let found = if bytes.is_empty() {
            "an empty file".to_owned()
        } else {
            format!("{:02x?}", &bytes[..bytes.len().min(4)])
        };
        return Err(LoadError::NotWasm {
            file: file.to_owned(),
            found,
        });
    }
    // Bytes 4..8: version and layer. Core modules are `01 00 00 00`,
    // components `0d 00 01 00` (layer 1).
    if bytes[6..8] == [0, 0] {
        return Err(LoadError::CoreModule {
            file: file.to_owned(),
        });
    }
    Ok(())
}

/// Compiles baseline plugins with Cranelift and caches the result: the
/// blocking half of an upgrade, for a thread of its own.
pub struct Optimizer {
    engine: Engine,
    cache: Option<Arc<cache::ComponentCache>>,
}

impl Optimizer {
    /// Compiles with Cranelift and stores the result in the cache, from
    /// where it is mapped rather than held in memory.
    pub fn compile(&self, source: &Source) -> Result<Component, LoadError> {
        self.compile_bytes(&source.file, &source.bytes, &source.sha256)
    }

    /// Cranelift's compilation of `bytes`, from the cache when it has it.
    fn compile_cached(&self, file: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
        let sha256 = sha256_hex(bytes);
        if let Some(component) = self
            .cache
            .as_ref()
            .and_then(|c| c.get(&self.engine, &sha256))
        {
            return Ok(component);
        }
        self.compile_bytes(file, bytes, &sha256)
    }

    fn compile_bytes(
        &self,
        file: &Path,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<Component, LoadError> {
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid {
            file: file.to_owned(),
            reason: format!("{e:#}"),
        })?;
        Ok(match &self.cache {
            Some(cache) => cache
                .put(&self.engine, sha256, &component)
                .unwrap_or(component),
            None => component,
        })
    }
}

/// What Cranelift needs of a baseline plugin: its file's bytes, read once.
pub struct Source {
    pub file: PathBuf,
    pub sha256: String,
    pub(super) bytes: Arc<[u8]>,
}

/// A compiled component not yet linked.
pub struct Compiled {
    /// Whether it came from the on-disk cache rather than the compiler.
    pub from_cache: bool,
    /// The file's bytes, kept while only Winch has compiled them.
    source: Option<Arc<[u8]>>,
    pub file: PathBuf,
    pub sha256: String,
    pub size: usize,
    pub compile_time: Duration,
    pub component: Component,
}

impl Compiled {
    /// Which compiler made the code: Winch's keeps the bytes for Cranelift.
    pub fn tier(&self) -> Tier {
        tier_of(&self.source)
    }
}

pub(super) fn tier_of(source: &Option<Arc<[u8]>>) -> Tier {
    match source {
        Some(_) => Tier::Baseline,
        None => Tier::Optimized,
    }
}

/// Advances the engines' epochs on a dedicated thread for as long as the
/// runtime lives; deadlines are counted in their ticks.
struct EpochTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl EpochTicker {
    fn start(engines: Vec<Engine>) -> EpochTicker {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("prismhook-epoch".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engines.iter().for_each(Engine::increment_epoch);
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The HTTP client behind the plugins' `http` import: no redirects (the
/// import follows them itself, re-checking the allowlist at every hop), the
/// proxy policy, and `tls` for certificates.
fn plugin_client(proxy_from_env: bool, tls: &TlsMode) -> Result<reqwest::Client, String> {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .dns_resolver(Arc::new(crate::outbound::NoLocalNames))
        .user_agent(concat!("prismhook/", env!("CARGO_PKG_VERSION")));
    let builder = crate::outbound::with_proxy_policy(builder, proxy_from_env)?;
    crate::outbound::with_tls(builder, tls)?
        .build()
        .map_err(|e| prismhook_core::text::error_chain(&e))
}
