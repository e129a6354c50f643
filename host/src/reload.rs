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
//! Then, for a plugin whose `init` calls nothing, a snapshot after `init`
//! (`Runtime::pre_initialise`) is made in the background and swapped in the
//! same way, unless `plugins.pre_initialise` is off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::clock::doubled;
use crate::config::{
    check_component, confine_settings_file, resolve_plugin, valid_plugin_name, Config, PluginConfig,
};
use crate::registry::{Entry, PluginState, Registry};
use crate::runtime::file::{read_component, read_regular, ComponentBytes};
use crate::runtime::{CallError, LoadError, Optimizer, Plugin, Runtime, Source, Tier};

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
    /// The main configuration's file, read again, does not load: the
    /// plugins keep the settings they have.
    ConfigNotLoaded {
        file: PathBuf,
        error: String,
    },
    /// Sections of the main configuration other than `[plugin.*]` changed:
    /// they apply at the next start.
    ConfigForNextStart {
        file: PathBuf,
        sections: Vec<String>,
    },
}

enum Command {
    /// `atomic`: the path was renamed or removed, not written in place.
    Changed { path: PathBuf, atomic: bool },
    /// Read the main configuration's plugin tables again, rescan the
    /// directory now and answer when done (admin API, SIGHUP, tests).
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
            Report::Failed { .. } | Report::ConfigNotLoaded { .. } => &self.failed,
            Report::Optimized { .. } => &self.optimized,
            Report::Unchanged { .. }
            | Report::StillFailing { .. }
            | Report::ConfigForNextStart { .. } => return,
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

    /// Reads the main configuration's `[plugin.*]` tables again (when the
    /// host was started from a file), reloads every plugin whose files or
    /// settings changed, and waits.
    pub async fn reload(&self) -> Vec<Report> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Rescan(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

/// What the registry serves one plugin from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Unit {
    /// `<stem>.wasm` running as itself: configured by `<stem>.toml` or the
    /// main configuration's `[plugin.<stem>]`, named by its `init`.
    File(PathBuf),
    /// An instance the operator named, of the component its settings name:
    /// `[plugin.<name>] component = "…"` or a `<name>.toml` with
    /// `component`.
    Instance(String),
}

impl Unit {
    /// Its settings file (which may not exist).
    fn settings_file(&self, dir: &Path) -> PathBuf {
        match self {
            Unit::File(wasm) => wasm.with_extension("toml"),
            Unit::Instance(name) => dir.join(format!("{name}.toml")),
        }
    }

    /// Its name in the main configuration (`[plugin.<key>]`).
    fn key(&self) -> String {
        match self {
            Unit::File(wasm) => stem(wasm),
            Unit::Instance(name) => name.clone(),
        }
    }

