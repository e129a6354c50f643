//! The sandbox, tested with real compiled guests: each kind of misbehaviour
//! is contained to its own call, with a clear error, and the next call works.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use prismhook::runtime::bindings::{Event, Outcome};
use prismhook::runtime::policy::{InjectedHeader, OriginRule, OutboundPolicy};
use prismhook::runtime::{
    CallError, LoadError, Plugin, PluginSettings, Runtime, RuntimeOptions, Tier,
};
use prismhook::secret::Secret;

struct Sandbox {
    runtime: Arc<Runtime>,
    _dir: tempfile::TempDir,
}

fn sandbox() -> Sandbox {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(RuntimeOptions::new(dir.path().join("kv.redb"))).unwrap();
    Sandbox { runtime, _dir: dir }
}

/// The deadline is generous because it is wall-clock time: the calls that are
/// meant to finish (eating 32 MiB under Winch, say) must meet it even while
/// the crash tests load both cores with a host and three nats-servers. Only
/// the looping calls reach it, and they say so by their error.
fn settings() -> PluginSettings {
    let mut s = PluginSettings::default();
    s.limits.deadline = Duration::from_secs(2);
    s.limits.memory_bytes = 32 << 20;
    s
}

async fn probe(sb: &Sandbox, settings: PluginSettings) -> Plugin {
    sb.runtime
        .load(&common::component("probe"), settings)
        .await
        .unwrap()
}

fn event(id: u64, event_type: &str, body: serde_json::Value) -> Event {
    Event {
        id: id.to_string(),
        cluster: "lab".into(),
        event_type: event_type.into(),
        entity_kind: "vm".into(),
        entity_uuid: format!("vm-{id}"),
        attempt: 1,
        received_at_ms: 0,
        body: body.to_string(),
        vm: None,
    }
}

async fn works(plugin: &Plugin) {
    let out = plugin
        .handle(vec![event(99, "VM.ON", serde_json::json!({}))])
        .await
        .unwrap();
    assert!(matches!(out[..], [Outcome::Done]));
}

fn kv_text(sb: &Sandbox, key: &str) -> Option<String> {
    sb.runtime
        .kv()
        .dump("probe")
        .unwrap()
        .get(key)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test]
async fn a_plugin_reports_its_name_version_and_subscriptions_from_init() {
    let sb = sandbox();
    let mut s = settings();
    s.config = serde_json::json!({"subscriptions": ["VM.*", "SUBNET.CREATE"]});
    let p = probe(&sb, s).await;
    assert_eq!(p.name(), "probe");
    assert_eq!(p.info().subscriptions, vec!["VM.*", "SUBNET.CREATE"]);
    assert_eq!(p.sha256().len(), 64);
}

