//! The one task that changes the plugin registry.
//!
//! The file watcher only says which path changed and how; this task
//! debounces (files are often written in several steps), compiles off the
//! async threads, links against the host's world, runs `init`, and only then
//! swaps the plugin into the registry in one step. A file that fails any of
//! that is reported precisely and the previous version keeps serving.
//!
//! When compilation is tiered, a new file serves with Winch's code first;
//! an optimizer thread compiles it with Cranelift, and this task swaps that
//! in as it does a new version, provided the same load is still serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{confine_settings_file, resolve_plugin, Config, PluginConfig};
use crate::registry::{Entry, PluginState, Registry};
use crate::runtime::file::{read_component, read_regular, ComponentBytes};
use crate::runtime::{Optimizer, Plugin, Runtime, Source, Tier};

/// Quiet time after the last write to a file before it is loaded.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Quiet time after a file was renamed into place or removed. Both are
/// atomic, so there is no partial file to wait out; the short wait only
/// groups a component with the settings file moved in beside it.
pub const SETTLE: Duration = Duration::from_millis(25);

/// What happened to one file in a reload.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Report {
    Loaded {
        file: PathBuf,
        plugin: String,
        version: String,
        sha256: String,
        from_cache: bool,
        tier: Tier,
    },
    Unchanged {
        file: PathBuf,
        plugin: String,
    },
    /// Cranelift's code replaced Winch's.
    Optimized {
        file: PathBuf,
        plugin: String,
    },
    Removed {
        file: PathBuf,
        plugin: String,
    },
    Disabled {
        file: PathBuf,
    },
    Failed {
        file: PathBuf,
        error: String,
    },
    /// The file failed before and neither it nor its settings changed
    /// since: not tried again, not logged again.
    StillFailing {
        file: PathBuf,
        error: String,
    },
}

enum Command {
    /// `atomic`: the path was renamed or removed, not written in place.
    Changed { path: PathBuf, atomic: bool },
    /// Rescan the directory now and answer when done (tests, admin API).
    Rescan(oneshot::Sender<Vec<Report>>),
}

/// What reloads did since start, by result, for metrics. Unchanged files
/// are not counted: a rescan that changes nothing is not a reload.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    pub loaded: AtomicU64,
    /// Swaps of Cranelift's code for Winch's.
    pub optimized: AtomicU64,
    pub removed: AtomicU64,
    pub disabled: AtomicU64,
    pub failed: AtomicU64,
}