    /// How reports and errors name it.
    fn label(&self) -> String {
        match self {
            Unit::File(wasm) => wasm.display().to_string(),
            Unit::Instance(name) => format!("instance `{name}`"),
        }
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Which component file a unit runs now, or why that cannot be told.
type Plan = BTreeMap<Unit, Result<PathBuf, String>>;

/// Every plugin the directory and the main configuration describe now:
/// each instance with its component, and each `.wasm` file no instance
/// claims, as itself. Reads the directory and its (small, bounded)
/// settings files: call it off the async threads. A directory that cannot
/// be listed whole is an error, not an empty plan: taken for one, it would
/// unload every plugin (out of file descriptors, a network file system's
/// hiccup).
fn plan(dir: &Path, config: &Config) -> std::io::Result<Plan> {
    let mut wasm = BTreeSet::new();
    let mut settings = Vec::new();
    let paths = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    for path in paths {
        match path.extension().and_then(|e| e.to_str()) {
            Some("wasm") => {
                wasm.insert(path);
            }
            Some("toml") => settings.push(path),
            _ => {}
        }
    }
    let mut instances: BTreeMap<String, Result<PathBuf, String>> = config
        .plugin
        .iter()
        .filter_map(|(name, p)| Some((name.clone(), Ok(dir.join(p.component.as_ref()?)))))
        .collect();
    for file in settings {
        let name = stem(&file);
        let declared = match declared_component(&file) {
            Ok(Some(component)) => check_component(&component)
                .map(|()| dir.join(component))
                .map_err(|e| format!("{}: `component`: {e}", file.display())),
            // The settings of `<name>.wasm`, or of an instance the main
            // configuration declares.
            Ok(None) => continue,
            // Unreadable: reported by the component it configures, if any.
            Err(_) if wasm.contains(&file.with_extension("wasm")) => continue,
            Err(_) if instances.contains_key(&name) => continue,
            Err(e) => Err(e),
        };
        let declared = match declared {
            Ok(_) if !valid_plugin_name(&name) => Err(format!(
                "{}: `{name}` cannot name an instance: use lower case letters, digits and `-`",
                file.display()
            )),
            other => other,
        };
        instances.insert(name, declared);
    }
    let claimed: BTreeSet<&PathBuf> = instances.values().filter_map(|c| c.as_ref().ok()).collect();
    let mut plan: Plan = wasm
        .iter()
        .filter(|w| !claimed.contains(w) && !instances.contains_key(&stem(w)))
        .map(|w| (Unit::File(w.clone()), Ok(w.clone())))
        .collect();
    plan.extend(
        instances
            .into_iter()
            .map(|(name, component)| (Unit::Instance(name), component)),
    );
    Ok(plan)
}

/// The settings a unit's settings file holds (`text`, as read), or else
/// the main configuration's `[plugin.<key>]`.
fn settings_for(
    config: &Config,
    dir: &Path,
    unit: &Unit,
    text: &Result<Option<String>, String>,
) -> Result<PluginConfig, String> {
    let key = unit.key();
    let beside = unit.settings_file(dir);
    match text {
        Ok(Some(text)) => {
            let settings = toml::from_str::<PluginConfig>(text)
                .map_err(|e| format!("{}: {}", beside.display(), unquoted(&e, text)))?;
            confine_settings_file(
                settings,
                config.plugin.get(&key),
                &key,
                &config.default_limits(),
            )
            .map_err(|(k, msg)| format!("{}: `{k}`: {msg}", beside.display()))
        }
        Ok(None) => Ok(config.plugin.get(&key).cloned().unwrap_or_default()),
        Err(e) => Err(e.clone()),
    }
}

/// A plugin the plugins directory and the main configuration describe, as
/// the reload task would load it.
#[derive(Debug)]
pub struct Described {
    /// Its name in the main configuration (`[plugin.<key>]`).
    pub key: String,
    /// The operator's name for it when it is an instance of its component.
    pub instance: Option<String>,
    /// Its component file, or why that cannot be told.
    pub component: Result<PathBuf, String>,
    /// Its settings, or why they cannot be read.
    pub settings: Result<PluginConfig, String>,
}

/// Every plugin the host would load from `config`'s plugins directory,
/// without loading any: for commands that run beside the host (or without
/// it) and must see the same plugins.
pub fn describe(config: &Config) -> std::io::Result<Vec<Described>> {
    let dir = &config.plugins.dir;
    Ok(plan(dir, config)?
        .into_iter()
        .map(|(unit, component)| {
            let text = read_settings(&unit.settings_file(dir));
            Described {
                key: unit.key(),
                instance: match &unit {
                    Unit::File(_) => None,
                    Unit::Instance(name) => Some(name.clone()),
                },
                component,
                settings: settings_for(config, dir, &unit, &text),
            }
        })
        .collect())
}

/// A settings file's text: `None` when there is none, or why it cannot be
/// read (bounded, regular files only).
fn read_settings(file: &Path) -> Result<Option<String>, String> {
    match read_regular(file, MAX_SETTINGS_BYTES) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("{}: not UTF-8 text", file.display())),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Where `text` did not parse and why, without quoting it as toml does:
/// a settings file may be a link to a file that holds a secret (whoever
/// may write the plugins directory may make one), and its first line would
/// reach the log and the admin API.
fn unquoted(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim_end();
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return message.to_owned();
    };
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    format!("line {line}, column {column}: {message}")
}

/// The `component` a settings file names, if any.
fn declared_component(file: &Path) -> Result<Option<String>, String> {
    let Some(text) = read_settings(file)? else {
        return Ok(None);
    };
    let table = toml::from_str::<toml::Table>(&text)
        .map_err(|e| format!("{}: {}", file.display(), unquoted(&e, &text)))?;
    match table.get("component") {
        None => Ok(None),
        Some(toml::Value::String(c)) => Ok(Some(c.clone())),
        Some(_) => Err(format!(
            "{}: `component`: expected the name of a `.wasm` file",
            file.display()
        )),
    }
}

struct Loaded {
    plugin: String,
    wasm: PathBuf,
    sha256: String,
    settings: PluginConfig,
}

/// A plugin that did not load, with what it was when it failed.
struct Failure {
    /// The registry entry that shows the error.
    plugin: String,
    snapshot: Snapshot,
    /// Its `[plugin.<key>]` in the main configuration then: a reload that
    /// finds another tries it again.
    configured: Option<PluginConfig>,
    error: String,
    /// When to try the same files again, for a failure that may pass
    /// (`init` ran out of time, or its kv writes could not be stored);
    /// `None`: only a change of the files retries.
    retry: Option<Retry>,
}

#[derive(Clone, Copy)]
struct Retry {
    at: tokio::time::Instant,
    /// Tries of these files so far, for the backoff.
    tries: u32,
}

/// The first wait before such an `init` is tried again; it doubles with
/// every try, up to [`LOAD_RETRY_MAX`].
const LOAD_RETRY_FIRST: Duration = Duration::from_secs(1);
const LOAD_RETRY_MAX: Duration = Duration::from_secs(300);

impl Failure {
    fn retry_due(&self, now: tokio::time::Instant) -> bool {
        self.retry.is_some_and(|r| r.at <= now)
    }
}

/// Largest `<name>.toml` read.
const MAX_SETTINGS_BYTES: u64 = 1 << 20;

/// What a unit's component file and settings file held when read; equal
/// snapshots load the same way.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    component: Result<PathBuf, String>,
    /// The component's sha256, or why it could not be read.
    wasm: Result<String, String>,
    /// The settings file's text (`None`: there is none), or why it could
    /// not be read.
    settings: Result<Option<String>, String>,
}

impl Snapshot {
    /// Blocking, bounded reads of regular files only. The component's
    /// bytes come back too, so that loading it does not read it again.
    fn read(
        component: Result<PathBuf, String>,
        settings_file: &Path,
        limit: u64,
    ) -> (Snapshot, Option<ComponentBytes>) {
        let settings = read_settings(settings_file);
        let (wasm, bytes) = match component.as_ref().map(|w| read_component(w, limit)) {
            Ok(Ok(read)) => (Ok(read.sha256.clone()), Some(read)),
            Ok(Err(e)) => (Err(e.to_string()), None),
            Err(e) => (Err(e.clone()), None),
        };
        let snapshot = Snapshot {
            component,
            wasm,
            settings,
        };
        (snapshot, bytes)
    }
}

struct Task {
    runtime: Arc<Runtime>,
    registry: Registry,
    config: Arc<Config>,
    dir: PathBuf,
    /// What the directory and configuration described at the last look.
    plan: Plan,
    /// What each unit provides now.
    files: HashMap<Unit, Loaded>,
    /// Why each unit's current files did not load.
    failures: HashMap<Unit, Failure>,
    /// Units refused for a name an unloaded plugin had: to load again in
    /// the reload under way.
    freed: Vec<Unit>,
    /// Units the reload under way takes away (gone from the directory or
    /// configuration): a unit it loads may take a loaded one's name over.
    leaving: BTreeSet<Unit>,
    /// Leaving units whose name a unit loaded in this reload took over,
    /// with that name: nothing is left to unload of them.
    taken: HashMap<Unit, String>,
    counts: Arc<ReloadCounts>,
    /// Cranelift's compilations of baseline plugins; `None` when not tiered.
    optimizing: Option<Optimizing>,
    optimized: mpsc::UnboundedReceiver<(u64, Option<Compiled>)>,
    /// Snapshots after `init` (`Runtime::pre_initialise`) of plugins that
    /// serve Cranelift's code: made off the reload path, since each
    /// compiles twice, and each in its turn, so the listener keeps a core.
    /// What they made is swapped in as they finish; the task stops them
    /// before it ends, as they hold the runtime.
    pre_initialising: tokio::task::JoinSet<Option<Plugin>>,
    turn: Arc<tokio::sync::Semaphore>,
    /// The main configuration's file as the host started with it, when it
    /// was started from one.
    main: Option<MainFile>,
}

/// The main configuration's file, whose `[plugin.*]` tables a reload takes
/// again. Its other sections configure what runs beside the plugins (the
/// listener, the ledger, the clusters) and apply at the next start.
struct MainFile {
    path: PathBuf,
    table: toml::Table,
}

impl MainFile {
    /// The file `config` was loaded from, as it was read then.
    fn of(config: &Config) -> Option<MainFile> {
        Some(MainFile {
            path: config.source.clone(),
            table: config.file_table.clone()?,
        })
    }