fn assert_handle_timed_out(err: &CallError) {
    assert!(
        matches!(
            err,
            CallError::Timeout {
                export: "handle",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("plugin `probe` exceeded its deadline"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plugin_that_loops_is_stopped_at_its_deadline_and_the_next_call_works() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    let started = std::time::Instant::now();
    let err = p
        .handle(vec![event(1, "TEST.LOOP", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert_handle_timed_out(&err);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline did not stop the loop"
    );
    works(&p).await;
}

/// The epoch callback stops wasm that runs; a guest asleep in WASI runs
/// none, and is ended by the timer around the call.
#[tokio::test]
async fn a_plugin_asleep_in_a_host_call_is_stopped_at_its_deadline_and_the_next_call_works() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    let an_hour = serde_json::json!({ "ms": 3_600_000 });
    let call = p.handle(vec![event(1, "TEST.SLEEP", an_hour)]);
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the call ended, not an hour later")
        .unwrap_err();
    assert_handle_timed_out(&err);
    let short = serde_json::json!({ "ms": 10 });
    let out = p.handle(vec![event(2, "TEST.SLEEP", short)]).await.unwrap();
    assert!(matches!(out[..], [Outcome::Done]));
    works(&p).await;
}

#[tokio::test]
async fn a_paged_reconcile_reads_the_inventory_a_page_at_a_time_and_an_error_discards_its_writes() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    let vms: Vec<prismhook::event::Vm> = (0..1_201)
        .map(|i| prismhook::event::Vm {
            uuid: format!("vm-{i}"),
            ..Default::default()
        })
        .collect();
    let vms = std::sync::Arc::new(vms);
    let summary = p
        .reconcile("lab", vms.clone(), Default::default())
        .await
        .unwrap();
    assert_eq!(summary, Ok("1201 vms".to_owned()));
    assert_eq!(kv_text(&sb, "reconcile-pages/lab").as_deref(), Some("3"));
    let read: Vec<String> = serde_json::from_str(&kv_text(&sb, "reconcile/lab").unwrap()).unwrap();
    assert_eq!(read.len(), 1_201);
    assert_eq!(
        (read[0].as_str(), read[1_200].as_str()),
        ("vm-0", "vm-1200")
    );

    // Unlike `handler.reconcile`'s, a paged reconcile's error keeps nothing.
    let refused = p
        .reconcile("refuse", vms, Default::default())
        .await
        .unwrap();
    assert_eq!(refused, Err("refused after recording 1201 vms".to_owned()));
    assert_eq!(kv_text(&sb, "reconcile/refuse"), None);
    assert_eq!(kv_text(&sb, "reconcile-pages/refuse"), None);
    assert_eq!(kv_text(&sb, "reconcile-page/refuse/1"), None);

    // An empty inventory is one call that reads no page.
    let empty = p
        .reconcile("empty", Default::default(), Default::default())
        .await
        .unwrap();
    assert_eq!(empty, Ok("0 vms".to_owned()));
    assert_eq!(kv_text(&sb, "reconcile-pages/empty").as_deref(), Some("0"));
}

#[tokio::test]
async fn a_fed_reconcile_reads_pages_as_they_come_and_a_broken_listing_keeps_only_what_was_committed(
) {
    use prismhook::runtime::feed::{Feed, Inventory};
    let sb = sandbox();
    let mut s = settings();
    s.limits.deadline = Duration::from_millis(400);
    let p = probe(&sb, s).await;
    assert!(p.is_paged());
    let page = |from: usize, n: usize| {
        Feed::Page(Arc::new(
            (from..from + n)
                .map(|i| prismhook::event::Vm {
                    uuid: format!("vm-{i}"),
                    ..Default::default()
                })
                .collect(),
        ))
    };

    // Pages arrive slower than the plugin's deadline: waiting for the
    // listing is not the plugin's time.
    let (feed, inventory) = Inventory::fed();
    let listing = tokio::spawn(async move {
        for (from, n) in [(0, 300), (300, 0), (300, 200)] {
            feed.send(page(from, n)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        feed.send(Feed::End).await.unwrap();
    });
    let summary = p.reconcile_fed("lab", inventory).await.unwrap();
    listing.await.unwrap();
    assert_eq!(summary, Ok("500 vms".to_owned()));
    assert_eq!(kv_text(&sb, "reconcile-pages/lab").as_deref(), Some("2"));
    assert_eq!(kv_text(&sb, "reconcile-page/lab/1").as_deref(), Some("300"));
    assert_eq!(kv_text(&sb, "reconcile-page/lab/2").as_deref(), Some("200"));

    // A listing that breaks off is an error of its own, not a `none` the
    // plugin would take for the end, and the call's kv writes are dropped.
    let (feed, inventory) = Inventory::fed();
    feed.send(page(0, 300)).await.unwrap();
    feed.send(Feed::Failed("prism answered 500 on page 2".into()))
        .await
        .unwrap();
    let err = p.reconcile_fed("broken", inventory).await.unwrap_err();
    assert!(matches!(err, CallError::Inventory { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "plugin `probe` was not handed a whole inventory: \
         the inventory could not be read to its end: prism answered 500 on page 2"
    );
    // It had recorded the first page when the second could not come.
    assert_eq!(kv_text(&sb, "reconcile-page/broken/1"), None);
    assert_eq!(kv_text(&sb, "reconcile-pages/broken"), None);

    // What the plugin committed (`kv.commit`, which it calls as each page
    // comes) before the listing broke off stays; what it wrote after, the
    // record of the second page, is dropped.
    let (feed, inventory) = Inventory::fed();
    let listing = tokio::spawn(async move {
        for item in [page(0, 300), page(300, 200), Feed::Failed("gone".into())] {
            feed.send(item).await.unwrap();
        }
    });
    let err = p
        .reconcile_fed("commit-broken", inventory)
        .await
        .unwrap_err();
    listing.await.unwrap();
    assert!(matches!(err, CallError::Inventory { .. }), "{err:?}");
    assert_eq!(
        kv_text(&sb, "reconcile-page/commit-broken/1").as_deref(),
        Some("300")
    );
    assert_eq!(kv_text(&sb, "reconcile-page/commit-broken/2"), None);

    // Nor is a listing that goes away without a word.
    let (feed, inventory) = Inventory::fed();
    feed.send(page(0, 10)).await.unwrap();
    drop(feed);
    let err = p.reconcile_fed("gone", inventory).await.unwrap_err();
    assert!(
        err.to_string()
            .ends_with("the inventory's listing stopped before its end"),
        "{err}"
    );
    assert_eq!(kv_text(&sb, "reconcile-page/gone/1"), None);
    works(&p).await;
}

#[tokio::test]
async fn a_plugin_that_eats_memory_is_stopped_at_its_limit() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    let quiet = p.memory_peak();
    assert!(quiet > 0 && quiet < 32 << 20, "init's memory: {quiet}");
    let err = p
        .handle(vec![event(1, "TEST.OOM", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Memory { limit_mib: 32, .. }),
        "{err}"
    );
    assert_eq!(p.memory_peak(), 32 << 20, "the peak is held to the limit");
    works(&p).await;
}

#[tokio::test]
async fn winch_code_is_held_to_the_same_limits_and_cranelift_code_takes_over() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RuntimeOptions::new(dir.path().join("kv.redb"));
    opts.tiered = true;
    let sb = Sandbox {
        runtime: Runtime::new(opts).unwrap(),
        _dir: dir,
    };
    let p = probe(&sb, settings()).await;
    assert_eq!(p.tier(), Tier::Baseline);
    // Snapshots are of Cranelift's code.
    let p = sb.runtime.pre_initialise(p).await;
    assert!(!p.pre_initialised());

    let err = p
        .handle(vec![event(1, "TEST.LOOP", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Timeout {
                export: "handle",
                ..
            }
        ),
        "{err}"
    );
    let err = p
        .handle(vec![event(2, "TEST.OOM", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Memory { limit_mib: 32, .. }),
        "{err}"
    );
    let err = p
        .handle(vec![event(3, "TEST.TRAP", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Trap { .. }), "{err}");
    works(&p).await;

    let source = p
        .source()
        .expect("a baseline plugin keeps its bytes for Cranelift");
    let code = sb
        .runtime
        .optimizer()
        .expect("tiered")
        .compile(&source)
        .unwrap();
    let optimized = sb.runtime.upgrade(&p, code).await.unwrap();
    assert_eq!(optimized.tier(), Tier::Optimized);
    let optimized = sb.runtime.pre_initialise(optimized).await;
    assert!(optimized.pre_initialised());
    assert!(optimized.same_load(&p) && optimized.source().is_none());
    assert_eq!(
        (optimized.name(), optimized.sha256()),
        (p.name(), p.sha256())
    );
    let err = optimized
        .handle(vec![event(4, "TEST.LOOP", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err}");
    works(&optimized).await;
}

#[test]
fn a_component_winch_cannot_compile_goes_straight_to_cranelift() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RuntimeOptions::new(dir.path().join("kv.redb"));
    opts.tiered = true;
    let runtime = Runtime::new(opts).unwrap();
    let compile = |name: &str, wat: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, wat::parse_str(wat).unwrap()).unwrap();
        runtime.compile_file(&file, None).unwrap().tier()
    };
    // Tail calls: Cranelift compiles them, Winch does not.
    let tail_call = "(component (core module (func $f (result i32) i32.const 1) (func (export \"g\") (result i32) return_call $f)))";
    assert_eq!(compile("tail-call.wasm", tail_call), Tier::Optimized);
    let plain = "(component (core module (func (export \"g\") (result i32) i32.const 1)))";
    assert_eq!(compile("plain.wasm", plain), Tier::Baseline);
}

#[tokio::test]
async fn a_plugin_that_panics_fails_only_its_own_call() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    let err = p
        .handle(vec![event(1, "TEST.TRAP", serde_json::json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Trap {
                export: "handle",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("plugin `probe` trapped in handle"),
        "{err}"
    );
    works(&p).await;
}

/// Memory is reset between calls in place (only the pages a call wrote,
/// where Linux reports them): every call must still start from the
/// plugin's first memory, whatever the last one wrote or however it ended;
/// for a plugin with a snapshot after `init`, from the snapshot's.
#[tokio::test]
async fn every_call_starts_from_the_plugins_first_memory_not_the_last_calls() {
    let sb = sandbox();
    let plain = probe(&sb, settings()).await;
    let snapshot = sb.runtime.pre_initialise(plain.clone()).await;
    assert!(snapshot.pre_initialised());
    for p in [plain, snapshot] {
        every_call_starts_from_the_first_memory(&p).await;
    }
}

async fn every_call_starts_from_the_first_memory(p: &Plugin) {
    let memory = |id| event(id, "TEST.MEMORY", serde_json::json!({}));
    let seen = |out: &Outcome| match out {
        Outcome::Reject(seen) => seen.clone(),
        other => panic!("not what TEST.MEMORY answers: {other:?}"),
    };
    let fresh = "data=7 bss=0 heap=0";
    for round in 0..3 {
        let out = p.handle(vec![memory(1)]).await.unwrap();
        assert_eq!(seen(&out[0]), fresh, "round {round}");
        // Within a call the probe sees its own writes: it would see another's.
        let out = p.handle(vec![memory(2), memory(3)]).await.unwrap();
        assert_eq!(seen(&out[0]), fresh, "round {round}");
        assert!(
            seen(&out[1]).starts_with("data=8 bss=1 "),
            "round {round}: {}",
            seen(&out[1])
        );
        // A call that trapped after writing leaves nothing either.
        let trapped = p
            .handle(vec![
                memory(4),
                event(5, "TEST.TRAP", serde_json::json!({})),
            ])
            .await;
        assert!(trapped.is_err());
    }
}

/// An `init` that computes from its configuration alone runs once per
/// load: calls start from a snapshot of the instance it left. Two
/// instances of one component each start from their own, also after a
/// trap.
#[tokio::test]
async fn a_plugin_whose_init_reads_only_its_configuration_starts_every_call_where_init_left_it() {
    let sb = sandbox();
    let load = |tag: &'static str| {
        let runtime = sb.runtime.clone();
        async move {
            let mut s = settings();
            s.config = serde_json::json!({ "tag": tag });
            let p = runtime
                .load_read(
                    &common::component("probe"),
                    None,
                    s,
                    Some(format!("probe-{tag}")),
                )
                .await
                .unwrap();
            assert!(
                !p.pre_initialised(),
                "a load does not wait for its snapshot"
            );
            runtime.pre_initialise(p).await
        }
    };
    let (a, b) = (load("a").await, load("b").await);
    let config = |p: Plugin| async move {
        let out = p
            .handle(vec![event(1, "TEST.CONFIG", serde_json::json!({}))])
            .await
            .unwrap();
        match &out[..] {
            [Outcome::Reject(config)] => config.clone(),
            other => panic!("not what TEST.CONFIG answers: {other:?}"),
        }
    };
    for p in [&a, &b] {
        assert!(p.pre_initialised(), "{}", p.name());
    }
    for _ in 0..2 {
        assert_eq!(config(a.clone()).await, r#"{"tag":"a"}"#);
        assert_eq!(config(b.clone()).await, r#"{"tag":"b"}"#);
        let trapped = a
            .handle(vec![event(2, "TEST.TRAP", serde_json::json!({}))])
            .await;
        assert!(
            matches!(trapped, Err(CallError::Trap { .. })),
            "{trapped:?}"
        );
    }
}

/// An `init` that calls the host (here kv) cannot be captured, as what it
/// got from outside may change: that plugin runs `init` in every call, as
/// every plugin did before snapshots.
#[tokio::test]
async fn a_plugin_whose_init_calls_the_host_runs_init_in_every_call() {
    let sb = sandbox();
    let mut s = settings();
    s.config = serde_json::json!({ "count_inits": true });
    let p = sb.runtime.pre_initialise(probe(&sb, s).await).await;
    assert!(!p.pre_initialised());
    assert_eq!(
        p.init_every_call(),
        Some("its `init` calls the host's kv, http or inventory imports, so the state it leaves is not kept")
    );
    assert_eq!(
        kv_text(&sb, "inits").as_deref(),
        Some("1"),
        "the load's init"
    );
    works(&p).await;
    works(&p).await;
    assert_eq!(kv_text(&sb, "inits").as_deref(), Some("3"));
}

/// Log lines and the context are fixed for a load, so an `init` that uses
/// them is still captured; what `context` told it is the load's.
#[tokio::test]
async fn a_plugin_whose_init_logs_and_reads_its_context_still_starts_from_a_snapshot() {
    let sb = sandbox();
    let mut s = settings();
    s.config = serde_json::json!({ "log_in_init": true });
    let p = sb
        .runtime
        .load_read(&common::component("probe"), None, s, Some("probe-a".into()))
        .await
        .unwrap();
    let p = sb.runtime.pre_initialise(p).await;
    assert!(p.pre_initialised(), "{:?}", p.init_every_call());
    let out = p
        .handle(vec![event(1, "TEST.INIT", serde_json::json!({}))])
        .await
        .unwrap();
    assert!(
        matches!(&out[..], [Outcome::Reject(seen)] if seen == r#"Some(Some("probe-a"))"#),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_trapped_call_leaves_no_kv_writes_behind() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    // The first event records itself in kv, then the second traps: the
    // record must not survive.
    let err = p
        .handle(vec![
            event(1, "VM.ON", serde_json::json!({})),
            event(2, "TEST.TRAP", serde_json::json!({})),
        ])
        .await;
    assert!(err.is_err());
    assert_eq!(kv_text(&sb, "seen/lab/vm-1"), None);
    works(&p).await;
    assert_eq!(
        kv_text(&sb, "seen/lab/vm-99").as_deref(),
        Some("99:1:VM.ON")
    );
}

/// The looping call first reaches a loopback server (so it is known to be
/// running), then spins until its deadline; twenty calls of another plugin
/// must all finish while it still spins, on the one thread of a
/// current-thread runtime. Were calls run one after another, or the spinning
/// guest polled again ahead of the others, they could only finish once the
/// loop had been stopped.
#[tokio::test]
async fn plugins_run_side_by_side_while_one_of_them_loops() {
    let sb = sandbox();
    let (base, hits) = echo_server().await;
    let mut slow = allow(&[&base], Vec::new());
    // The twenty healthy calls take about 0.2 s on 2 cores; before the
    // yield went through tokio they took longer than 10 s.
    slow.limits.deadline = Duration::from_secs(2);
    let looping = probe(&sb, slow).await;
    let healthy = probe(&sb, settings()).await;
    let url = format!("{base}/echo");
    let stuck = tokio::spawn(async move {
        looping
            .handle(vec![
                event(1, "TEST.HTTP", serde_json::json!({ "url": url })),
                event(2, "TEST.LOOP", serde_json::json!({})),
            ])
            .await
    });
    common::wait_until("the looping call to start", Duration::from_secs(10), || {
        hits.load(Ordering::SeqCst) == 1
    })
    .await;
    for _ in 0..20 {
        works(&healthy).await;
    }
    if stuck.is_finished() {
        panic!(
            "the healthy calls waited for the looping one to be stopped: {:?}",
            stuck.await.unwrap()
        );
    }
    assert!(matches!(
        stuck.await.unwrap(),
        Err(CallError::Timeout { .. })
    ));
}

#[tokio::test]
async fn outcomes_come_back_one_per_event_in_order() {
    let sb = sandbox();
    let p = probe(&sb, settings()).await;
    let out = p
        .handle(vec![
            event(1, "VM.ON", serde_json::json!({})),
            event(2, "TEST.RETRY", serde_json::json!({"delay_ms": 1500})),
            event(3, "TEST.REJECT", serde_json::json!({})),
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Done));
    assert!(matches!(&out[1], Outcome::Retry(r) if r.delay_ms == Some(1500)));
    assert!(matches!(&out[2], Outcome::Reject(r) if r == "probe asked to reject"));
}

/// A loopback server that counts hits and echoes request headers.
async fn echo_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new()
        .route(
            "/echo",
            get(move |headers: axum::http::HeaderMap| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut lines: Vec<String> = headers
                        .iter()
                        .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                        .collect();
                    lines.sort();
                    ([("x-echo", lines.join("; "))], lines.join("\n"))
                }
            }),
        )
        .route(
            "/elsewhere",
            get(|| async { axum::response::Redirect::temporary("http://127.0.0.2:9/echo") }),
        )
        // Compressed whatever was asked for.
        .route(
            "/gzip",
            get(|| async { ([("content-encoding", "gzip")], vec![0x1f, 0x8b, 8, 0]) }),
        )
        // The same, under a first line that says it is not.
        .route(
            "/gzip-second",
            get(|| async {
                (
                    [
                        ("content-encoding", "identity"),
                        ("content-encoding", "gzip"),
                    ],
                    vec![0x1f, 0x8b, 8, 0],
                )
            }),
        )
        // A redirect whose target carries the key the host injected.
        .route(
            "/leak",
            get(|headers: axum::http::HeaderMap| async move {
                let key = headers
                    .get("x-pan-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                axum::response::Redirect::temporary(&format!("/landed/{key}"))
            }),
        )
        .route("/landed/{*rest}", get(|| async { "landed" }));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

fn allow(origins: &[&str], inject: Vec<InjectedHeader>) -> PluginSettings {
    let mut s = settings();
    s.policy = OutboundPolicy::new(
        origins
            .iter()
            .map(|o| OriginRule::parse(o).unwrap())
            .collect(),
        inject,
    );
    s
}

#[tokio::test]
async fn a_request_to_an_origin_off_the_allowlist_is_denied_before_anything_is_sent() {
    let sb = sandbox();
    let (base, hits) = echo_server().await;
    let p = probe(&sb, allow(&["https://fw1.example.com"], vec![])).await;
    let out = p
        .handle(vec![event(
            1,
            "TEST.HTTP",
            serde_json::json!({"url": format!("{base}/echo")}),
        )])
        .await
        .unwrap();
    assert!(matches!(out[..], [Outcome::Done]));
    let result = kv_text(&sb, "http/1").unwrap();
    assert!(result.starts_with("error=Error::Denied("), "{result}");
    assert!(
        result.contains("not on plugin `probe`'s outbound allowlist"),
        "{result}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // Origins off the allowlist are not metrics labels: a plugin could ask
    // for endlessly many.
    let counted: Vec<_> = sb.runtime.outbound().snapshot().into_keys().collect();
    assert_eq!(
        counted,
        [("probe".to_owned(), "-".to_owned(), "denied".to_owned())]
    );
}

/// Framing is the host's: a plugin's `Content-Length` on a request without a
/// body would leave a pooled connection (shared with other plugins) waiting
/// for bytes, and the next request on it would be read as this one's body.
#[tokio::test]
async fn headers_that_frame_the_message_or_steer_the_connection_are_the_hosts_to_set() {
    let sb = sandbox();
    let (base, hits) = echo_server().await;
    let p = probe(&sb, allow(&["http://127.0.0.1:*"], vec![])).await;
    let framing = [
        ["Content-Length", "300"],
        ["Connection", "close"],
        ["Upgrade", "h2c"],
        ["Expect", "100-continue"],
        ["Keep-Alive", "timeout=5"],
        ["Trailer", "x-t"],
        ["Proxy-Authorization", "Basic Zm9vOmJhcg=="],
        ["Proxy-Connection", "keep-alive"],
        ["X-Kept", "yes"],
    ];
    let chunked = [["Transfer-Encoding", "chunked"], ["X-Kept", "too"]];
    let events = [serde_json::json!(framing), serde_json::json!(chunked)]
        .into_iter()
        .zip(1..)
        .map(|(headers, i)| {
            let body = serde_json::json!({ "url": format!("{base}/echo"), "headers": headers });
            event(i, "TEST.HTTP", body)
        })
        .collect();
    p.handle(events).await.unwrap();
    for (key, kept) in [("http/1", "x-kept: yes"), ("http/2", "x-kept: too")] {
        let echoed = kv_text(&sb, key).unwrap();
        assert!(
            echoed.starts_with("status=200") && echoed.contains(kept),
            "{echoed}"
        );
        for name in [
            "content-length",
            "transfer-encoding",
            "connection",
            "upgrade",
            "expect",
            "keep-alive",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
        ] {
            assert!(
                !echoed.contains(&format!("{name}:")),
                "{name} sent: {echoed}"
            );
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn answers_come_unencoded_or_not_at_all_and_a_url_may_not_carry_credentials() {
    let sb = sandbox();
    let (base, hits) = echo_server().await;
    let p = probe(&sb, allow(&["http://127.0.0.1:*"], vec![])).await;
    let with_userinfo = base.replacen("http://", "http://me:x@", 1);
    let urls = [
        format!("{base}/echo"),
        format!("{base}/gzip"),
        format!("{with_userinfo}/echo"),
    ];
    let events = urls
        .iter()
        .zip(1..)
        .map(|(url, i)| event(i, "TEST.HTTP", serde_json::json!({ "url": url })))
        .collect();
    p.handle(events).await.unwrap();
    let echoed = kv_text(&sb, "http/1").unwrap();
    assert!(echoed.contains("accept-encoding: identity"), "{echoed}");
    let gzip = kv_text(&sb, "http/2").unwrap();
    assert!(
        gzip.contains("the answer is encoded (`gzip`) although the host asked for none"),
        "{gzip}"
    );
    let userinfo = kv_text(&sb, "http/3").unwrap();
    assert!(
        userinfo.starts_with("error=Error::InvalidRequest(")
            && userinfo.contains("carries a user name or password"),
        "{userinfo}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the URL with credentials was not sent"
    );
    // Counted under the rule that let them through, not one series per port.
    let origins: std::collections::BTreeSet<String> = sb
        .runtime
        .outbound()
        .snapshot()
        .into_keys()
        .map(|(_, origin, _)| origin)
        .collect();
    assert_eq!(
        origins.into_iter().collect::<Vec<_>>(),
        ["-", "http://127.0.0.1:*"]
    );
}

#[tokio::test]
async fn only_the_wits_methods_are_sent_and_an_encoding_on_a_second_line_is_refused() {
    let sb = sandbox();
    let (base, hits) = echo_server().await;
    let p = probe(&sb, allow(&["http://127.0.0.1:*"], vec![])).await;
    let events = vec![
        event(
            1,
            "TEST.HTTP",
            serde_json::json!({ "url": format!("{base}/echo"), "method": "TRACE" }),
        ),
        event(
            2,
            "TEST.HTTP",
            serde_json::json!({ "url": format!("{base}/gzip-second") }),
        ),
        event(
            3,
            "TEST.HTTP",
            serde_json::json!({ "url": format!("{base}/echo"), "method": "get" }),
        ),
    ];
    p.handle(events).await.unwrap();
    let trace = kv_text(&sb, "http/1").unwrap();
    assert!(
        trace.starts_with("error=Error::InvalidRequest(")
            && trace.contains("method `TRACE` is not one of GET, POST, PUT, PATCH, DELETE, HEAD"),
        "{trace}"
    );
    let second = kv_text(&sb, "http/2").unwrap();
    assert!(
        second.contains("the answer is encoded (`gzip`)"),
        "{second}"
    );
    assert!(kv_text(&sb, "http/3").unwrap().starts_with("status=200"));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "TRACE was not sent");
}

/// What the log shows of a request is scrubbed as the answer is: where a
/// redirect ended can carry the key the host injected.
#[tokio::test]
async fn a_key_a_redirect_carries_reaches_neither_the_plugin_nor_the_log() {
    let (captured, _logging) = Captured::start_at(tracing::Level::DEBUG);
    let sb = sandbox();
    let (base, _) = echo_server().await;
    let p = probe(&sb, with_key(&base)).await;
    p.handle(vec![event(
        1,
        "TEST.HTTP",
        serde_json::json!({"url": format!("{base}/leak")}),
    )])
    .await
    .unwrap();
    assert_eq!(kv_text(&sb, "http/1").unwrap(), "status=200 body=landed");
    let logs = captured.text();
    assert!(logs.contains("plugin http request"), "{logs}");
    assert!(logs.contains("/landed/"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
}

#[tokio::test]
async fn requests_past_the_budget_are_not_metrics_series_of_the_origins_asked() {
    let sb = sandbox();
    let mut s = allow(&["https://fw1.example.com"], vec![]);
    s.limits.max_requests_per_call = 0;
    let p = probe(&sb, s).await;
    let events = (1..=3)
        .map(|i| {
            let url = format!("https://r{i}.example.net/");
            event(i, "TEST.HTTP", serde_json::json!({ "url": url }))
        })
        .collect();
    p.handle(events).await.unwrap();
    let result = kv_text(&sb, "http/2").unwrap();
    assert!(
        result.starts_with("error=Error::LimitExceeded("),
        "{result}"
    );
    let counted: Vec<_> = sb.runtime.outbound().snapshot().into_iter().collect();
    assert_eq!(
        counted,
        [(
            (
                "probe".to_owned(),
                "-".to_owned(),
                "limit-exceeded".to_owned()
            ),
            3
        )]
    );
}

#[tokio::test]
async fn a_redirect_off_the_allowlist_is_denied_at_the_hop() {
    let sb = sandbox();
    let (base, _) = echo_server().await;
    let p = probe(&sb, allow(&[&base], vec![])).await;
    p.handle(vec![event(
        1,
        "TEST.HTTP",
        serde_json::json!({"url": format!("{base}/elsewhere")}),
    )])
    .await
    .unwrap();
    let result = kv_text(&sb, "http/1").unwrap();
    assert!(
        result.contains("Denied(\"http://127.0.0.2:9 is not on"),
        "{result}"
    );
}

#[tokio::test]
async fn an_ip_literal_outside_an_allowed_cidr_is_denied() {
    let sb = sandbox();
    let p = probe(&sb, allow(&["http://10.0.0.0/8:*"], vec![])).await;
    p.handle(vec![event(
        1,
        "TEST.HTTP",
        serde_json::json!({"url": "http://127.0.0.1:1/x"}),
    )])
    .await
    .unwrap();
    assert!(kv_text(&sb, "http/1").unwrap().contains("Denied"));
}

#[tokio::test]
async fn injected_credentials_reach_the_server_but_never_the_plugin() {
    let sb = sandbox();
    let (base, hits) = echo_server().await;
    let secret = SECRET;
    let p = probe(&sb, with_key(&base)).await;
    p.handle(vec![event(
        1,
        "TEST.HTTP",
        serde_json::json!({"url": format!("{base}/echo")}),
    )])
    .await
    .unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let result = kv_text(&sb, "http/1").unwrap();
    // The server saw the header (its echo names it)…
    assert!(result.contains("x-pan-key: [redacted]"), "{result}");
    // …but the value never made it back into the guest.
    assert!(!result.contains(secret), "{result}");
    assert!(!everything_the_probe_stored(&sb).contains(secret));
}

/// What the tests inject as `x-pan-key` and look for everywhere after.
const SECRET: &str = "s3cr3t-key-that-must-not-leak";

/// `base` allowed, with [`SECRET`] injected as `x-pan-key` for it.
fn with_key(base: &str) -> PluginSettings {
    let inject = vec![InjectedHeader {
        origin: OriginRule::parse(base).unwrap(),
        name: http::HeaderName::from_static("x-pan-key"),
        value: Secret::new(SECRET),
    }];
    allow(&[base], inject)
}

/// Every value in the probe's kv, as text.
fn everything_the_probe_stored(sb: &Sandbox) -> String {
    let values: Vec<u8> = sb
        .runtime
        .kv()
        .dump("probe")
        .unwrap()
        .into_values()
        .flatten()
        .collect();
    String::from_utf8_lossy(&values).into_owned()
}

/// A server that echoes the `x-pan-key` header it receives in the spellings
/// a hostile or careless server might use, and redirects to a host named
/// after it.
/// `key` with some characters escaped and the rest not, three ways at
/// once, as no single encoder writes it.
fn partly_escaped(key: &str) -> String {
    key.replacen('-', "&#45;", 1)
        .replacen('-', "\\u002d", 1)
        .replacen('-', "%2d", 1)
}

async fn encoding_echo_server() -> String {
    use base64::Engine as _;
    let key = |h: &axum::http::HeaderMap| {
        h.get("x-pan-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let app = axum::Router::new()
        .route(
            "/encodings",
            get(move |h: axum::http::HeaderMap| async move {
                let k = key(&h);
                let b64 = base64::engine::general_purpose::STANDARD;
                let unicode: String = k.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
                let body = format!(
                    "b64={} basic={} hex={} HEX={} upper={} json={} pct={} partial={}",
                    b64.encode(&k),
                    b64.encode(format!("admin:{k}")),
                    hex::encode(&k),
                    hex::encode(&k).to_uppercase(),
                    k.to_uppercase(),
                    unicode,
                    k.bytes().map(|b| format!("%{b:02X}")).collect::<String>(),
                    partly_escaped(&k),
                );
                ([("x-echo-b64", b64.encode(&k))], body)
            }),
        )
        .route(
            "/away",
            get(move |h: axum::http::HeaderMap| async move {
                let to = format!("http://{}.attacker.invalid/", key(&h));
                axum::response::Redirect::temporary(&to)
            }),
        );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn encoded_echoes_and_redirects_of_an_injected_secret_never_reach_the_plugin() {
    use base64::Engine as _;
    let sb = sandbox();
    let base = encoding_echo_server().await;
    let secret = SECRET;
    let p = probe(&sb, with_key(&base)).await;
    p.handle(vec![
        event(
            1,
            "TEST.HTTP",
            serde_json::json!({"url": format!("{base}/encodings")}),
        ),
        event(
            2,
            "TEST.HTTP",
            serde_json::json!({"url": format!("{base}/away")}),
        ),
    ])
    .await
    .unwrap();
    let echoed = kv_text(&sb, "http/1").unwrap();
    assert!(echoed.contains("b64=[redacted]"), "{echoed}");
    assert!(echoed.contains("partial=[redacted]"), "{echoed}");
    let denied = kv_text(&sb, "http/2").unwrap();
    assert!(denied.contains("Denied"), "{denied}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let everything = everything_the_probe_stored(&sb);
    for spelling in [
        secret.to_owned(),
        secret.to_uppercase(),
        b64.encode(secret),
        hex::encode(secret),
        partly_escaped(secret),
    ] {
        assert!(
            !everything.contains(&spelling),
            "{spelling} in {everything}"
        );
    }
}

#[tokio::test]
async fn init_refusing_its_configuration_is_reported_with_the_plugins_words() {
    let sb = sandbox();
    let mut s = settings();
    s.config = serde_json::json!({"refuse": true});
    let err = sb
        .runtime
        .load(&common::component("probe"), s)
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::InitRefused { .. }), "{err}");
    assert!(
        err.to_string()
            .ends_with("init refused the configuration: refusing to start: `refuse` is set"),
        "{err}"
    );
}

#[tokio::test]
async fn a_trap_in_init_is_reported_as_a_failed_load() {
    let sb = sandbox();
    let mut s = settings();
    s.config = serde_json::json!({"trap_in_init": true});
    let err = sb
        .runtime
        .load(&common::component("probe"), s)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("init failed: plugin `probe` trapped in init"),
        "{err}"
    );
}

#[tokio::test]
async fn files_that_are_not_components_are_refused_with_what_was_found() {
    let sb = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty.wasm",
            vec![],
            "not a WebAssembly file (expected the bytes `\\0asm`, found an empty file)",
        ),
        (
            "text.wasm",
            b"hello world".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0".to_vec(),
            "a core WebAssembly module, not a component",
        ),
        (
            "truncated.wasm",
            std::fs::read(common::component("probe")).unwrap()[..4096].to_vec(),
            "invalid component",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = sb
            .runtime
            .load(&path, settings())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[tokio::test]
async fn a_file_whose_hash_differs_from_the_pin_is_refused() {
    let sb = sandbox();
    let mut s = settings();
    s.sha256 = Some("0".repeat(64));
    let err = sb
        .runtime
        .load(&common::component("probe"), s)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("but the configuration pins 0000"), "{err}");
}

/// A TLS front on loopback for `leaf`, relaying to the plain `upstream`.
async fn tls_front(upstream: &str, leaf: &rcgen::CertifiedKey) -> u16 {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// Firewalls ship with self-signed certificates, and companies run private
/// CAs: a plugin reaches such an origin only with the trust its main
/// configuration gives it (`tls = { pinned_cert | ca_file }`), and that
/// trust is the plugin's own: a pin accepts that certificate and nothing
/// else, and a plugin without one still refuses the self-signed server.
#[tokio::test]
async fn a_plugin_reaches_a_self_signed_origin_only_with_the_trust_it_is_given() {
    use prismhook::runtime::TlsMode;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedKey, IsCa, KeyPair};
    let sb = sandbox();
    let (base, _) = echo_server().await;
    let certificate = |issuer: Option<&CertifiedKey>| {
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key_pair = KeyPair::generate().unwrap();
        let cert = match issuer {
            Some(ca) => params.signed_by(&key_pair, &ca.cert, &ca.key_pair).unwrap(),
            None => params.self_signed(&key_pair).unwrap(),
        };
        CertifiedKey { cert, key_pair }
    };
    let ca = {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key_pair = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key_pair).unwrap();
        CertifiedKey { cert, key_pair }
    };
    let self_signed = certificate(None);
    let by_ca = certificate(Some(&ca));
    let self_port = tls_front(&base, &self_signed).await;
    let ca_port = tls_front(&base, &by_ca).await;
    let files = tempfile::tempdir().unwrap();
    let pin = files.path().join("firewall.pem");
    std::fs::write(&pin, self_signed.cert.pem()).unwrap();
    let ca_file = files.path().join("corp-ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();

    let cases = [
        (TlsMode::System, self_port, false),
        (TlsMode::PinnedCert(pin.clone()), self_port, true),
        (TlsMode::PinnedCert(pin), ca_port, false),
        (TlsMode::CaFile(ca_file.clone()), ca_port, true),
        (TlsMode::CaFile(ca_file), self_port, false),
    ];
    for (id, (tls, port, reachable)) in cases.into_iter().enumerate() {
        let mut s = allow(&["https://localhost:*"], Vec::new());
        s.tls = tls.clone();
        let p = probe(&sb, s).await;
        let url = format!("https://localhost:{port}/echo");
        let out = p
            .handle(vec![event(
                id as u64,
                "TEST.HTTP",
                serde_json::json!({ "url": url }),
            )])
            .await
            .unwrap();
        assert!(matches!(out[..], [Outcome::Done]));
        let result = kv_text(&sb, &format!("http/{id}")).unwrap();
        if reachable {
            assert!(
                result.starts_with("status=200"),
                "{tls:?} to {url}: {result}"
            );
        } else {
            assert!(result.starts_with("error="), "{tls:?} to {url}: {result}");
            assert!(result.contains("certificate"), "{tls:?} to {url}: {result}");
        }
    }

    // A trust that cannot be read is a load error that names it.
    let mut s = settings();
    s.tls = TlsMode::CaFile(files.path().join("missing.pem"));
    let Err(e) = sb.runtime.load(&common::component("probe"), s).await else {
        panic!("a missing CA file refuses the plugin");
    };
    assert!(matches!(e, LoadError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("missing.pem"), "{e}");
}

/// The cache's entries of the probe's variants, by variant, with their size
/// (the compiled code and its checksum).
fn cached_variants(cache: &std::path::Path, shas: &[String]) -> Vec<Option<u64>> {
    shas.iter()
        .map(|sha| {
            std::fs::read_dir(cache)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(sha.as_str())
                })
                .map(|p| std::fs::metadata(p).unwrap().len())
                .reduce(|a, b| a + b)
        })
        .collect()
}

#[tokio::test]
async fn the_compiled_code_cache_keeps_to_its_limit_dropping_the_least_recently_used() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let files: Vec<_> = (1..=3u32)
        .map(|n| {
            let file = dir.path().join(format!("probe-{n}.wasm"));
            std::fs::write(&file, common::probe_variant(n)).unwrap();
            file
        })
        .collect();
    let runtime = |kv: &str, max_bytes: u64| {
        let mut opts = RuntimeOptions::new(dir.path().join(kv));
        opts.cache_dir = Some(cache.clone());
        opts.cache_max_bytes = max_bytes;
        Runtime::new(opts).unwrap()
    };
    let load = |rt: Arc<Runtime>, n: usize| {
        let file = files[n].clone();
        async move { rt.load(&file, settings()).await.unwrap() }
    };

    // No limit: each version adds an entry. Version 1 is then loaded again,
    // from its entry, which makes version 2's the least recently used.
    let rt = runtime("kv1.redb", 0);
    let v1 = load(rt.clone(), 0).await;
    let v2 = load(rt.clone(), 1).await;
    assert!(!v1.from_cache() && !v2.from_cache());
    assert!(load(rt.clone(), 0).await.from_cache());
    let shas: Vec<String> = [&v1, &v2].iter().map(|p| p.sha256().to_owned()).collect();
    let sizes = cached_variants(&cache, &shas);
    let (s1, s2) = (sizes[0].unwrap(), sizes[1].unwrap());
    drop((v1, v2, rt));

    // Room for one and a half more: the third version's entry pushes out
    // the least recently used, version 2's, and only it.
    let rt = runtime("kv2.redb", s1 + s2 + s2 / 2);
    let v3 = load(rt.clone(), 2).await;
    assert!(!v3.from_cache());
    let shas = [shas[0].clone(), shas[1].clone(), v3.sha256().to_owned()];
    let cached = cached_variants(&cache, &shas);
    assert!(
        cached[0].is_some() && cached[1].is_none() && cached[2].is_some(),
        "{cached:?}"
    );
    let kept: u64 = cached.iter().flatten().sum();
    assert_eq!(rt.compiled_cache_bytes(), Some(kept), "what /metrics shows");
    assert!(load(rt.clone(), 0).await.from_cache());
    works(&v3).await;
    drop((v3, rt));

    // A lower limit takes effect at start: only what fits stays, the most
    // recently used first (version 1, just loaded).
    let rt = runtime("kv3.redb", s1 + s1 / 2);
    let cached = cached_variants(&cache, &shas);
    assert_eq!(cached.iter().flatten().count(), 1, "{cached:?}");
    assert!(cached[0].is_some(), "{cached:?}");
    assert!(load(rt.clone(), 0).await.from_cache());
    assert!(!load(rt, 2).await.from_cache());
}

/// What `tracing` writes, for a subscriber set on one thread.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures this thread's log lines until the guard drops.
    fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
        Self::start_at(tracing::Level::INFO)
    }

    /// [`Captured::start`], at `level` and above.
    fn start_at(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// A current-thread runtime (the default of `tokio::test`) runs the call and
// the WASI streams' tasks on this thread, where the subscriber is set.
#[tokio::test]
async fn a_plugins_printed_lines_are_host_log_lines_with_its_name_and_events_until_its_budget_runs_out(
) {
    let sb = sandbox();
    let mut s = settings();
    // Seven of the probe's 13-byte lines fit (45 bytes each with what a
    // line costs besides its text), the eighth does not.
    s.limits.max_log_bytes = 325;
    let plugin = probe(&sb, s).await;
    let (logs, guard) = Captured::start();
    let shout = event(7, "TEST.SHOUT", serde_json::json!({ "lines": 50 }));
    let out = plugin.handle(vec![shout]).await.unwrap();
    drop(guard);
    assert!(matches!(out[..], [Outcome::Done]));

    let text = logs.text();
    let shouts: Vec<&str> = text.lines().filter(|l| l.contains("shout ")).collect();
    assert_eq!(shouts.len(), 7, "{text}");
    for (i, line) in shouts.iter().enumerate() {
        assert!(
            line.contains(&format!("shout {i} of 50"))
                && line.contains("plugin=probe")
                && line.contains("events=7")
                && line.contains("stream=\"stdout\""),
            "{line}"
        );
    }
    let used_up: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("log budget for this call used up"))
        .collect();
    assert_eq!(used_up.len(), 1, "said once: {text}");
    assert!(used_up[0].contains("events=7"), "{}", used_up[0]);

    // The next call has its own budget.
    let again = event(8, "TEST.SHOUT", serde_json::json!({ "lines": 1 }));
    let (logs, guard) = Captured::start();
    plugin.handle(vec![again]).await.unwrap();
    drop(guard);
    assert!(logs.text().contains("shout 0 of 1"), "{}", logs.text());
}

mod buggy_ledger {
    use prismhook::ledger::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    /// The embedded ledger with a bug in the host to arm: recording the
    /// next batch's outcomes panics (while a batch is in flight), or every
    /// claim panics (which ends the worker that made it).
    #[derive(Debug)]
    pub struct BuggyLedger {
        pub inner: RedbLedger,
        pub panic_on_complete: AtomicBool,
        pub panic_on_claim: AtomicBool,
        pub claims: AtomicU32,
    }

    impl BuggyLedger {
        pub fn new(inner: RedbLedger) -> Self {
            BuggyLedger {
                inner,
                panic_on_complete: false.into(),
                panic_on_claim: false.into(),
                claims: 0.into(),
            }
        }
    }

    #[async_trait::async_trait]
    impl Ledger for BuggyLedger {
        async fn append(&self, e: NewEvent, p: Vec<String>) -> Result<Appended, LedgerError> {
            self.inner.append(e, p).await
        }
        async fn claim(&self, plugin: &str, max: usize) -> Result<Vec<Delivery>, LedgerError> {
            self.claims.fetch_add(1, Ordering::SeqCst);
            if self.panic_on_claim.load(Ordering::SeqCst) {
                panic!("a bug while claiming");
            }
            self.inner.claim(plugin, max).await
        }
        async fn complete(
            &self,
            plugin: &str,
            results: Vec<(u64, Outcome)>,
        ) -> Result<(), LedgerError> {
            if self.panic_on_complete.swap(false, Ordering::SeqCst) {
                panic!("a bug while recording outcomes");
            }
            self.inner.complete(plugin, results).await
        }
        async fn release(&self, plugin: &str, ids: &[u64]) -> Result<(), LedgerError> {
            self.inner.release(plugin, ids).await
        }
        fn next_due(&self, plugin: &str) -> Option<Instant> {
            self.inner.next_due(plugin)
        }
        async fn wait_for_work(&self, plugin: &str, limit: Duration) -> Wake {
            self.inner.wait_for_work(plugin, limit).await
        }
        async fn dead_letters(
            &self,
            plugin: Option<&str>,
            after: Option<&DeadLetterCursor>,
            limit: usize,
        ) -> Result<Vec<DeadLetter>, LedgerError> {
            self.inner.dead_letters(plugin, after, limit).await
        }
        async fn replay_dead(
            &self,
            plugin: Option<&str>,
            ids: Option<&[u64]>,
        ) -> Result<u64, LedgerError> {
            self.inner.replay_dead(plugin, ids).await
        }
        async fn drop_dead(
            &self,
            plugin: Option<&str>,
            ids: Option<&[u64]>,
        ) -> Result<u64, LedgerError> {
            self.inner.drop_dead(plugin, ids).await
        }
        async fn replay_since(
            &self,
            plugin: &str,
            since_ms: u64,
            subscriptions: &[String],
        ) -> Result<u64, LedgerError> {
            self.inner
                .replay_since(plugin, since_ms, subscriptions)
                .await
        }
        fn backlog(&self) -> Result<Vec<PluginBacklog>, LedgerError> {
            self.inner.backlog()
        }
        fn stats(&self) -> LedgerStats {
            self.inner.stats()
        }
        async fn prune(&self) -> Result<u64, LedgerError> {
            self.inner.prune().await
        }
        async fn check(&self) -> Result<(), LedgerError> {
            self.inner.check().await
        }
        async fn close(&self) -> Result<(), LedgerError> {
            self.inner.close().await
        }
    }
}

/// A dispatcher with one worker for the probe, on `ledger`, running, with
/// an event of entities A and B queued; stop it with `stop`.
async fn dispatching_two_events(
    sb: &Sandbox,
    ledger: Arc<buggy_ledger::BuggyLedger>,
) -> (prismhook::dispatch::Dispatcher, tokio::task::JoinHandle<()>) {
    use prismhook::dispatch::{DispatchOptions, Dispatcher};
    use prismhook::ledger::{Ledger, NewEvent, SharedLedger};
    use prismhook::registry::{Entry, PluginState, Registry};

    let registry = Registry::default();
    let plugin = probe(sb, settings()).await;
    registry.update(|all| {
        all.insert(
            "probe".into(),
            Entry {
                plugin: Some(plugin),
                state: PluginState::Active,
                coalesce: false,
                load_error: None,
            },
        );
    });
    for entity in ["A", "B"] {
        let event = NewEvent {
            cluster: "lab".into(),
            event_type: "TEST.NOTE".into(),
            entity_kind: "test".into(),
            entity_uuid: entity.into(),
            dedupe_key: None,
            received_at_ms: 1,
            body: "{}".into(),
            vm: None,
        };
        ledger.append(event, vec!["probe".into()]).await.unwrap();
    }
    // One worker: were it lost with a panic, nothing would be delivered.
    let shared: SharedLedger = ledger;
    let dispatcher = Dispatcher::new(
        shared,
        registry,
        DispatchOptions {
            batch_max: 16,
            batch_window: Duration::from_millis(50),
            workers_per_plugin: 1,
            quarantine_after: 100,
            quarantine_pause: Duration::from_secs(1),
            handle_durations: None,
        },
    );
    let running = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatcher.run().await }
    });
    (dispatcher, running)
}

async fn both_delivered(ledger: &buggy_ledger::BuggyLedger, within: Duration) {
    use prismhook::ledger::Ledger;
    common::wait_until("both events to be delivered", within, || {
        ledger
            .backlog()
            .unwrap()
            .iter()
            .all(|b| b.delivered == 2 && b.pending + b.in_flight + b.retrying == 0)
    })
    .await;
}

#[tokio::test]
async fn a_panic_while_delivering_retries_the_batch_and_the_worker_carries_on() {
    use prismhook::ledger::{LedgerOptions, RedbLedger};

    let sb = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = LedgerOptions::new(dir.path().join("ledger.redb"));
    opts.retry.initial = Duration::from_millis(50);
    opts.retry.max_delay = Duration::from_millis(50);
    let ledger = Arc::new(buggy_ledger::BuggyLedger::new(
        RedbLedger::open(opts).unwrap(),
    ));
    ledger.panic_on_complete.store(true, Ordering::SeqCst);
    let (dispatcher, running) = dispatching_two_events(&sb, ledger.clone()).await;
    both_delivered(&ledger, Duration::from_secs(20)).await;
    // Handled in the batch that panicked, then once more as a retry.
    for entity in ["A", "B"] {
        let seen = kv_text(&sb, &format!("seen/lab/{entity}")).unwrap();
        let attempts: Vec<&str> = seen.lines().map(|l| l.split(':').nth(1).unwrap()).collect();
        assert_eq!(attempts, ["1", "2"], "{entity}: {seen}");
    }
    dispatcher.stop();
    running.await.unwrap();
}

/// A worker that panics is started again after a pause that grows, not at
/// once: a bug met on every claim used to spin a core and flood the log.
#[tokio::test]
async fn a_worker_ended_by_a_panic_is_started_again_after_a_growing_pause() {
    use prismhook::ledger::{LedgerOptions, RedbLedger};

    let sb = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let opts = LedgerOptions::new(dir.path().join("ledger.redb"));
    let ledger = Arc::new(buggy_ledger::BuggyLedger::new(
        RedbLedger::open(opts).unwrap(),
    ));
    ledger.panic_on_claim.store(true, Ordering::SeqCst);
    let (dispatcher, running) = dispatching_two_events(&sb, ledger.clone()).await;
    // Pauses of 1 s, then 2 s: claims at about 0, 1 and 3 s.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let claims = ledger.claims.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&claims),
        "{claims} claims in 2.5 s: the worker is restarted after a pause"
    );
    // Once the bug is gone, the next worker delivers.
    ledger.panic_on_claim.store(false, Ordering::SeqCst);
    both_delivered(&ledger, Duration::from_secs(20)).await;
    dispatcher.stop();
    running.await.unwrap();
}
