//! Issue 4's figures: what durability costs, and the whole path's rate.
//!
//! Three servers in this process, on the same runtime:
//! - D, durable: the listener's own router (`listener::router` over the
//!   Nutanix source's routes) with a real ledger (redb, group commit, fsync before 202) and paloalto.wasm loaded
//!   and subscribed, so each accept stores the event and one pending
//!   delivery. No dispatcher runs: this isolates accepting.
//! - N, non-durable: the same handler (auth, body cap, lenient parse,
//!   subscriber lookup, event record, counters, JSON answer) without the
//!   ledger write.
//! - T, trivial: the reference's trivial axum handler.
//! - F, an fsync'd file: N's handler handing each event to one thread that
//!   appends whatever queued while it last flushed to a plain file (zeroed
//!   ahead, `DURABILITY_F_ZEROED_MIB`) and `fdatasync`s it before the
//!   202s. No store behind a group commit fsync'd before the 202 does less,
//!   so F is the ceiling of D on this machine, measured in the same run.
//!
//! 1. Saturation with wrk (-t2 -c64, 5 s), D/N/T/F rotating, 3 rounds
//!    (`DURABILITY_ROUNDS`: more show how the rates hold up as the ledger's
//!    file and the process's heap grow; nothing is delivered or pruned).
//! 2. A fixed 1,000 notifications/s from an in-process open-loop generator,
//!    latency from each request's scheduled time to its answer, D/N/T/F
//!    rotating, 2 rounds of 5 s.
//! 3. End to end: the full host (`App`), N VM.ON notifications posted as
//!    fast as 64 keep-alive connections go, until every one is applied at
//!    the PAN-OS simulator through the Wasm plugin; then VM.OFF for the
//!    same VMs, until the firewall is empty again.
//!
//! `cargo bench -p prismhook --bench durability`

mod common;

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use prismhook::clock::now_ms;
use prismhook::ledger::{LedgerOptions, NewEvent, RedbLedger, SharedLedger};
use prismhook::nutanix::payload::parse_notification;
use prismhook::registry::Registry;
use prismhook::secret;
use prismhook::telemetry::ListenerStats;
use tokio::sync::oneshot;

use common::*;

// ------------------------------------------------------------ N and F: no ledger

#[derive(Clone)]
struct NonDurable {
    expected: Arc<str>,
    registry: Registry,
    max_body_bytes: usize,
    accepting: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
    stats: Arc<ListenerStats>,
    /// F's file; `None` for N.
    file: Option<FileLog>,
}

/// The least any store behind a group commit fsync'd before the 202 does:
/// one thread appends every event that queued while its last `fdatasync`
/// ran, length-prefixed, to a plain file, `fdatasync`s it and answers them
/// all. Nothing is kept that a restart could look up. The file is zeroed
/// and synced ahead (`DURABILITY_F_ZEROED_MIB`, 256 MiB by default) and
/// written round and round, as a log recycles its segments, so that a
/// flush writes no file system metadata (on a file system without a
/// journal an allocating write's `fdatasync` also writes and waits for the
/// allocation's metadata) and F holds no more of the page cache than that
/// while D's ledger grows beside it.
#[derive(Clone)]
struct FileLog {
    queue: mpsc::Sender<(NewEvent, Option<Vec<u8>>, oneshot::Sender<()>)>,
    commits: Arc<AtomicU64>,
}

