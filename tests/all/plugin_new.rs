//! `prismhook plugin new` end to end, for each language: the real binary
//! writes a skeleton, the project's own guest build (`cargo xtask plugins
//! --dir`) builds it unchanged, `prismhook plugin check` passes it, and once
//! dropped into a running host's plugins directory it handles events Prism
//! sends, which the skeleton records in its `kv` (`last-event`), and
//! reconciles the inventory a page at a time.
//!
//! The skeletons are written to fixed directories under target/tmp, left
//! there for inspection after a run. A Python or JavaScript component is
//! compiled twice, by `plugin check` and by the host, half a minute or more
//! each in a debug host; componentize-py and componentize-js builds are not
//! reproducible, so no cache can spare that.

use crate::common::{self, Cluster, HostConfig};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use prismhook::app::App;
use prismhook::config::Config;
use prismhook_sim::prism::{NewVm, PrismSim};

const PRISMHOOK: &str = env!("CARGO_BIN_EXE_prismhook");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn work_dir(lang: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("plugin-new")
        .join(lang)
}

fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a command off the async threads and returns its output.
async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("starting a command"))
        .await
        .unwrap()
}

fn prismhook(args: &[&str]) -> Command {
    let mut command = Command::new(PRISMHOOK);
    command.args(args).env("PRISMHOOK_LOG", "warn");
    command
}

/// The project's guest build, exactly as a contributor runs it.
fn xtask_build(dir: &Path, out: &Path) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .current_dir(repo_root())
        .args(["run", "--quiet", "-p", "xtask", "--", "plugins", "--dir"])
        .arg(dir)
        .arg("--out")
        .arg(out);
    command
}

async fn wait(ready: impl FnMut() -> bool, what: &str, limit: Duration) {
    common::wait_until(what, limit, ready).await
}

fn host_config(dir: &Path, prism: &PrismSim) -> Config {
    let lab = Cluster {
        webhook_password: None,
        ..Cluster::lab(prism)
    };
    HostConfig::new(dir)
        .instance("plugin-new")
        .fast_retries()
        .watch(true)
        .cluster(lab)
        .config()
}

