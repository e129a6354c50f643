//! Hot reload of the plugins directory, with real components and real
//! files: what is dropped, replaced, broken or removed takes effect without
//! a restart, a broken file never replaces a working version, and no event
//! is lost across reloads.

use crate::common::{self, probe_variant, HostConfig};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use prismhook::app::App;
use prismhook::config::Config;
use prismhook::ledger::PluginBacklog;
use prismhook::registry::PluginState;
use prismhook::reload::Report;
use prismhook::runtime::kv_store::KvStore;
use prismhook::runtime::Tier;

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        common::init_tracing();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        Host { dir }
    }

    fn plugins(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    fn config(&self, watch: bool) -> Config {
        self.host(watch).config()
    }

    /// Quick retries, three attempts, quarantine after five failed calls
    /// for 300 ms, a 1 s deadline.
    fn host(&self, watch: bool) -> HostConfig {
        HostConfig::new(self.dir.path())
            .delivery(r#"retry_initial = "20ms""#)
            .delivery(r#"retry_max = "50ms""#)
            .delivery("max_attempts = 3")
            .delivery("quarantine_after = 5")
            .delivery(r#"quarantine_pause = "300ms""#)
            .watch(watch)
            .plugins_setting("limits = { deadline_ms = 1000 }")
    }

    async fn start(&self, watch: bool) -> App {
        App::start(self.config(watch)).await.unwrap()
    }

    /// Writes a file in one step, as a careful deployer would.
    fn install(&self, name: &str, bytes: &[u8]) {
        let tmp = self.plugins().join(format!(".{name}.partial"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(tmp, self.plugins().join(name)).unwrap();
    }

    fn kv(&self) -> BTreeMap<String, Vec<u8>> {
        KvStore::open(&self.dir.path().join("data/kv.redb"))
            .unwrap()
            .dump("probe")
            .unwrap()
    }
}

/// Whether the ledger holds the probe's deliveries as `holds` says.
fn probe_backlog(app: &App, holds: impl Fn(&PluginBacklog) -> bool) -> bool {
    app.ledger
        .backlog()
        .unwrap()
        .iter()
        .any(|b| b.plugin == "probe" && holds(b))
}

async fn wait(ready: impl FnMut() -> bool, what: &str) {
    common::wait_until(what, Duration::from_secs(60), ready).await
}

async fn drained(app: &App) {
    tokio::time::sleep(Duration::from_millis(30)).await;
    wait(
        || {
            app.ledger
                .backlog()
                .unwrap()
                .iter()
                .all(|b| b.pending + b.in_flight == 0)
        },
        "deliveries to finish",
    )
    .await;
}

/// Delivers one event, stops the host, and checks that the probe (as
/// itself) recorded it exactly once.
async fn handles_one_event_as_the_probe(h: &Host, app: App) {
    let id = common::append(&app, 1, "vm-a", "VM.ON").await;
    drained(&app).await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&h.kv()["seen/lab/vm-a"]),
        format!("{id}:1:VM.ON")
    );
}

fn sha(app: &App) -> Option<String> {
    app.registry
        .get("probe")
        .and_then(|e| e.plugin)
        .map(|p| p.sha256().to_owned())
}

fn tier(app: &App) -> Option<Tier> {
    app.registry
        .get("probe")
        .and_then(|e| e.plugin)
        .map(|p| p.tier())
}

fn pre_initialised(app: &App) -> Option<bool> {
    app.registry
        .get("probe")
        .and_then(|e| e.plugin)
        .map(|p| p.pre_initialised())
}

/// What the cache holds once the probe (whose `init` reads only its
/// configuration) runs Cranelift's code: that code, and the two
/// compilations of its snapshot after `init` (the component instrumented to
/// take it, and the snapshot).
const SNAPSHOTTED: usize = 3;

fn cache_entries(h: &Host) -> Vec<PathBuf> {
    std::fs::read_dir(h.dir.path().join("data/cache"))
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for the probe's snapshot after `init` to serve, and checks that
/// the cache then holds its three compilations.
async fn snapshot_serves(h: &Host, app: &App) {
    wait(
        || pre_initialised(app) == Some(true),
        "the snapshot after init to serve",
    )
    .await;
    assert_eq!(cache_entries(h).len(), SNAPSHOTTED);
}

/// Looks from another thread, until stopped, at whether the probe's name
/// is served: an event accepted while it is not has no subscriber, and is
/// never queued for it.
struct ServedWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl ServedWatch {
    fn start(app: &App) -> ServedWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let registry = app.registry.clone();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut looks, mut unserved) = (0, 0);
            while !stopped.load(Ordering::Relaxed) {
                looks += 1;
                if !registry
                    .get("probe")
                    .is_some_and(|e| e.subscribes_to("VM.ON"))
                {
                    unserved += 1;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            (looks, unserved)
        });
        ServedWatch { stop, thread }
    }

    /// Stops looking and checks that every look found the name served.
    fn served_throughout(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (looks, unserved) = self.thread.join().unwrap();
        assert!(looks > 0);
        assert_eq!(unserved, 0, "unserved in {unserved} of {looks} looks");
    }
}

#[tokio::test]
async fn a_plugin_dropped_into_the_directory_is_served_without_a_restart() {
    let h = Host::new();
    let app = h.start(true).await;
    assert!(app.registry.get("probe").is_none());
    h.install("probe.wasm", &probe_variant(1));
    wait(
        || {
            app.registry
                .get("probe")
                .is_some_and(|e| e.plugin.is_some())
        },
        "the probe to load",
    )
    .await;
    handles_one_event_as_the_probe(&h, app).await;
}

/// An upgrade dropped beside the old file is refused while the old one
/// provides its name, and serves as soon as the old one is removed: not at
/// some later change of its own, and with the name served throughout.
#[tokio::test]
async fn a_file_refused_for_its_plugins_name_serves_once_the_file_that_had_it_goes() {
    let h = Host::new();
    h.install("probe-old.wasm", &probe_variant(1));
    let app = h.start(true).await;
    let old = sha(&app).expect("the old file serves");
    h.install("probe-new.wasm", &probe_variant(2));
    wait(
        || {
            app.registry
                .get("probe-new")
                .and_then(|e| e.load_error)
                .is_some_and(|e| e.contains("already provided by"))
        },
        "the new file to be refused for the name",
    )
    .await;
    assert_eq!(
        sha(&app).as_deref(),
        Some(old.as_str()),
        "the old one serves on"
    );

    let watch = ServedWatch::start(&app);
    std::fs::remove_file(h.plugins().join("probe-old.wasm")).unwrap();
    wait(
        || sha(&app).is_some_and(|s| s != old),
        "the new file to serve the name",
    )
    .await;
    watch.served_throughout();
    assert!(
        app.registry.get("probe-new").is_none(),
        "no entry left of the refusal"
    );
    handles_one_event_as_the_probe(&h, app).await;
}

/// The file that had the name and the one refused for it, removed together:
/// both reported removed, no failure made up for the refused one.
#[tokio::test]
async fn a_holder_and_the_file_refused_for_its_name_removed_together_are_both_removed() {
    let h = Host::new();
    h.install("probe-old.wasm", &probe_variant(1));
    h.install("probe-new.wasm", &probe_variant(2));
    let app = h.start(false).await;
    assert!(
        app.loaded.iter().any(
            |r| matches!(r, Report::Failed { error, .. } if error.contains("already provided by"))
        ),
        "{:?}",
        app.loaded
    );
    std::fs::remove_file(h.plugins().join("probe-old.wasm")).unwrap();
    std::fs::remove_file(h.plugins().join("probe-new.wasm")).unwrap();
    let reports = app.reloader.reload().await;
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(
        reports.iter().all(|r| matches!(r, Report::Removed { .. })),
        "{reports:?}"
    );
    assert!(app.registry.get("probe").is_none());
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// An upgrade under a new file name, the old file removed in the same
/// reload: the new version takes the name over before the old one is
/// unloaded.
#[tokio::test]
async fn an_upgrade_under_a_new_file_name_serves_the_name_throughout_its_reload() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(1));
    let app = h.start(false).await;
    let old = sha(&app).expect("the old file serves");
    let watch = ServedWatch::start(&app);
    h.install("probe-2.wasm", &probe_variant(2));
    std::fs::remove_file(h.plugins().join("probe.wasm")).unwrap();
    let reports = app.reloader.reload().await;
    watch.served_throughout();
    assert!(
        matches!(
            &reports[..],
            [Report::Loaded { plugin: a, file, .. }, Report::Removed { plugin: b, .. }]
                if a == "probe" && b == "probe" && file.ends_with("probe-2.wasm")
        ),
        "{reports:?}"
    );
    assert!(
        sha(&app).is_some_and(|s| s != old),
        "the new version serves"
    );
    assert!(app.registry.get("probe").unwrap().load_error.is_none());
    handles_one_event_as_the_probe(&h, app).await;
}

/// A name whose table pins a file is that file's: another file that
/// declares the name (to take its kv and its deliveries) is refused.
#[tokio::test]
async fn a_file_declaring_a_name_pinned_to_another_file_is_refused() {
    use sha2::Digest;
    let h = Host::new();
    let pinned = probe_variant(1);
    let pin = hex(&sha2::Sha256::digest(&pinned));
    h.install("impostor.wasm", &probe_variant(2));
    let app = App::start(
        h.host(false)
            .plugin("probe", &[format!(r#"sha256 = "{pin}""#)])
            .config(),
    )
    .await
    .unwrap();
    assert!(
        matches!(&app.loaded[..], [Report::Failed { error, .. }] if error.contains("plugin name `probe` is pinned to another file")),
        "{:?}",
        app.loaded
    );
    assert!(sha(&app).is_none(), "nothing serves the name");

    h.install("probe.wasm", &pinned);
    let reports = app.reloader.reload().await;
    assert!(
        reports
            .iter()
            .any(|r| matches!(r, Report::Loaded { plugin, .. } if plugin == "probe")),
        "{reports:?}"
    );
    handles_one_event_as_the_probe(&h, app).await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A batch goes to the version that serves when it starts: one loaded
/// while the batch was being claimed and gathered takes it.
#[tokio::test]
async fn a_batch_gathered_across_a_reload_goes_to_the_new_version() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(1));
    h.install("probe.toml", b"config = { version = 1 }\n");
    let app = App::start(
        h.host(false)
            .delivery(r#"batch_window = "3s""#)
            .delivery("max_attempts = 1")
            .config(),
    )
    .await
    .unwrap();
    common::append(&app, 1, "vm-a", "TEST.CONFIG").await;
    // Claimed, then held for the window while more may come.
    wait(
        || probe_backlog(&app, |b| b.in_flight == 1),
        "the event to be claimed",
    )
    .await;
    h.install("probe.toml", b"config = { version = 2 }\n");
    let reports = app.reloader.reload().await;
    assert!(
        reports.iter().any(|r| matches!(r, Report::Loaded { .. })),
        "{reports:?}"
    );
    wait(
        || probe_backlog(&app, |b| b.dead == 1),
        "the event to be handled",
    )
    .await;
    let dead = app
        .ledger
        .dead_letters(Some("probe"), None, 10)
        .await
        .unwrap();
    assert!(
        dead[0].reason.contains(r#""version":2"#),
        "{}",
        dead[0].reason
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// A directory that cannot be read is not an empty one: what serves goes
/// on serving.
#[tokio::test]
async fn a_plugins_directory_that_cannot_be_read_unloads_nothing() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(1));
    let app = h.start(false).await;
    let moved = h.dir.path().join("elsewhere");
    std::fs::rename(h.plugins(), &moved).unwrap();
    let reports = app.reloader.reload().await;
    assert!(reports.is_empty(), "{reports:?}");
    assert!(sha(&app).is_some(), "the probe serves on");
    std::fs::rename(&moved, h.plugins()).unwrap();
    handles_one_event_as_the_probe(&h, app).await;
}

#[tokio::test]
async fn a_file_written_in_place_is_loaded_once_the_writes_stop_not_half_written() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(true).await;
    let before = sha(&app).unwrap();
    // A slow copy over the old file: three writes, each well inside the
    // debounce, the first two leaving a truncated component behind.
    let full = probe_variant(1);
    let file = h.plugins().join("probe.wasm");
    let mut out = std::fs::File::create(&file).unwrap();
    for chunk in full.chunks(full.len() / 3 + 1) {
        use std::io::Write;
        out.write_all(chunk).unwrap();
        out.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    drop(out);
    wait(
        || sha(&app).is_some_and(|s| s != before),
        "the finished copy to load",
    )
    .await;
    // The watcher saw every write, but the reload task waited for them to
    // stop: it never tried the half-written file.
    assert_eq!(
        app.reloader
            .counts()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(app.registry.get("probe").unwrap().load_error.is_none());
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn replacing_a_plugin_under_load_loses_no_event() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(true).await;
    let mut ids: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seq = 0;
    for version in 1..=5u32 {
        let before = sha(&app);
        h.install("probe.wasm", &probe_variant(version));
        // Keep events coming while the reload task notices, compiles and
        // swaps.
        while sha(&app) == before {
            seq += 1;
            let entity = format!("vm-{}", seq % 7);
            let id = common::append(&app, seq, &entity, "VM.UPDATE").await;
            ids.entry(entity).or_default().push(id);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    drained(&app).await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    assert!(seq > 5, "events were flowing during the reloads");
    let kv = h.kv();
    for (entity, sent) in ids {
        let seen: Vec<u64> = String::from_utf8_lossy(&kv[&format!("seen/lab/{entity}")])
            .lines()
            .map(|l| l.split(':').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(seen, sent, "{entity}: every event once, in order");
    }
}

#[tokio::test]
async fn a_broken_file_is_reported_and_the_previous_version_keeps_serving() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(false).await;
    let good = sha(&app).unwrap();
    let full = probe_variant(1);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated while being copied",
            full[..full.len() / 2].to_vec(),
            "invalid component",
        ),
        (
            "not wasm",
            b"#!/bin/sh\necho hi\n".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "a core module",
            wat::parse_str("(module)").unwrap(),
            "a core WebAssembly module, not a component",
        ),
        (
            "a component of another world",
            wat::parse_str("(component)").unwrap(),
            "does not fit the host's world prismhook:plugin@0.1.4",
        ),
    ];
    for (what, bytes, expected) in cases {
        std::fs::write(h.plugins().join("probe.wasm"), &bytes).unwrap();
        let reports = app.reloader.reload().await;
        let Some(Report::Failed { error, file }) = reports.into_iter().next() else {
            panic!("{what}: not reported")
        };
        assert!(error.contains(expected), "{what}: {error}");
        assert!(
            error.contains(&file.display().to_string()),
            "{what}: the error names the file: {error}"
        );
        let entry = app.registry.get("probe").unwrap();
        assert_eq!(
            entry.plugin.unwrap().sha256(),
            good,
            "{what}: the old version serves"
        );
        assert!(entry.load_error.unwrap().contains(expected));
    }
    // Settings the plugin refuses, and a trap in init, also keep the old one.
    std::fs::write(h.plugins().join("probe.wasm"), &full).unwrap();
    // Settings that do not parse are located, not quoted: the file may be a
    // link to one that holds a secret.
    let secret = h.dir.path().join("secret");
    std::fs::write(&secret, "s3cret-in-another-file\n").unwrap();
    std::os::unix::fs::symlink(&secret, h.plugins().join("probe.toml")).unwrap();
    let reports = app.reloader.reload().await;
    let Some(Report::Failed { error, .. }) = reports.into_iter().next() else {
        panic!("a settings file that does not parse is not reported")
    };
    assert!(error.contains("probe.toml: line 1, column"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
    std::fs::remove_file(h.plugins().join("probe.toml")).unwrap();
    for (settings, expected) in [
        (
            "config = { refuse = true }",
            "init refused the configuration: refusing to start",
        ),
        (
            "config = { trap_in_init = true }",
            "init failed: plugin `probe` trapped in init",
        ),
    ] {
        std::fs::write(h.plugins().join("probe.toml"), settings).unwrap();
        let reports = app.reloader.reload().await;
        assert!(
            matches!(&reports[0], Report::Failed { error, .. } if error.contains(expected)),
            "{reports:?}"
        );
        assert_eq!(sha(&app).unwrap(), good);
    }
    // The finished copy with sane settings is taken.
    std::fs::remove_file(h.plugins().join("probe.toml")).unwrap();
    let reports = app.reloader.reload().await;
    assert!(matches!(&reports[0], Report::Loaded { .. }), "{reports:?}");
    assert_ne!(sha(&app).unwrap(), good);
    assert!(app.registry.get("probe").unwrap().load_error.is_none());
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_removed_plugin_keeps_its_pending_deliveries_until_it_comes_back() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(false).await;
    // A slow event keeps the probe busy while more queue behind it.
    let slow = common::append(&app, 1, "vm-slow", "TEST.LOOP").await;
    wait(
        || probe_backlog(&app, |b| b.in_flight == 1),
        "the slow event to be in hand",
    )
    .await;
    let queued = common::append(&app, 2, "vm-slow", "VM.ON").await;
    std::fs::remove_file(h.plugins().join("probe.wasm")).unwrap();
    let reports = app.reloader.reload().await;
    assert!(
        matches!(&reports[0], Report::Removed { plugin, .. } if plugin == "probe"),
        "{reports:?}"
    );
    assert!(app.registry.get("probe").is_none());
    // The batch in hand finishes on the removed version, or goes back
    // untried if its call had not started; after that nothing is in flight.
    wait(
        || {
            app.ledger
                .backlog()
                .unwrap()
                .iter()
                .all(|b| b.in_flight == 0)
        },
        "the batch in hand to finish",
    )
    .await;
    let backlog = app.ledger.backlog().unwrap();
    let probe = backlog.iter().find(|b| b.plugin == "probe").unwrap();
    // Removed before the call started, the batch went back untried;
    // during it, the slow one ran out of time and is retrying. Either way
    // both wait, and neither is lost or delivered.
    assert_eq!(
        (probe.pending, probe.dead, probe.delivered),
        (2, 0, 0),
        "both wait: {probe:?}"
    );
    assert!(probe.retrying <= 1, "{probe:?}");
    // Back again: the queued event is delivered.
    h.install("probe.wasm", &probe_variant(1));
    app.reloader.reload().await;
    wait(
        || h.kv_opt_contains(&app, "seen/lab/vm-slow", &format!("{queued}:")),
        "the queued event to be delivered",
    )
    .await;
    let _ = slow;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn the_deliveries_of_a_plugin_removed_for_good_expire_to_the_dead_letters() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = App::start(
        h.host(false)
            .delivery(r#"removed_plugin_expiry = "400ms""#)
            .config(),
    )
    .await
    .unwrap();
    std::fs::remove_file(h.plugins().join("probe.wasm")).unwrap();
    // Subscribers are taken before the removal, as for events that were
    // already queued when the file went away.
    let subscribers = app.registry.subscribers("VM.ON");
    assert_eq!(subscribers, vec!["probe".to_owned()]);
    app.reloader.reload().await;
    let mut ids = Vec::new();
    for seq in 1..=3 {
        let entity = format!("vm-{seq}");
        let body = "{}".to_owned();
        ids.push(common::append_for(&app, seq, &entity, "VM.ON", body, subscribers.clone()).await);
    }
    wait(
        || probe_backlog(&app, |b| b.dead == 3 && b.pending == 0),
        "the queued deliveries to expire",
    )
    .await;
    let dead = app
        .ledger
        .dead_letters(Some("probe"), None, 10)
        .await
        .unwrap();
    let mut dead_ids: Vec<u64> = dead.iter().map(|d| d.event.id).collect();
    dead_ids.sort();
    assert_eq!(dead_ids, ids);
    // The host's reason as it is, not a rejection the plugin never made,
    // and no attempt counted.
    assert!(
        dead.iter().all(|d| d
            .reason
            .starts_with("plugin `probe` was removed more than 400ms ago")
            && d.attempts == 0),
        "{dead:?}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_plugin_whose_init_ran_out_of_time_is_tried_again_and_keeps_its_backlog_meanwhile() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    // Its first init runs out of time, as on a host too busy; the expiry of
    // removed plugins' deliveries passes before the next try.
    let app = App::start(
        h.host(false)
            .plugin(
                "probe",
                &[
                    "config = { stall_inits = 1 }",
                    "limits = { deadline_ms = 300 }",
                ],
            )
            .delivery(r#"removed_plugin_expiry = "400ms""#)
            .config(),
    )
    .await
    .unwrap();
    let entry = app
        .registry
        .get("probe")
        .expect("listed although it failed");
    assert!(entry.plugin.is_none());
    assert!(
        entry
            .load_error
            .as_deref()
            .is_some_and(|e| e.contains("exceeded its deadline of 300ms in init")),
        "{:?}",
        entry.load_error
    );
    for seq in 1..=2 {
        let (entity, body) = (format!("vm-{seq}"), "{}".to_owned());
        common::append_for(&app, seq, &entity, "VM.ON", body, vec!["probe".into()]).await;
    }
    wait(
        || probe_backlog(&app, |b| b.delivered == 2),
        "the plugin to load on its next try and deliver what waited",
    )
    .await;
    let probe = app.ledger.backlog().unwrap();
    assert!(probe.iter().all(|b| b.dead == 0), "{probe:?}");
    assert!(app.registry.get("probe").unwrap().load_error.is_none());
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

impl Host {
    /// What the running host's probe has stored under `key`.
    fn kv_live(&self, app: &App, key: &str) -> Vec<u8> {
        app.runtime
            .kv()
            .dump("probe")
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether the running host's probe has recorded `needle` under `key`:
    /// read through the runtime's own store, which the running host holds.
    fn kv_opt_contains(&self, app: &App, key: &str, needle: &str) -> bool {
        app.runtime
            .kv()
            .dump("probe")
            .ok()
            .and_then(|kv| {
                kv.get(key)
                    .map(|v| String::from_utf8_lossy(v).contains(needle))
            })
            .unwrap_or(false)
    }
}

#[tokio::test]
async fn a_new_file_serves_with_winch_code_until_cranelift_code_takes_over() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(false).await;
    // Nothing cached: the plugin serves at once with Winch's code...
    assert!(
        matches!(
            &app.loaded[0],
            Report::Loaded {
                from_cache: false,
                tier: Tier::Baseline,
                ..
            }
        ),
        "{:?}",
        app.loaded
    );
    let first = common::append(&app, 1, "vm-a", "VM.ON").await;
    drained(&app).await;
    assert_eq!(
        String::from_utf8_lossy(&h.kv_live(&app, "seen/lab/vm-a")),
        format!("{first}:1:VM.ON")
    );

    // ...until Cranelift's, compiled on the optimizer thread and cached,
    // takes over: same load, same file, same state.
    wait(
        || tier(&app) == Some(Tier::Optimized),
        "Cranelift's code to serve",
    )
    .await;
    // Then, off the reload path, its snapshot after init.
    snapshot_serves(&h, &app).await;
    let state = app.registry.get("probe").unwrap().state;
    assert_eq!(state, PluginState::Active);
    let second = common::append(&app, 2, "vm-a", "VM.OFF").await;
    drained(&app).await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&h.kv()["seen/lab/vm-a"]),
        format!("{first}:1:VM.ON\n{second}:1:VM.OFF"),
        "each event handled once, by one tier or the other"
    );

    // A restart maps Cranelift's code from the cache: no Winch step.
    let app = h.start(false).await;
    assert!(
        matches!(
            &app.loaded[0],
            Report::Loaded {
                from_cache: true,
                ..
            }
        ),
        "{:?}",
        app.loaded
    );
    assert_eq!(tier(&app), Some(Tier::Optimized));
    // The snapshot is taken again, from code the cache holds.
    snapshot_serves(&h, &app).await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn without_tiering_a_new_file_waits_for_cranelift() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let config = HostConfig::new(h.dir.path())
        .plugins_setting("tiered = false")
        .config();
    let app = App::start(config).await.unwrap();
    assert!(
        matches!(
            &app.loaded[0],
            Report::Loaded {
                from_cache: false,
                tier: Tier::Optimized,
                ..
            }
        ),
        "{:?}",
        app.loaded
    );
    snapshot_serves(&h, &app).await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn with_snapshots_off_init_runs_in_every_call_and_nothing_more_is_compiled() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let config = HostConfig::new(h.dir.path())
        .plugins_setting("tiered = false")
        .plugins_setting("pre_initialise = false")
        .config();
    let app = App::start(config).await.unwrap();
    assert_eq!(tier(&app), Some(Tier::Optimized));
    common::append(&app, 1, "vm-a", "VM.ON").await;
    drained(&app).await;
    // The test above, with snapshots on, sees the snapshot well within this
    // wait; here it must never come.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pre_initialised(&app), Some(false));
    assert_eq!(cache_entries(&h).len(), 1, "Cranelift's code only");
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// A plugin whose `init` calls the host (here kv) cannot be snapshotted:
/// the plugin list says why its calls run `init`, and that load is not
/// tried again.
#[tokio::test]
async fn a_plugin_whose_init_calls_the_host_is_listed_with_why_it_runs_init_in_every_call() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let config = HostConfig::new(h.dir.path())
        .plugins_setting("tiered = false")
        .plugin("probe", &["config = { count_inits = true }"])
        .config();
    let app = App::start(config).await.unwrap();
    let why = || app.registry.status()["probe"].init_every_call.clone();
    wait(|| why().is_some(), "the snapshot to be refused").await;
    assert_eq!(
        why().as_deref(),
        Some("its `init` calls the host's kv, http or inventory imports, so the state it leaves is not kept")
    );
    assert_eq!(app.registry.status()["probe"].pre_initialised, Some(false));
    assert_eq!(cache_entries(&h).len(), 1, "Cranelift's code only");
    common::append(&app, 1, "vm-a", "VM.ON").await;
    drained(&app).await;
    assert!(why().is_some(), "still listed after the call");
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&h.kv()["inits"]),
        "2",
        "the load's init and the call's"
    );
}

#[tokio::test]
async fn a_corrupt_cache_entry_is_rebuilt_not_trusted() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(false).await;
    assert!(
        matches!(
            &app.loaded[0],
            Report::Loaded {
                from_cache: false,
                ..
            }
        ),
        "{:?}",
        app.loaded
    );
    // Cranelift's code is what the cache keeps.
    wait(
        || tier(&app) == Some(Tier::Optimized),
        "Cranelift's code to serve",
    )
    .await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();

    // A warm restart takes the compiled code from the cache.
    let app = h.start(false).await;
    assert!(
        matches!(
            &app.loaded[0],
            Report::Loaded {
                from_cache: true,
                ..
            }
        ),
        "{:?}",
        app.loaded
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();

    // Flip bytes in the middle of every compiled entry (not its checksum).
    let cache = h.dir.path().join("data/cache");
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cwasm") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        bytes[mid + 1] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let app = h.start(false).await;
    assert!(
        matches!(
            &app.loaded[0],
            Report::Loaded {
                from_cache: false,
                ..
            }
        ),
        "{:?}",
        app.loaded
    );
    common::append(&app, 1, "vm-a", "VM.ON").await;
    drained(&app).await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    assert!(h.kv().contains_key("seen/lab/vm-a"));
}

/// Batches that trap, `n` of them, on as many entities so that they are
/// not ordered behind one another, until the probe is quarantined.
async fn trap_until_quarantined(app: &App, n: u64) {
    for i in 0..n {
        common::append(app, i, &format!("vm-{i}"), "TEST.TRAP").await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait(
        || app.dispatcher.quarantined().contains_key("probe"),
        "quarantine",
    )
    .await;
}

#[tokio::test]
async fn a_plugin_that_keeps_trapping_is_quarantined_and_recovers() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = h.start(false).await;
    trap_until_quarantined(&app, 5).await;
    let reason = app.dispatcher.quarantined()["probe"].reason.clone();
    assert_eq!(
        app.registry.get("probe").map(|e| e.state),
        Some(PluginState::Active),
        "a quarantine pauses deliveries; the plugin stays loaded"
    );
    assert!(reason.contains("trapped in handle"), "{reason}");
    // Events keep queueing while it is quarantined; when it is tried
    // again the trapping events are isolated, so the healthy one gets
    // through instead of failing with them.
    let ok = common::append(&app, 100, "vm-ok", "VM.ON").await;
    wait(
        || h.kv_opt_contains(&app, "seen/lab/vm-ok", &format!("{ok}:")),
        "delivery after quarantine",
    )
    .await;
    // The trapping events die after their attempts; the next healthy call
    // lifts the quarantine.
    wait(
        || probe_backlog(&app, |b| b.dead == 5),
        "the trapping events to become dead letters",
    )
    .await;
    common::append(&app, 101, "vm-ok2", "VM.ON").await;
    wait(
        || !app.dispatcher.quarantined().contains_key("probe"),
        "recovery",
    )
    .await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// A quarantine is the failing version's: a new one serves at once, with
/// a clean record, instead of waiting out its predecessor's pause.
#[tokio::test]
async fn a_new_version_of_a_quarantined_plugin_serves_at_once() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let app = App::start(
        HostConfig::new(h.dir.path())
            .delivery("max_attempts = 1")
            .delivery("quarantine_after = 2")
            .delivery(r#"quarantine_pause = "10m""#)
            .watch(false)
            .config(),
    )
    .await
    .unwrap();
    trap_until_quarantined(&app, 2).await;
    let queued = common::append(&app, 100, "vm-ok", "VM.ON").await;

    h.install("probe.wasm", &probe_variant(1));
    app.reloader.reload().await;
    wait(
        || h.kv_opt_contains(&app, "seen/lab/vm-ok", &format!("{queued}:")),
        "the new version to deliver what queued",
    )
    .await;
    assert!(!app.dispatcher.quarantined().contains_key("probe"));
    assert_eq!(app.dispatcher.counters()["probe"].consecutive_failures, 0);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_new_component_file_upgrades_every_instance_and_each_instance_goes_with_its_settings() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    for name in ["alpha", "beta"] {
        h.install(&format!("{name}.toml"), b"component = \"probe.wasm\"\n");
    }
    let app = h.start(true).await;
    let sha_of = |name: &str| {
        app.registry
            .get(name)
            .and_then(|e| e.plugin)
            .map(|p| (p.sha256().to_owned(), p.tier()))
    };
    let first = sha_of("alpha").expect("alpha loaded").0;
    assert_eq!(sha_of("beta").map(|s| s.0), Some(first.clone()));
    assert!(app.registry.get("probe").is_none());
    // One Cranelift compilation serves both instances, and so does one
    // snapshot: their settings are the same.
    wait(
        || {
            ["alpha", "beta"]
                .iter()
                .all(|n| sha_of(n).is_some_and(|s| s.1 == Tier::Optimized))
        },
        "both instances to run Cranelift's code",
    )
    .await;
    wait(
        || {
            ["alpha", "beta"].iter().all(|n| {
                app.registry
                    .get(n)
                    .and_then(|e| e.plugin)
                    .is_some_and(|p| p.pre_initialised())
            })
        },
        "both instances' snapshots after init to serve",
    )
    .await;
    assert_eq!(cache_entries(&h).len(), SNAPSHOTTED);

    h.install("probe.wasm", &probe_variant(1));
    wait(
        || {
            ["alpha", "beta"]
                .iter()
                .all(|n| sha_of(n).is_some_and(|s| s.0 != first))
        },
        "both instances to run the new file",
    )
    .await;
    let second = sha_of("alpha").unwrap().0;

    std::fs::remove_file(h.plugins().join("beta.toml")).unwrap();
    wait(|| app.registry.get("beta").is_none(), "beta to go").await;
    assert_eq!(sha_of("alpha").map(|s| s.0), Some(second.clone()));

    // With no instance left to claim it, the file serves as itself.
    std::fs::remove_file(h.plugins().join("alpha.toml")).unwrap();
    wait(
        || app.registry.get("alpha").is_none() && sha_of("probe").is_some(),
        "the component to serve as itself",
    )
    .await;
    handles_one_event_as_the_probe(&h, app).await;
}

fn subscriptions(app: &App, name: &str) -> Vec<String> {
    app.registry
        .get(name)
        .and_then(|e| e.plugin)
        .map(|p| p.info().subscriptions.clone())
        .unwrap_or_default()
}

/// `[plugin.*]` in the main configuration's file, as a reload (the admin
/// API's, or SIGHUP's) finds them; a file that does not load changes
/// nothing.
#[tokio::test]
async fn a_reload_takes_the_plugin_tables_of_the_main_configuration_as_its_file_is_now() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let file = h.dir.path().join("prismhook.toml");
    let write = |host: HostConfig| std::fs::write(&file, host.toml()).unwrap();
    write(
        h.host(false)
            .plugin("probe", &["config = { refuse = true }"]),
    );
    let app = App::start(Config::load(&file).unwrap()).await.unwrap();
    assert!(
        matches!(&app.loaded[0], Report::Failed { error, .. } if error.contains("refusing to start")),
        "{:?}",
        app.loaded
    );

    // Settings it accepts, and a change elsewhere (which waits for the
    // next start).
    write(
        h.host(false)
            .delivery("max_attempts = 4")
            .plugin("probe", &[r#"config = { subscriptions = ["VM.OFF"] }"#]),
    );
    let reports = app.reloader.reload().await;
    assert!(
        matches!(&reports[..], [Report::ConfigForNextStart { sections, .. }, Report::Loaded { plugin, .. }] if sections == &["delivery"] && plugin == "probe"),
        "{reports:?}"
    );
    assert_eq!(subscriptions(&app, "probe"), ["VM.OFF"]);
    let shown = prismhook::admin::client::render_reload(
        &reports
            .iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect::<Vec<_>>(),
    );
    assert!(
        shown.contains("`delivery` changed: applies at the next start"),
        "{shown}"
    );

    std::fs::write(&file, "[plugin.probe\nconfig = {").unwrap();
    let reports = app.reloader.reload().await;
    assert!(
        matches!(&reports[..], [Report::ConfigNotLoaded { file: named, error }, Report::Unchanged { plugin, .. }] if named == &file && error.contains("TOML parse error") && plugin == "probe"),
        "{reports:?}"
    );
    assert_eq!(subscriptions(&app, "probe"), ["VM.OFF"]);

    // An instance of the component, which then no longer runs as itself.
    write(
        h.host(false)
            .plugin("probe", &[r#"config = { subscriptions = ["VM.OFF"] }"#])
            .plugin(
                "probe-b",
                &[
                    r#"component = "probe.wasm""#,
                    r#"config = { subscriptions = ["VM.ON"] }"#,
                ],
            ),
    );
    let reports = app.reloader.reload().await;
    assert!(
        matches!(&reports[..], [Report::Loaded { plugin: new, .. }, Report::Removed { plugin: gone, .. }] if gone == "probe" && new == "probe-b"),
        "{reports:?}"
    );
    assert_eq!(subscriptions(&app, "probe-b"), ["VM.ON"]);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// `systemctl reload` sends SIGHUP: the running binary takes the plugin
/// tables as the file is now, and carries on serving. It tells the service
/// manager (`NOTIFY_SOCKET`) when it is ready, reloading, ready again and
/// stopping.
#[tokio::test]
async fn sighup_reloads_the_plugins_of_the_running_binary_with_its_file_as_it_is_now() {
    let h = Host::new();
    h.install("probe.wasm", &probe_variant(0));
    let file = h.dir.path().join("prismhook.toml");
    let host = |subscriptions: &str| {
        h.host(false)
            .listen(format!("127.0.0.1:{}", common::free_port()))
            .admin_listen(format!("127.0.0.1:{}", common::free_port()))
            .plugin(
                "probe",
                &[format!("config = {{ subscriptions = [{subscriptions}] }}")],
            )
    };
    let first = host(r#""VM.ON""#);
    std::fs::write(&file, first.toml()).unwrap();
    let manager = tokio::net::UnixDatagram::bind(h.dir.path().join("notify.sock")).unwrap();
    let told = async || {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(30), manager.recv(&mut buf))
            .await
            .expect("a message for the service manager")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prismhook"))
        .args(["run", "--config"])
        .arg(&file)
        .env("NOTIFY_SOCKET", h.dir.path().join("notify.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin =
        prismhook::admin::client::AdminClient::from_config(&Config::load(&file).unwrap()).unwrap();
    let probe = async || -> Option<Vec<String>> {
        let plugins = admin.plugins().await.ok()?;
        Some(
            plugins
                .into_iter()
                .find(|p| p.name == "probe")?
                .subscriptions,
        )
    };
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while probe().await.is_none() {
        assert!(
            std::time::Instant::now() < until,
            "the host never served its admin API"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(probe().await.unwrap(), ["VM.ON"]);
    let ready = told().await;
    assert!(
        ready.starts_with("READY=1\nSTATUS=listening on 127.0.0.1:")
            && ready.ends_with("; 1 plugin(s) loaded"),
        "{ready:?}"
    );

    // The same ports: only the plugin's table differs.
    let second = first
        .toml()
        .replace(r#"["VM.ON"]"#, r#"["VM.ON", "VM.DELETE"]"#);
    std::fs::write(&file, second).unwrap();
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let reloading = told().await;
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec > 0);
    assert!(
        told().await.starts_with("READY=1\n"),
        "ready again after the reload"
    );
    while probe().await.as_deref() != Some(&["VM.ON".to_owned(), "VM.DELETE".to_owned()][..]) {
        assert!(
            std::time::Instant::now() < until,
            "SIGHUP changed nothing: {:?}",
            probe().await
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP stopped the host"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the host stops at SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(told().await, "STOPPING=1");
}