impl FileLog {
    fn create(path: &std::path::Path, zeroed_mib: usize) -> FileLog {
        let mut file = std::fs::File::create(path).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..zeroed_mib {
            file.write_all(&zeros).unwrap();
        }
        file.sync_all().unwrap();
        let size = (zeroed_mib as u64) << 20;
        let (queue, rx) = mpsc::channel::<(NewEvent, Option<Vec<u8>>, oneshot::Sender<()>)>();
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        std::thread::Builder::new()
            .name("file-log".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut answers = Vec::new();
                let mut at = 0u64;
                while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    // As the ledger's writer: at most 256 a group.
                    while let Some((event, vm, answer)) = next {
                        buf.extend_from_slice(&event.received_at_ms.to_le_bytes());
                        let dedupe_key = event.dedupe_key.as_deref().unwrap_or("");
                        for part in [
                            event.cluster.as_bytes(),
                            event.event_type.as_bytes(),
                            event.entity_kind.as_bytes(),
                            event.entity_uuid.as_bytes(),
                            dedupe_key.as_bytes(),
                            vm.as_deref().unwrap_or(b""),
                            event.body.as_bytes(),
                        ] {
                            buf.extend_from_slice(&(part.len() as u32).to_le_bytes());
                            buf.extend_from_slice(part);
                        }
                        answers.push(answer);
                        next = (answers.len() < 256).then(|| rx.try_recv().ok()).flatten();
                    }
                    if at + buf.len() as u64 > size {
                        at = 0;
                    }
                    file.write_all_at(&buf, at).unwrap();
                    at += buf.len() as u64;
                    file.sync_data().unwrap();
                    buf.clear();
                    counted.fetch_add(1, Ordering::Relaxed);
                    for answer in answers.drain(..) {
                        let _ = answer.send(());
                    }
                }
            })
            .unwrap();
        FileLog { queue, commits }
    }

    /// Stores the event and returns once it is on disk. The decoded VM is
    /// encoded here, as the ledger's caller does.
    async fn append(&self, mut event: NewEvent) {
        let vm = event.vm.take().map(|vm| serde_json::to_vec(&vm).unwrap());
        let (answer, flushed) = oneshot::channel();
        self.queue.send((event, vm, answer)).unwrap();
        flushed.await.unwrap();
    }
}

/// The Nutanix callback and `Ingest::accept` line for line, with
/// `ledger.append` left out (N) or replaced by an append to F's file.
async fn non_durable(
    State(s): State<NonDurable>,
    Path(cluster): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if cluster != "lab" {
        return (StatusCode::NOT_FOUND, "no such cluster\n").into_response();
    }
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|e| {
            base64::engine::general_purpose::STANDARD
                .decode(e.trim())
                .ok()
        })
        .is_some_and(|d| secret::matches_if_any(&d, Some(s.expected.as_bytes())));
    if !ok {
        return (StatusCode::UNAUTHORIZED, "wrong or missing credentials\n").into_response();
    }
    if !s.accepting.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let Ok(body) = axum::body::to_bytes(body, s.max_body_bytes).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "too large\n").into_response();
    };
    let note = match parse_notification(&body) {
        Ok(n) => n,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let plugins = s.registry.subscribers(&note.event_type);
    let event = NewEvent {
        cluster: cluster.clone(),
        event_type: note.event_type.clone(),
        entity_kind: note.entity_kind,
        entity_uuid: note.entity_uuid.clone(),
        dedupe_key: Some(format!("{cluster}/{}", note.dedupe_key)),
        received_at_ms: now_ms(),
        body: String::from_utf8(body.into())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        vm: note.vm,
    };
    match &s.file {
        Some(file) => file.append(event).await,
        None => drop(std::hint::black_box(event)),
    }
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let response = (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "id": id, "deliveries": plugins.len() })),
    )
        .into_response();
    s.stats
        .count(&cluster, &note.event_type, StatusCode::ACCEPTED.as_u16());
    response
}

// ------------------------------------------------------------ figures