    /// The file as it is now, as a table and as the host's configuration.
    fn read(path: &Path) -> Result<(toml::Table, Config), String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let config =
            Config::parse_with_env(&text, path, std::env::vars()).map_err(|e| e.to_string())?;
        Ok((table, config))
    }
}

type Compiled = Result<wasmtime::component::Component, crate::runtime::LoadError>;

/// Component file → the optimizer job whose result is still wanted.
type Wanted = Arc<std::sync::Mutex<HashMap<PathBuf, u64>>>;

/// The reload task's side of the optimizer thread.
struct Optimizing {
    jobs: std::sync::mpsc::Sender<(u64, Source)>,
    /// The thread skips jobs no longer wanted (versions replaced before
    /// their turn).
    wanted: Wanted,
    /// Job → the file and version it compiles. One job serves every
    /// instance of that version.
    pending: HashMap<u64, (PathBuf, String)>,
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
    /// in place of any earlier one for another version of its file.
    fn queue(&mut self, plugin: &Plugin) {
        let mut wanted = self.wanted.lock().expect("optimizer lock");
        let Some(source) = plugin.source() else {
            return;
        };
        let queued = wanted
            .get(plugin.file())
            .and_then(|job| self.pending.get(job))
            .is_some_and(|(_, sha)| sha == plugin.sha256());
        if queued {
            // Another instance of the same version: one compilation serves both.
            return;
        }
        self.next += 1;
        wanted.insert(plugin.file().to_owned(), self.next);
        self.pending.insert(
            self.next,
            (plugin.file().to_owned(), plugin.sha256().to_owned()),
        );
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
    // No turn for a snapshot until the first load is done, as for
    // Cranelift's thread.
    let turn = Arc::new(tokio::sync::Semaphore::new(0));
    let (optimizing, optimizer) = match runtime.optimizer() {
        Some(o) => {
            let (optimizing, thread) = Optimizing::new(o, optimized_tx);
            (Some(optimizing), Some(thread))
        }
        None => (None, None),
    };
    let mut task = Task {
        main: MainFile::of(&config),
        runtime,
        registry,
        config,
        dir,
        plan: Plan::new(),
        files: HashMap::new(),
        failures: HashMap::new(),
        freed: Vec::new(),
        leaving: BTreeSet::new(),
        taken: HashMap::new(),
        counts: Arc::default(),
        optimizing,
        optimized,
        pre_initialising: tokio::task::JoinSet::new(),
        turn: turn.clone(),
    };
    let first = task.rescan().await;
    if let Some(thread) = optimizer {
        thread.spawn();
    }
    turn.add_permits(1);
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
        // Changed path → when to look at it, unless it changes again first.
        let mut dirty: HashMap<PathBuf, tokio::time::Instant> = HashMap::new();
        loop {
            let due = dirty.values().min().copied();
            let retry = self.next_retry();
            let cmd = tokio::select! {
                cmd = rx.recv() => cmd,
                Some(made) = self.pre_initialising.join_next() => {
                    if let Ok(Some(plugin)) = made {
                        self.swap_pre_initialised(plugin);
                    }
                    continue;
                }
                Some((job, result)) = self.optimized.recv() => {
                    let version = self.optimizing.as_mut().and_then(|o| o.pending.remove(&job));
                    if let (Some((file, sha256)), Some(result)) = (version, result) {
                        for report in self.upgrade(&file, &sha256, result).await {
                            self.record(&report);
                        }
                    }
                    continue;
                }
                () = sleep_until(retry) => {
                    for report in self.retry_failed().await {
                        self.record(&report);
                    }
                    continue;
                }
                () = sleep_until(due) => {
                    let now = tokio::time::Instant::now();
                    let ready: Vec<PathBuf> = dirty.iter().filter(|(_, due)| **due <= now).map(|(p, _)| p.clone()).collect();
                    dirty.retain(|_, due| *due > now);
                    for report in self.changed(&ready).await {
                        self.record(&report);
                    }
                    continue;
                }
            };
            match cmd {
                None => {
                    self.pre_initialising.shutdown().await;
                    return;
                }
                Some(Command::Changed { path, atomic }) => {
                    if concerns_plugins(&path) {
                        let quiet = if atomic { SETTLE } else { DEBOUNCE };
                        dirty.insert(path, tokio::time::Instant::now() + quiet);
                    }
                }
                Some(Command::Rescan(reply)) => {
                    dirty.clear();
                    let mut reports = self.reread_main().await;
                    reports.extend(self.rescan().await);
                    let _ = reply.send(reports);
                }
            }
        }
    }