impl ReloadCounts {
    fn count(&self, report: &Report) {
        let counter = match report {
            Report::Loaded { .. } => &self.loaded,
            Report::Removed { .. } => &self.removed,
            Report::Disabled { .. } => &self.disabled,
            Report::Failed { .. } => &self.failed,
            Report::Optimized { .. } => &self.optimized,
            Report::Unchanged { .. } | Report::StillFailing { .. } => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handle to the reload task.
#[derive(Clone)]
pub struct Reloader {
    tx: mpsc::UnboundedSender<Command>,
    counts: Arc<ReloadCounts>,
}

impl Reloader {
    /// What reloads did since start, by result.
    pub fn counts(&self) -> &ReloadCounts {
        &self.counts
    }

    /// Reloads every file in the plugins directory that changed, and waits.
    pub async fn reload(&self) -> Vec<Report> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Rescan(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

struct Loaded {
    plugin: String,
    sha256: String,
    settings: PluginConfig,
}

/// A file that did not load, with what it was when it failed.
struct Failure {
    /// The registry entry that shows the error.
    plugin: String,
    snapshot: Snapshot,
    error: String,
}

/// Largest `<name>.toml` read.
const MAX_SETTINGS_BYTES: u64 = 1 << 20;

/// What a component file and its settings file held when read; equal
/// snapshots load the same way.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    /// The component's sha256, or why it could not be read.
    wasm: Result<String, String>,
    /// The settings file's text (`None`: there is none), or why it could
    /// not be read.
    settings: Result<Option<String>, String>,
}

impl Snapshot {
    /// Blocking, bounded reads of regular files only. The component's
    /// bytes come back too, so that loading it does not read it again.
    fn read(wasm: &Path, limit: u64) -> (Snapshot, Option<ComponentBytes>) {
        let settings = match read_regular(&wasm.with_extension("toml"), MAX_SETTINGS_BYTES) {
            Ok(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| format!("{}: not UTF-8 text", wasm.with_extension("toml").display())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let (wasm, bytes) = match read_component(wasm, limit) {
            Ok(read) => (Ok(read.sha256.clone()), Some(read)),
            Err(e) => (Err(e.to_string()), None),
        };
        (Snapshot { wasm, settings }, bytes)
    }
}

struct Task {
    runtime: Arc<Runtime>,
    registry: Registry,
    config: Arc<Config>,
    dir: PathBuf,
    /// `.wasm` path → what it provides now.
    files: HashMap<PathBuf, Loaded>,
    /// `.wasm` path → why its current bytes and settings did not load.
    failures: HashMap<PathBuf, Failure>,
    counts: Arc<ReloadCounts>,
    /// Cranelift's compilations of baseline plugins; `None` when not tiered.
    optimizing: Option<Optimizing>,
    optimized: mpsc::UnboundedReceiver<(u64, Option<Compiled>)>,
}

type Compiled = Result<wasmtime::component::Component, crate::runtime::LoadError>;

/// `.wasm` path → the optimizer job whose result is still wanted.
type Wanted = Arc<std::sync::Mutex<HashMap<PathBuf, u64>>>;

/// The reload task's side of the optimizer thread.
struct Optimizing {
    jobs: std::sync::mpsc::Sender<(u64, Source)>,
    /// The thread skips jobs no longer wanted (versions replaced before
    /// their turn).
    wanted: Wanted,
    /// Job → the baseline plugin it compiles for.
    pending: HashMap<u64, Plugin>,
    next: u64,
}

impl Optimizing {
    /// The reload task's side, and the thread to start once the first load
    /// is done (so that Cranelift does not slow it down).
    fn new(
        optimizer: Optimizer,
        done: mpsc::UnboundedSender<(u64, Option<Compiled>)>,
    ) -> (Optimizing, OptimizerThread) {
        let (jobs, rx) = std::sync::mpsc::channel();
        let wanted = Wanted::default();
        let thread = OptimizerThread {
            optimizer,
            rx,
            wanted: wanted.clone(),
            done,
        };
        let optimizing = Optimizing {
            jobs,
            wanted,
            pending: HashMap::new(),
            next: 0,
        };
        (optimizing, thread)
    }

    /// Queues Cranelift's compilation of `plugin` (if it runs Winch's code),
    /// in place of any earlier one for its file.
    fn queue(&mut self, plugin: &Plugin) {
        let mut wanted = self.wanted.lock().expect("optimizer lock");
        wanted.remove(plugin.file());
        let Some(source) = plugin.source() else {
            return;
        };
        self.next += 1;
        wanted.insert(plugin.file().to_owned(), self.next);
        self.pending.insert(self.next, plugin.clone());
        if self.jobs.send((self.next, source)).is_err() {
            // No optimizer thread: the plugin keeps Winch's code.
            self.pending.remove(&self.next);
        }
    }

    fn forget(&mut self, file: &Path) {
        self.wanted.lock().expect("optimizer lock").remove(file);
    }
}

/// Loads the plugins directory once, then starts the reload task (and the
/// file watcher when `watch` is set). Returns the reports of the first load.
pub async fn start(
    runtime: Arc<Runtime>,
    registry: Registry,
    config: Arc<Config>,
) -> anyhow::Result<Started> {
    let configured = &config.plugins.dir;
    std::fs::create_dir_all(configured)
        .map_err(|e| anyhow::anyhow!("plugins directory {}: {e}", configured.display()))?;
    // One spelling of every path: the watcher reports absolute paths, so a
    // relative `plugins.dir` would otherwise name each file twice.
    let dir = std::fs::canonicalize(configured)
        .map_err(|e| anyhow::anyhow!("plugins directory {}: {e}", configured.display()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let watcher = if config.plugins.watch {
        let tx = tx.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                if !changes_content(&event.kind) {
                    return;
                }
                let atomic = matches!(
                    event.kind,
                    EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_)
                );
                for path in event.paths {
                    let _ = tx.send(Command::Changed { path, atomic });
                }
            }
        })?;
        w.watch(&dir, RecursiveMode::NonRecursive)?;
        Some(w)
    } else {
        None
    };
    let (optimized_tx, optimized) = mpsc::unbounded_channel();
    let (optimizing, optimizer) = match runtime.optimizer() {
        Some(o) => {
            let (optimizing, thread) = Optimizing::new(o, optimized_tx);
            (Some(optimizing), Some(thread))
        }
        None => (None, None),
    };
    let mut task = Task {
        runtime,
        registry,
        config,
        dir,
        files: HashMap::new(),
        failures: HashMap::new(),
        counts: Arc::default(),
        optimizing,
        optimized,
    };
    let first = task.rescan().await;
    if let Some(thread) = optimizer {
        thread.spawn();
    }
    let counts = task.counts.clone();
    let handle = tokio::spawn(task.run(rx));
    Ok(Started {
        reloader: Reloader { tx, counts },
        reports: first,
        watcher,
        task: handle,
    })
}

/// A running reload task. It ends once the watcher and every [`Reloader`]
/// are dropped.
pub struct Started {
    pub reloader: Reloader,
    /// What the first load of the directory did.
    pub reports: Vec<Report>,
    pub watcher: Option<notify::RecommendedWatcher>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        // `.wasm` path → when to load it, unless it changes again first.
        let mut dirty: HashMap<PathBuf, tokio::time::Instant> = HashMap::new();
        loop {
            let due = dirty.values().min().copied();
            let cmd = tokio::select! {
                cmd = rx.recv() => cmd,
                Some((job, result)) = self.optimized.recv() => {
                    let baseline = self.optimizing.as_mut().and_then(|o| o.pending.remove(&job));
                    if let (Some(baseline), Some(result)) = (baseline, result) {
                        if let Some(report) = self.upgrade(&baseline, result).await {
                            self.record(&report);
                        }
                    }
                    continue;
                }
                () = sleep_until(due) => {
                    let now = tokio::time::Instant::now();
                    let ready: Vec<PathBuf> = dirty.iter().filter(|(_, due)| **due <= now).map(|(p, _)| p.clone()).collect();
                    for wasm in ready {
                        dirty.remove(&wasm);
                        let report = self.reload_file(&wasm).await;
                        self.record(&report);
                    }
                    continue;
                }
            };
            match cmd {
                None => return,
                Some(Command::Changed { path, atomic }) => {
                    if let Some(wasm) = wasm_for(&path) {
                        let quiet = if atomic { SETTLE } else { DEBOUNCE };
                        dirty.insert(wasm, tokio::time::Instant::now() + quiet);
                    }
                }
                Some(Command::Rescan(reply)) => {
                    dirty.clear();
                    let _ = reply.send(self.rescan().await);
                }
            }
        }
    }

    /// Swaps Cranelift's code for Winch's, if the load it was made for is
    /// still the one serving (not replaced, removed or reconfigured since).
    async fn upgrade(&mut self, baseline: &Plugin, compiled: Compiled) -> Option<Report> {
        let file = baseline.file().to_owned();
        let plugin = baseline.name().to_owned();
        if !self.serving(baseline) {
            return None;
        }
        let code = match compiled {
            Ok(code) => code,
            Err(e) => {
                tracing::warn!(%plugin, "Cranelift cannot compile the plugin; Winch's code keeps serving: {e}");
                return None;
            }
        };
        let optimized = match self.runtime.upgrade(baseline, code).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%plugin, "Cranelift's code failed where Winch's did not; Winch's keeps serving: {e}");
                return None;
            }
        };
        // `init` awaited: look again before swapping.
        if !self.serving(baseline) {
            return None;
        }
        self.registry.update(|r| {
            if let Some(entry) = r.get_mut(&plugin) {
                entry.plugin = Some(optimized);
            }
        });
        Some(Report::Optimized { file, plugin })
    }