#[tokio::main]
async fn main() {
    init_tracing();
    println!("# prismhook bench: durability (issue 4)");
    machine_note();
    let dir = tempfile::tempdir().unwrap();

    let registry = paloalto_registry(dir.path()).await;
    let ledger: SharedLedger =
        Arc::new(RedbLedger::open(LedgerOptions::new(dir.path().join("ledger.redb"))).unwrap());
    let durable = listener_router(ledger.clone(), registry.clone(), dir.path());
    let bare = |file: Option<FileLog>| {
        Router::new()
            .route("/listener/callback/{cluster}", post(non_durable))
            .with_state(NonDurable {
                expected: format!("{WEBHOOK_USER}:{WEBHOOK_PASSWORD}").into(),
                registry: registry.clone(),
                max_body_bytes: 1 << 20,
                accepting: Arc::new(AtomicBool::new(true)),
                next_id: Arc::new(AtomicU64::new(1)),
                stats: Arc::default(),
                file,
            })
    };
    let file = FileLog::create(
        &dir.path().join("file-log"),
        env_number("DURABILITY_F_ZEROED_MIB", 256),
    );
    let nd = bare(None);
    let fd = bare(Some(file.clone()));
    let targets = [
        Target {
            name: "D durable (ledger, fsync)",
            url: format!("http://{}/listener/callback/lab", serve(durable).await),
        },
        Target {
            name: "N non-durable (same handler, no ledger)",
            url: format!("http://{}/listener/callback/lab", serve(nd).await),
        },
        Target {
            name: "T trivial axum",
            url: format!("http://{}/listener/callback/lab", start_trivial().await),
        },
        Target {
            name: "F fsync'd file (N + append, fsync)",
            url: format!("http://{}/listener/callback/lab", serve(fd).await),
        },
    ];
    let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
    let script = wrk_script();
    let mut round_id = 1000u32;

    // ------------------------------------------------------------ 1
    println!("\n## 1. Accept rate at saturation: wrk -t2 -c64 -d5s --latency (wrk shares the 2 cores), fixtures vm_*.json made unique");
    let mut group = Vec::new();
    // Flushes so far of the targets that flush: D's ledger and F's file.
    let commits = |i: usize| match i {
        0 => Some(ledger.stats().commits),
        3 => Some(file.commits.load(Ordering::Relaxed)),
        _ => None,
    };
    let rounds: usize = env_number("DURABILITY_ROUNDS", 3);
    let sat = saturate(
        &targets,
        rounds,
        &script,
        &auth,
        &mut round_id,
        &["ledger commits", "events/commit", "ledger file"],
        commits,
        |i, c0, r| {
            let (Some(c0), Some(now)) = (c0, commits(i)) else {
                return " – | – | – |".into();
            };
            let c = now - c0;
            let per = r.requests.saturating_sub(r.non_2xx) as f64 / c.max(1) as f64;
            if i != 0 {
                return format!(" {c} | {per:.1} | – |");
            }
            group.push(per);
            // The file's size as the writer last measured it (nothing is pruned here).
            format!(" {c} | {per:.1} | {} MiB |", ledger.stats().bytes >> 20)
        },
    )
    .await;

    // ------------------------------------------------------------ 2
    println!("\n## 2. Ack latency at a fixed 1,000 notifications/s (in-process open-loop generator, reqwest, keep-alive; 2 rounds × 5 s per target)");
    let (paced_lat, paced_bad) = paced_rounds(&targets, 2, &auth, 2000, &mut round_id).await;

    // ------------------------------------------------------------ summary 1+2
    let med =
        |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!(
        "\n## Summary, accepting (medians over rounds; paced latencies pooled over both rounds)"
    );
    println!("| target | 202/s saturated | vs trivial | p50 sat. | p99 sat. | p50 @1k/s | p99 @1k/s | p99.9 @1k/s | non-202 @1k/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let trivial_rate = med(&sat[2], |r| r.ok_per_s);
    for i in 0..targets.len() {
        let l = sorted(paced_lat[i].clone());
        println!(
            "| {} | {} | {:.2}× | {} | {} | {} | {} | {} | {} |",
            targets[i].name,
            rate(med(&sat[i], |r| r.ok_per_s)),
            med(&sat[i], |r| r.ok_per_s) / trivial_rate,
            us(med(&sat[i], |r| r.p50_us)),
            us(med(&sat[i], |r| r.p99_us)),
            us(percentile(&l, 50.0)),
            us(percentile(&l, 99.0)),
            us(percentile(&l, 99.9)),
            paced_bad[i]
        );
    }
    let (d, n, f) = (
        med(&sat[0], |r| r.ok_per_s),
        med(&sat[1], |r| r.ok_per_s),
        med(&sat[3], |r| r.ok_per_s),
    );
    println!(
        "durable / non-durable, saturated: {:.2}×; group commit: median {:.1} events per fsync'd commit",
        d / n,
        median(&group)
    );
    println!(
        "fsync'd file / non-durable: {:.2}× (no store does less); durable / fsync'd file: {:.2}×",
        f / n,
        d / f
    );
    let d_p99 = percentile(&sorted(paced_lat[0].clone()), 99.0);
    println!(
        "targets: ≥ 10,000 durable accepts/s → {} ({}); p99 ack < 10 ms at 1,000/s → {} ({})",
        rate(d),
        if d >= 10_000.0 { "met" } else { "NOT met" },
        us(d_p99),
        if d_p99 < 10_000.0 { "met" } else { "NOT met" }
    );
    drop(targets);
    let _ = std::fs::remove_file(&script);

    // ------------------------------------------------------------ 3
    println!("\n## 3. End to end: notifications posted → applied at the PAN-OS simulator through paloalto.wasm (full host)");
    let rig = start_host().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let n: u64 = 20_000;
    let on = Arc::new(VmTemplate::load(&fixtures_dir().join("vm_on.json")));
    let off = Arc::new(VmTemplate::load(&fixtures_dir().join("vm_off.json")));
    println!(
        "{n} × VM.ON (vm_on.json, 1 IP, tag ntnx.managed) for distinct VMs, then {n} × VM.OFF for the same VMs; \
         64 concurrent keep-alive posters in this process; done when the simulator's registered entries reach {n} / 0"
    );
    println!("| round | events | 202 | posting took | ingest /s | applied after | end-to-end events/s | firewall requests | fw commits |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut e2e = Vec::new();
    for round in 0..4u32 {
        let series = 3000 + round / 2;
        let (template, want, label) = if round % 2 == 0 {
            (on.clone(), n, "VM.ON")
        } else {
            (off.clone(), 0, "VM.OFF")
        };
        let body: Arc<dyn Fn(u64) -> String + Send + Sync> =
            Arc::new(move |i| template.render(series, i));
        let limit = Duration::from_secs(120);
        let urls = [rig.url.clone()];
        let r = applied_round(
            &client,
            &urls,
            Spread::All,
            &rig.auth,
            n,
            body,
            &rig.panos,
            want,
            limit,
        )
        .await;
        let e2e_rate = r.applied.map(|d| r.accepted as f64 / d.as_secs_f64());
        if let Some(rate) = e2e_rate {
            e2e.push(rate);
        }
        println!(
            "| {} {label} | {n} | {} | {:.2} s | {} | {} | {} | {} | {} |",
            round + 1,
            r.accepted,
            r.posting.as_secs_f64(),
            rate(r.accepted as f64 / r.posting.as_secs_f64()),
            r.applied
                .map_or("> 120 s".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            e2e_rate.map_or("n/a".into(), rate),
            r.requests,
            r.commits
        );
        drain(&rig.app.ledger, Duration::from_secs(60)).await;
    }
    let e2e_median = median(&e2e);
    println!(
        "end-to-end median: {} (target ≥ 5,000 events/s: {})",
        rate(e2e_median),
        if e2e_median >= 5000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    let c = rig.app.dispatcher.counters();
    if let Some(p) = c.get("paloalto") {
        println!(
            "dispatcher: {} handle calls for {} deliveries ({:.0} events/call), {} failed calls, time in handle {:.2} s",
            p.calls,
            p.delivered,
            p.delivered as f64 / p.calls.max(1) as f64,
            p.failed_calls,
            p.handle_time.as_secs_f64()
        );
    }
}