    /// Takes the `[plugin.*]` tables of the main configuration as its file
    /// is now; reports a file that does not load (which changes nothing)
    /// and the other sections that differ from what the host started
    /// with, as those apply at the next start.
    async fn reread_main(&mut self) -> Vec<Report> {
        let Some(started) = &self.main else {
            return Vec::new();
        };
        let path = started.path.clone();
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || MainFile::read(&path)).await
        };
        let (table, config) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => return vec![self.config_report(path, Err(error))],
            Err(e) => return vec![self.config_report(path, Err(format!("reading it failed: {e}")))],
        };
        let sections: BTreeSet<&String> = started.table.keys().chain(table.keys()).collect();
        let elsewhere: Vec<String> = sections
            .into_iter()
            .filter(|k| *k != "plugin" && started.table.get(*k) != table.get(*k))
            .cloned()
            .collect();
        let old = &self.config.plugin;
        let changed: BTreeSet<String> = old
            .keys()
            .chain(config.plugin.keys())
            .filter(|k| old.get(*k) != config.plugin.get(*k))
            .cloned()
            .collect();
        if !changed.is_empty() {
            tracing::info!(file = %path.display(), plugins = ?changed, "the main configuration's settings changed for these plugins");
            self.config = Arc::new(Config {
                plugin: config.plugin,
                ..(*self.config).clone()
            });
        }
        if elsewhere.is_empty() {
            return Vec::new();
        }
        vec![self.config_report(path, Ok(elsewhere))]
    }

    /// Logs and counts what re-reading the main configuration found.
    fn config_report(&self, file: PathBuf, found: Result<Vec<String>, String>) -> Report {
        let report = match found {
            Ok(sections) => Report::ConfigForNextStart { file, sections },
            Err(error) => Report::ConfigNotLoaded { file, error },
        };
        self.record(&report);
        report
    }

    /// Swaps Cranelift's code for Winch's in every plugin that runs this
    /// version of `file` and still serves the load it was made for.
    async fn upgrade(&mut self, file: &Path, sha256: &str, compiled: Compiled) -> Vec<Report> {
        let code = match compiled {
            Ok(code) => code,
            Err(e) => {
                tracing::warn!(file = %file.display(), "Cranelift cannot compile the plugin; Winch's code keeps serving: {e}");
                return Vec::new();
            }
        };
        let names: Vec<String> = self
            .files
            .values()
            .filter(|l| l.wasm == file && l.sha256 == sha256)
            .map(|l| l.plugin.clone())
            .collect();
        let mut reports = Vec::new();
        for plugin in names {
            let Some(baseline) = self.registry.get(&plugin).and_then(|e| e.plugin) else {
                continue;
            };
            if baseline.tier() != Tier::Baseline || baseline.sha256() != sha256 {
                continue;
            }
            let optimized = match self.runtime.upgrade(&baseline, code.clone()).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%plugin, "Cranelift's code failed where Winch's did not; Winch's keeps serving: {e}");
                    continue;
                }
            };
            // `init` awaited: look again before swapping.
            if !self.serving(&baseline) {
                continue;
            }
            let serving = optimized.clone();
            self.registry.update(|r| {
                if let Some(entry) = r.get_mut(&plugin) {
                    entry.plugin = Some(optimized);
                }
            });
            self.pre_initialise_later(&serving);
            reports.push(Report::Optimized {
                file: file.to_owned(),
                plugin,
            });
        }
        reports
    }

    /// Asks for `plugin`'s snapshot after `init` once it serves Cranelift's
    /// code; the result comes back to [`Task::swap_pre_initialised`].
    fn pre_initialise_later(&mut self, plugin: &Plugin) {
        if !self.config.plugins.pre_initialise || !plugin.awaits_snapshot() {
            return;
        }
        let (runtime, registry) = (self.runtime.clone(), self.registry.clone());
        let (turn, plugin) = (self.turn.clone(), plugin.clone());
        self.pre_initialising.spawn(async move {
            let _turn = turn.acquire_owned().await.ok()?;
            // Replaced while it waited: nothing to make.
            if !still_serves(&registry, &plugin) {
                return None;
            }
            Some(runtime.pre_initialise(plugin).await)
        });
    }

    /// Serves `plugin` (a snapshot's, or the same load noting why it has
    /// none) in place of the same load's plain Cranelift code, if that
    /// still serves.
    fn swap_pre_initialised(&self, plugin: Plugin) {
        if !still_serves(&self.registry, &plugin) {
            return;
        }
        let name = plugin.name().to_owned();
        self.registry.update(|r| {
            if let Some(entry) = r.get_mut(&name) {
                entry.plugin = Some(plugin);
            }
        });
    }

    fn serving(&self, baseline: &Plugin) -> bool {
        serving_load(&self.registry, baseline).is_some_and(|p| p.tier() == Tier::Baseline)
    }

    /// Logs what a reload did and counts it for the metrics.
    fn record(&self, report: &Report) {
        log_report(report);
        self.counts.count(report);
    }

    /// What the directory and configuration describe now; `None` when the
    /// directory cannot be read, and then what serves keeps serving.
    async fn look(&self) -> Option<Plan> {
        let (dir, config) = (self.dir.clone(), self.config.clone());
        let read = tokio::task::spawn_blocking(move || plan(&dir, &config))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|read| read);
        match read {
            Ok(plan) => Some(plan),
            Err(e) => {
                tracing::error!(
                    dir = %self.dir.display(),
                    "cannot read the plugins directory: {e}; the plugins loaded keep serving, \
                     and it is read again at the next change or reload"
                );
                None
            }
        }
    }

    /// When the next failed load that may pass is due to be tried again.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.failures
            .values()
            .filter_map(|f| f.retry.map(|r| r.at))
            .min()
    }

    /// Tries again the failed loads that are due, with the files the last
    /// look found (a change of them is the watcher's to report).
    async fn retry_failed(&mut self) -> Vec<Report> {
        let now = tokio::time::Instant::now();
        let due: Vec<Unit> = self
            .failures
            .iter()
            .filter(|(_, f)| f.retry_due(now))
            .map(|(unit, _)| unit.clone())
            .collect();
        let mut reports = Vec::new();
        for unit in due {
            let component = self.plan.get(&unit).cloned();
            reports.push(self.reload_unit(&unit, component).await);
        }
        reports
    }

    /// Brings the registry in line with every file in the directory.
    async fn rescan(&mut self) -> Vec<Report> {
        let Some(plan) = self.look().await else {
            return Vec::new();
        };
        // A misspelt table would leave its plugin without its settings
        // (no `allow`, no `inject`) and say nothing.
        let described: BTreeSet<String> = plan.keys().map(Unit::key).collect();
        for name in self
            .config
            .plugin
            .keys()
            .filter(|k| !described.contains(*k))
        {
            tracing::warn!(
                dir = %self.dir.display(),
                "[plugin.{name}] names no plugin: there is no {name}.wasm in the plugins \
                 directory, and the table names no `component`; its settings wait for such a file"
            );
        }
        let units = self.units(&plan);
        self.reload_units(units, plan).await
    }

    /// Every unit `plan` describes, was described before, serves or failed.
    fn units(&self, plan: &Plan) -> BTreeSet<Unit> {
        let mut units: BTreeSet<Unit> = plan.keys().cloned().collect();
        units.extend(self.plan.keys().cloned());
        units.extend(self.files.keys().cloned());
        units.extend(self.failures.keys().cloned());
        units
    }

    /// Reloads what the `paths` that changed concern: plugins whose
    /// component or settings file is one of them, and plugins that came or
    /// went with them (a settings file that now claims a component for an
    /// instance takes it from the plugin that ran it as itself).
    async fn changed(&mut self, paths: &[PathBuf]) -> Vec<Report> {
        let Some(plan) = self.look().await else {
            return Vec::new();
        };
        let runs = |unit: &Unit, path: &PathBuf| {
            let component = |p: &Plan| p.get(unit).is_some_and(|c| c.as_ref() == Ok(path));
            component(&plan)
                || component(&self.plan)
                || self.files.get(unit).is_some_and(|l| &l.wasm == path)
                || &unit.settings_file(&self.dir) == path
        };
        let mut units = self.units(&plan);
        units.retain(|u| plan.get(u) != self.plan.get(u) || paths.iter().any(|p| runs(u, p)));
        self.reload_units(units, plan).await
    }

    async fn reload_units(&mut self, mut units: BTreeSet<Unit>, plan: Plan) -> Vec<Report> {
        // A name changes hands in one registry update, so an event
        // accepted meanwhile has a subscriber: a unit that takes over a
        // leaving one's name loads before that one is unloaded (an upgrade
        // dropped as a new file, a file turned into an instance). Units
        // refused earlier for the name of one leaving now are tried again.
        self.leaving = units
            .iter()
            .filter(|u| !plan.contains_key(u))
            .cloned()
            .collect();
        for leaving in self.leaving.clone() {
            units.extend(self.free_refused(&leaving));
        }
        let (coming, going): (Vec<Unit>, Vec<Unit>) =
            units.into_iter().partition(|u| plan.contains_key(u));
        let mut reports: Vec<(Unit, Report)> = Vec::new();
        let mut queue: Vec<Unit> = going
            .into_iter()
            .rev()
            .chain(coming.into_iter().rev())
            .collect();
        while let Some(unit) = queue.pop() {
            let component = plan.get(&unit).cloned();
            let report = self.reload_unit(&unit, component).await;
            self.record(&report);
            // A unit freed below is tried again: what it reported before
            // (refused for the name) is not how this reload left it.
            reports.retain(|(u, _)| *u != unit);
            reports.push((unit, report));
            // Refused because a plugin that is gone now had their name
            // (one disabled): they load now, not at some later change of
            // theirs. One still queued is tried in its turn.
            let freed: Vec<Unit> = std::mem::take(&mut self.freed)
                .into_iter()
                .filter(|u| plan.contains_key(u) && !queue.contains(u))
                .collect();
            queue.extend(freed);
        }
        self.plan = plan;
        self.leaving.clear();
        self.taken.clear();
        reports.into_iter().map(|(_, report)| report).collect()
    }

    fn settings_for(&self, unit: &Unit, snapshot: &Snapshot) -> Result<PluginConfig, String> {
        settings_for(&self.config, &self.dir, unit, &snapshot.settings)
    }

    /// Takes a unit out of the registry: it is gone from the directory and
    /// configuration, or disabled.
    fn unload(&mut self, unit: &Unit) -> Option<String> {
        let failed = self.failures.remove(unit).map(|f| f.plugin);
        if let Some(name) = self.taken.remove(unit) {
            // Its name serves another unit's load now.
            return Some(name);
        }
        let loaded = self.files.remove(unit);
        if let Some(old) = &loaded {
            self.forget_optimizing(old);
            let freed = self.free_refused(unit);
            self.freed.extend(freed);
        }
        let loaded = loaded.map(|l| l.plugin);
        if let Some(name) = &loaded {
            self.registry.update(|r| {
                r.remove(name);
            });
        }
        if let Some(name) = &failed {
            self.forget_failed(name);
        }
        loaded.or(failed)
    }

    fn forget_optimizing(&mut self, old: &Loaded) {
        if !old.wasm.exists() {
            if let Some(optimizing) = &mut self.optimizing {
                optimizing.forget(&old.wasm);
            }
        }
    }

    /// Forgets why the units refused for `unit`'s plugin name failed, so
    /// they may load once it is gone, and returns them. Those leaving in
    /// the reload under way too stay as they are, to be unloaded in turn.
    fn free_refused(&mut self, unit: &Unit) -> Vec<Unit> {
        let by = format!("is already provided by {}", unit.label());
        let refused: Vec<(Unit, String)> = self
            .failures
            .iter()
            .filter(|(u, f)| f.error.contains(&by) && !self.leaving.contains(u))
            .map(|(u, f)| (u.clone(), f.plugin.clone()))
            .collect();
        refused
            .into_iter()
            .map(|(unit, name)| {
                self.failures.remove(&unit);
                self.forget_failed(&name);
                unit
            })
            .collect()
    }

    /// Takes out the registry's entry of a plugin that failed to load, if
    /// nothing of it serves.
    fn forget_failed(&self, name: &str) {
        self.registry.update(|r| {
            if r.get(name).is_some_and(|e| e.plugin.is_none()) {
                r.remove(name);
            }
        });
    }

    async fn reload_unit(
        &mut self,
        unit: &Unit,
        component: Option<Result<PathBuf, String>>,
    ) -> Report {
        let Some(component) = component else {
            let file = match unit {
                Unit::File(wasm) => wasm.clone(),
                Unit::Instance(_) => unit.settings_file(&self.dir),
            };
            return match self.unload(unit) {
                Some(plugin) => Report::Removed { file, plugin },
                None => Report::Failed {
                    file,
                    error: "no such file".into(),
                },
            };
        };
        let file = component
            .clone()
            .unwrap_or_else(|_| unit.settings_file(&self.dir));
        let limit = self.runtime.max_file_bytes();
        let (snapshot, bytes) = {
            let (component, settings) = (component.clone(), unit.settings_file(&self.dir));
            match tokio::task::spawn_blocking(move || Snapshot::read(component, &settings, limit))
                .await
            {
                Ok(read) => read,
                Err(e) => return self.failed(unit, file, None, format!("reading failed: {e}")),
            }
        };
        if let Some(failure) = self.failures.get(unit) {
            let same = failure.snapshot == snapshot
                && failure.configured.as_ref() == self.config.plugin.get(&unit.key());
            if same && !failure.retry_due(tokio::time::Instant::now()) {
                return Report::StillFailing {
                    file,
                    error: failure.error.clone(),
                };
            }
        }
        if let Err(error) = &snapshot.wasm {
            let error = error.clone();
            return self.failed(unit, file, Some(snapshot), error);
        }
        let settings = match self.settings_for(unit, &snapshot) {
            Ok(s) => s,
            Err(error) => return self.failed(unit, file, Some(snapshot), error),
        };
        if !settings.enabled {
            self.unload(unit);
            return Report::Disabled { file };
        }
        let key = unit.key();
        let resolved = match resolve_plugin(&settings, &key, self.config.default_limits()) {
            Ok(s) => s,
            Err((k, msg)) => {
                return self.failed(unit, file, Some(snapshot), format!("`{k}`: {msg}"))
            }
        };
        // Skip the work when neither the bytes nor the settings changed.
        if let Some(old) = self.files.get(unit) {
            let same_bytes = snapshot.wasm.as_deref() == Ok(old.sha256.as_str());
            if same_bytes && old.wasm == file && old.settings == settings {
                // Back to what serves after a failed change: the error is
                // no longer news.
                if self.failures.remove(unit).is_some() {
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
        let instance = match unit {
            Unit::File(_) => None,
            Unit::Instance(name) => Some(name.clone()),
        };
        let plugin = match self
            .runtime
            .load_read(&file, bytes, resolved, instance)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                // Out of time (a busy host) or without its kv (a store
                // that was down): the same files may load later. A refusal
                // or a trap is the plugin's verdict, until the files change.
                let may_pass = matches!(
                    e,
                    LoadError::Init {
                        source: CallError::Timeout { .. } | CallError::Kv { .. },
                        ..
                    }
                );
                let tries = self
                    .failures
                    .get(unit)
                    .filter(|f| f.snapshot == snapshot)
                    .and_then(|f| f.retry)
                    .map_or(0, |r| r.tries);
                let report = self.failed(unit, file, Some(snapshot), e.to_string());
                if may_pass {
                    let wait = doubled(LOAD_RETRY_FIRST, tries, LOAD_RETRY_MAX);
                    if let Some(f) = self.failures.get_mut(unit) {
                        f.retry = Some(Retry {
                            at: tokio::time::Instant::now() + wait,
                            tries: tries + 1,
                        });
                    }
                    tracing::warn!(plugin = %unit.key(), "its init may succeed later: tried again in {}", humantime::format_duration(wait));
                }
                return report;
            }
        };
        let name = plugin.name().to_owned();
        // A name the operator pinned goes with the pinned file only: another
        // file may not take it (its kv, its deliveries) by declaring it.
        if let Some(pin) = self
            .config
            .plugin
            .get(&name)
            .filter(|_| name != unit.key())
            .and_then(|p| p.sha256.as_deref())
            .filter(|pin| !pin.eq_ignore_ascii_case(plugin.sha256()))
        {
            let error = format!(
                "plugin name `{name}` is pinned to another file by `plugin.{name}.sha256` ({})",
                &pin[..pin.len().min(12)]
            );
            return self.failed(unit, file, Some(snapshot), error);
        }
        let holder = self
            .files
            .iter()
            .find(|(u, l)| l.plugin == name && *u != unit)
            .map(|(u, _)| u.clone());
        if let Some(other) = holder {
            if !self.leaving.contains(&other) {
                let error = format!(
                    "plugin name `{name}` is already provided by {}",
                    other.label()
                );
                return self.failed(unit, file, Some(snapshot), error);
            }
            // Going in this reload: the registry's entry passes to this
            // load below, with no moment in between.
            if let Some(old) = self.files.remove(&other) {
                self.forget_optimizing(&old);
            }
            self.taken.insert(other, name.clone());
        }
        // Known by its key while it failed: by its name from now on.
        if let Some(failure) = self.failures.remove(unit) {
            if failure.plugin != name {
                self.forget_failed(&failure.plugin);
            }
        }
        let report = Report::Loaded {
            file: file.clone(),
            plugin: name.clone(),
            version: plugin.info().version.clone(),
            sha256: plugin.sha256().to_owned(),
            from_cache: plugin.from_cache(),
            tier: plugin.tier(),
        };
        let previous = self.files.insert(
            unit.clone(),
            Loaded {
                plugin: name.clone(),
                wasm: file,
                sha256: plugin.sha256().to_owned(),
                settings: settings.clone(),
            },
        );
        let coalesce = settings.coalesce;
        if let Some(optimizing) = &mut self.optimizing {
            optimizing.queue(&plugin);
        }
        let serving = plugin.clone();
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
        self.pre_initialise_later(&serving);
        report
    }

    /// Records a failed load: the serving version (if any) stays, marked
    /// with the error; a plugin that never loaded is listed as failed. The
    /// same snapshot is not tried again, unless the caller sets a retry (an
    /// `init` that may succeed later).
    fn failed(
        &mut self,
        unit: &Unit,
        file: PathBuf,
        snapshot: Option<Snapshot>,
        error: String,
    ) -> Report {
        let name = self
            .files
            .get(unit)
            .map(|l| l.plugin.clone())
            // Until it loads, a plugin is known by its key.
            .unwrap_or_else(|| unit.key());
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
                unit.clone(),
                Failure {
                    plugin: name.clone(),
                    snapshot,
                    configured: self.config.plugin.get(&unit.key()).cloned(),
                    error: error.clone(),
                    retry: None,
                },
            );
        }
        Report::Failed { file, error }
    }
}

/// What serves under `plugin`'s name, if it is the same load as `plugin`
/// (whichever code it runs).
fn serving_load(registry: &Registry, plugin: &Plugin) -> Option<Plugin> {
    registry
        .get(plugin.name())
        .and_then(|e| e.plugin)
        .filter(|p| p.same_load(plugin))
}

/// Whether the same load as `plugin`'s serves, still awaiting its
/// snapshot after `init`.
fn still_serves(registry: &Registry, plugin: &Plugin) -> bool {
    serving_load(registry, plugin).is_some_and(|p| p.awaits_snapshot())
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
        Report::ConfigNotLoaded { file, error } => {
            tracing::warn!(file = %file.display(), "the main configuration does not load; the plugins keep the settings they have: {error}")
        }
        Report::ConfigForNextStart { file, sections } => {
            tracing::warn!(file = %file.display(), "`{}` changed in the main configuration: that applies at the next start", sections.join("`, `"))
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

/// Whether a changed path may concern a plugin: a component or a settings
/// file. Temporary files are ignored.
fn concerns_plugins(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("wasm" | "toml")
    )
}