    fn serving(&self, baseline: &Plugin) -> bool {
        self.registry
            .get(baseline.name())
            .and_then(|e| e.plugin)
            .is_some_and(|p| p.same_load(baseline) && p.tier() == Tier::Baseline)
    }

    /// Logs what a reload did and counts it for the metrics.
    fn record(&self, report: &Report) {
        log_report(report);
        self.counts.count(report);
    }

    /// Brings the registry in line with every file in the directory.
    async fn rescan(&mut self) -> Vec<Report> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter_map(|p| wasm_for(&p))
                    .collect()
            })
            .unwrap_or_default();
        paths.extend(self.files.keys().cloned());
        paths.extend(self.failures.keys().cloned());
        paths.sort();
        paths.dedup();
        let mut reports = Vec::new();
        for path in paths {
            let report = self.reload_file(&path).await;
            self.record(&report);
            reports.push(report);
        }
        reports
    }

    /// The settings a snapshot's `.toml` holds, or else the main config's
    /// `[plugin.<stem>]`.
    fn settings_for(&self, wasm: &Path, snapshot: &Snapshot) -> Result<PluginConfig, String> {
        let stem = wasm
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let beside = wasm.with_extension("toml");
        match &snapshot.settings {
            Ok(Some(text)) => {
                let settings = toml::from_str::<PluginConfig>(text)
                    .map_err(|e| format!("{}: {}", beside.display(), e.to_string().trim_end()))?;
                confine_settings_file(settings, self.config.plugin.get(&stem), &stem)
                    .map_err(|(key, msg)| format!("{}: `{key}`: {msg}", beside.display()))
            }
            Ok(None) => Ok(self.config.plugin.get(&stem).cloned().unwrap_or_default()),
            Err(e) => Err(e.clone()),
        }
    }

    async fn reload_file(&mut self, wasm: &Path) -> Report {
        let file = wasm.to_owned();
        let limit = self.runtime.max_file_bytes();
        let (snapshot, bytes) = {
            let wasm = wasm.to_owned();
            match tokio::task::spawn_blocking(move || Snapshot::read(&wasm, limit)).await {
                Ok(read) => read,
                Err(e) => return self.failed(file, None, format!("reading failed: {e}")),
            }
        };
        let gone = snapshot.wasm.is_err() && !wasm.exists();
        if gone {
            if let Some(optimizing) = &mut self.optimizing {
                optimizing.forget(wasm);
            }
            if let Some(old) = self.files.remove(wasm) {
                self.failures.remove(wasm);
                // A file refused because this one had its name may load
                // now: the next rescan or change tries it again.
                let by = format!("is already provided by {}", wasm.display());
                self.failures.retain(|_, f| !f.error.contains(&by));
                self.registry.update(|r| {
                    r.remove(&old.plugin);
                });
                return Report::Removed {
                    file,
                    plugin: old.plugin,
                };
            }
            // A file that never loaded: its failed entry goes with it.
            if let Some(failure) = self.failures.remove(wasm) {
                self.registry.update(|r| {
                    if r.get(&failure.plugin).is_some_and(|e| e.plugin.is_none()) {
                        r.remove(&failure.plugin);
                    }
                });
                return Report::Removed {
                    file,
                    plugin: failure.plugin,
                };
            }
            return Report::Failed {
                file,
                error: "no such file".into(),
            };
        }
        if let Some(failure) = self.failures.get(wasm) {
            if failure.snapshot == snapshot {
                return Report::StillFailing {
                    file,
                    error: failure.error.clone(),
                };
            }
        }
        if let Err(error) = &snapshot.wasm {
            let error = error.clone();
            return self.failed(file, Some(snapshot), error);
        }
        let settings = match self.settings_for(wasm, &snapshot) {
            Ok(s) => s,
            Err(error) => return self.failed(file, Some(snapshot), error),
        };
        if !settings.enabled {
            if let Some(optimizing) = &mut self.optimizing {
                optimizing.forget(wasm);
            }
            let failed = self.failures.remove(wasm).map(|f| f.plugin);
            let loaded = self.files.remove(wasm).map(|l| l.plugin);
            self.registry.update(|r| {
                if let Some(name) = loaded {
                    r.remove(&name);
                }
                if let Some(name) = failed {
                    if r.get(&name).is_some_and(|e| e.plugin.is_none()) {
                        r.remove(&name);
                    }
                }
            });
            return Report::Disabled { file };
        }
        let stem = wasm
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let resolved = match resolve_plugin(&settings, &stem, self.config.default_limits()) {
            Ok(s) => s,
            Err((key, msg)) => return self.failed(file, Some(snapshot), format!("`{key}`: {msg}")),
        };
        // Skip the work when neither the bytes nor the settings changed.
        if let Some(old) = self.files.get(wasm) {
            let same_bytes = snapshot.wasm.as_deref() == Ok(old.sha256.as_str());
            if same_bytes && old.settings == settings {
                // Back to what serves after a failed change: the error is
                // no longer news.
                if self.failures.remove(wasm).is_some() {
                    let name = old.plugin.clone();
                    self.registry.update(|r| {
                        if let Some(entry) = r.get_mut(&name) {
                            entry.load_error = None;
                        }
                    });
                }
                return Report::Unchanged {
                    file,
                    plugin: old.plugin.clone(),
                };
            }
        }
        let plugin = match self.runtime.load_read(wasm, bytes, resolved).await {
            Ok(p) => p,
            Err(e) => return self.failed(file, Some(snapshot), e.to_string()),
        };
        let name = plugin.name().to_owned();
        if let Some((other, _)) = self
            .files
            .iter()
            .find(|(p, l)| l.plugin == name && p.as_path() != wasm)
        {
            let error = format!(
                "plugin name `{name}` is already provided by {}",
                other.display()
            );
            return self.failed(file, Some(snapshot), error);
        }
        self.failures.remove(wasm);
        let report = Report::Loaded {
            file: file.clone(),
            plugin: name.clone(),
            version: plugin.info().version.clone(),
            sha256: plugin.sha256().to_owned(),
            from_cache: plugin.from_cache(),
            tier: plugin.tier(),
        };
        let previous = self.files.insert(
            file,
            Loaded {
                plugin: name.clone(),
                sha256: plugin.sha256().to_owned(),
                settings: settings.clone(),
            },
        );
        let coalesce = settings.coalesce;
        if let Some(optimizing) = &mut self.optimizing {
            optimizing.queue(&plugin);
        }
        self.registry.update(|r| {
            if let Some(prev) = &previous {
                if prev.plugin != name {
                    r.remove(&prev.plugin);
                }
            }
            r.insert(
                name,
                Entry {
                    plugin: Some(plugin),
                    state: PluginState::Active,
                    coalesce,
                    load_error: None,
                },
            );
        });
        report
    }

    /// Records a failed load: the serving version (if any) stays, marked
    /// with the error; a plugin that never loaded is listed as failed. The
    /// same snapshot is not tried again.
    fn failed(&mut self, file: PathBuf, snapshot: Option<Snapshot>, error: String) -> Report {
        let name = self
            .files
            .get(&file)
            .map(|l| l.plugin.clone())
            .unwrap_or_else(|| {
                file.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        self.registry.update(|r| {
            let entry = r.entry(name.clone()).or_insert_with(|| Entry {
                plugin: None,
                state: PluginState::Failed {
                    reason: error.clone(),
                },
                coalesce: false,
                load_error: None,
            });
            entry.load_error = Some(error.clone());
        });
        if let Some(snapshot) = snapshot {
            self.failures.insert(
                file.clone(),
                Failure {
                    plugin: name.clone(),
                    snapshot,
                    error: error.clone(),
                },
            );
        }
        Report::Failed { file, error }
    }
}

fn log_report(report: &Report) {
    match report {
        Report::Loaded {
            file,
            plugin,
            version,
            sha256,
            tier,
            ..
        } => {
            tracing::info!(%plugin, %version, file = %file.display(), sha256 = &sha256[..12], ?tier, "plugin loaded")
        }
        Report::Unchanged { .. } => {}
        Report::Optimized { file, plugin } => {
            tracing::info!(%plugin, file = %file.display(), "plugin optimized: Cranelift's code replaced Winch's")
        }
        Report::Removed { file, plugin } => {
            tracing::info!(%plugin, file = %file.display(), "plugin removed")
        }
        Report::Disabled { file } => {
            tracing::info!(file = %file.display(), "plugin disabled by its settings")
        }
        Report::Failed { file, error } => {
            tracing::error!(file = %file.display(), "plugin not loaded (a previous version, if any, keeps serving): {error}")
        }
        Report::StillFailing { file, .. } => {
            tracing::debug!(file = %file.display(), "unchanged since it failed to load; not tried again")
        }
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The thread that compiles baseline plugins with Cranelift, one at a time
/// (and Cranelift on one core) so that it takes at most one core from the
/// event path. It is not a blocking task of the async runtime, because
/// shutting down would wait for it, and it holds nothing of the runtime: it
/// ends, unnoticed, once the reload task is gone.
struct OptimizerThread {
    optimizer: Optimizer,
    rx: std::sync::mpsc::Receiver<(u64, Source)>,
    wanted: Wanted,
    done: mpsc::UnboundedSender<(u64, Option<Compiled>)>,
}

impl OptimizerThread {
    fn spawn(self) {
        let OptimizerThread {
            optimizer,
            rx,
            wanted,
            done,
        } = self;
        let spawned = std::thread::Builder::new().name("prismhook-optimizer".into()).spawn(move || {
            for (job, source) in rx {
                let current = wanted.lock().expect("optimizer lock").get(&source.file) == Some(&job);
                let result = current.then(|| {
                    let started = std::time::Instant::now();
                    let result = optimizer.compile(&source);
                    tracing::debug!(file = %source.file.display(), elapsed = ?started.elapsed(), "compiled with Cranelift");
                    result
                });
                if done.send((job, result)).is_err() {
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the optimizer thread ({e}); plugins keep Winch's code");
        }
    }
}

/// Whether a watcher event may mean new content. Opening and reading a file
/// (which the host itself does to load it) are not changes, nor are
/// metadata updates such as access times; reacting to them made every load
/// trigger the next.
fn changes_content(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Any
            | EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Any | ModifyKind::Data(_) | ModifyKind::Name(_))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// The `.wasm` file a changed path concerns: itself, or the component a
/// `<name>.toml` configures. Temporary files are ignored.
fn wasm_for(path: &Path) -> Option<PathBuf> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("wasm") => Some(path.to_owned()),
        Some("toml") => Some(path.with_extension("wasm")),
        _ => None,
    }
}