async fn a_new_plugin_builds_checks_and_handles_an_event(lang: &str) {
    common::init_tracing();
    let name = format!("hello-{lang}");
    let work = work_dir(lang);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let started = Instant::now();
    let lap = |what: &str| {
        eprintln!(
            "{name}: {what} after {:.1}s",
            started.elapsed().as_secs_f64()
        )
    };

    // 1. The skeleton, written by the real binary.
    let src = work.join("src");
    let new = run(prismhook(&[
        "plugin",
        "new",
        &name,
        "--lang",
        lang,
        "--dir",
        src.to_str().unwrap(),
    ]))
    .await;
    assert!(new.status.success(), "{}", text(&new));
    let skeleton = src.join(&name);
    assert!(
        String::from_utf8_lossy(&new.stdout).contains(&skeleton.display().to_string()),
        "{}",
        text(&new)
    );
    assert!(skeleton.join("wit/world.wit").is_file());
    assert!(std::fs::read_to_string(skeleton.join("README.md"))
        .unwrap()
        .contains(&format!("cargo xtask plugins {name}")));
    let again = run(prismhook(&[
        "plugin",
        "new",
        &name,
        "--lang",
        lang,
        "--dir",
        src.to_str().unwrap(),
    ]))
    .await;
    assert!(
        !again.status.success(),
        "a second `plugin new` must not overwrite the first"
    );

    // 2. Built unchanged by the project's guest build.
    let out = work.join("out");
    let build = run(xtask_build(&skeleton, &out)).await;
    assert!(build.status.success(), "{}", text(&build));
    let wasm = out.join(format!("{name}.wasm"));
    assert!(wasm.is_file(), "{}", text(&build));
    lap("built");

    // 3. `plugin check` says it fits.
    let check = run(prismhook(&[
        "plugin",
        "check",
        wasm.to_str().unwrap(),
        "--config",
        "{}",
    ]))
    .await;
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check.status.success(), "{}", text(&check));
    assert!(report.lines().any(|l| l.starts_with("OK")), "{report}");
    assert!(
        report.contains(&format!("plugin    {name} 0.1.0")),
        "{report}"
    );
    assert!(report.contains("events    VM.*"), "{report}");
    // Whether calls start from a snapshot after `init`, or why not: the
    // Python, JavaScript and Go runtimes call WASI as they start.
    let init = if lang == "rust" {
        "init      once per load: calls start from a snapshot of the instance after init"
    } else {
        "init      in every call: its `init` calls WASI (clocks, random or environment"
    };
    assert!(report.lines().any(|l| l.starts_with(init)), "{report}");
    lap("checked");

    // 4. Dropped into a running host's plugins directory, it handles what
    //    Prism sends.
    let host = tempfile::tempdir().unwrap();
    let plugins = host.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let prism = common::setup::start_prism().await;
    let app = App::start(host_config(host.path(), &prism)).await.unwrap();
    assert!(app.registry.get(&name).is_none());
    let partial = plugins.join(format!(".{name}.partial"));
    std::fs::copy(&wasm, &partial).unwrap();
    std::fs::rename(&partial, plugins.join(format!("{name}.wasm"))).unwrap();
    // A Python or JavaScript component takes half a minute to compile in a
    // debug host, more on a busy machine.
    wait(
        || app.registry.get(&name).is_some_and(|e| e.plugin.is_some()),
        "the plugin to load",
        Duration::from_secs(240),
    )
    .await;
    lap("loaded");
    wait(
        || {
            prism
                .webhooks()
                .iter()
                .any(|h| h.events_filter_list.iter().any(|e| e == "VM.ON"))
        },
        "the webhook to carry the plugin's subscriptions",
        Duration::from_secs(30),
    )
    .await;

    let change = prism
        .create_vm(NewVm::named("vm-1").powered_on().nic(["10.9.0.1"]))
        .await
        .unwrap();
    assert_eq!(change.events, ["VM.CREATE", "VM.ON"]);
    assert_eq!(
        change.delivered, 2,
        "both notifications reached the listener"
    );
    wait(
        || {
            app.dispatcher
                .counters()
                .get(&name)
                .is_some_and(|c| c.delivered == 2)
        },
        "the plugin to handle both events",
        Duration::from_secs(30),
    )
    .await;
    let kv = app.runtime.kv().dump(&name).unwrap();
    let last = String::from_utf8(kv.get("last-event").cloned().unwrap_or_default()).unwrap();
    assert!(
        !last.is_empty(),
        "handle recorded the last event id: {kv:?}"
    );
    assert_eq!(common::plugin_failures(&app, &name), (0, 0, 0));
    lap("handled");

    // 5. It reconciles a page at a time, so the host never holds the
    //    inventory for it.
    let plugin = app.registry.get(&name).unwrap().plugin.unwrap();
    assert!(plugin.is_paged(), "the skeleton exports paged.reconcile");
    let report = app.source.reconcile(Some("lab")).await.unwrap().remove(0);
    let want = format!("{name}: 1 VMs in lab, read a page at a time: nothing to reconcile");
    assert!(report.plugins.contains(&want), "{:?}", report.plugins);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    lap("reconciled");
}

#[tokio::test]
async fn a_new_rust_plugin_builds_passes_check_and_handles_an_event() {
    a_new_plugin_builds_checks_and_handles_an_event("rust").await;
}

#[tokio::test]
async fn a_new_python_plugin_builds_passes_check_and_handles_an_event() {
    a_new_plugin_builds_checks_and_handles_an_event("python").await;
}

#[tokio::test]
async fn a_new_js_plugin_builds_passes_check_and_handles_an_event() {
    a_new_plugin_builds_checks_and_handles_an_event("js").await;
}

#[tokio::test]
async fn a_new_go_plugin_builds_passes_check_and_handles_an_event() {
    a_new_plugin_builds_checks_and_handles_an_event("go").await;
}
