//! Durable delivery end to end: nothing the listener acknowledged is lost
//! when the real binary is killed with SIGKILL under load, a firewall outage
//! is ridden out with retries, dead letters are listed, replayed and
//! dropped, the listener answers 503 rather than accept what it cannot keep,
//! and a retrying event holds back its own entity only.
//!
//! The crash test kills the host `PRISMHOOK_CRASH_KILLS` times (5 by
//! default; the full run is 20) at moments drawn from `PRISMHOOK_CRASH_SEED`
//! (printed on every run, so a failure can be replayed); its JetStream twin
//! runs the host on a three-node NATS cluster and kills NATS nodes too.

use crate::common::process::{log_tail, wait_ready, wait_ready_within, HostProcess};
use crate::common::{self, Cluster, HostConfig};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prismhook::app::App;
use prismhook::clock::now_ms;
use prismhook::ledger::{
    Appended, DeadLetter, JetStreamLedger, JetStreamOptions, Ledger, LedgerOptions, NewEvent,
    PluginBacklog, RedbLedger, SharedLedger, MAX_REASON_BYTES,
};
use prismhook::nutanix::payload::parse_notification;
use prismhook::runtime::kv_store::KvStore;
use prismhook_sim::nats::Nats;
use prismhook_sim::panos::Faults;
use prismhook_sim::prism::{NewNic, NewVm, PrismSim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const WEBHOOK_USER: &str = "prismhook";
const WEBHOOK_PASSWORD: &str = "durable-hook-secret";

// ---------------------------------------------------------------------------
// A host on the Prism simulator, in process or as the real binary.

pub(crate) struct World {
    pub(crate) prism: Arc<PrismSim>,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) async fn world(plugins: &[&str]) -> World {
    common::init_tracing();
    let mut dir = tempfile::tempdir().unwrap();
    // The hosts' logs and data outlive a failure that needs reading.
    if std::env::var_os("PRISMHOOK_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    common::setup::install(&dir.path().join("plugins"), plugins);
    World {
        prism: Arc::new(common::setup::start_prism().await),
        dir,
    }
}

impl World {
    pub(crate) fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Instance `durability` with cluster `lab` on the Prism simulator.
    pub(crate) fn host(&self) -> HostConfig {
        HostConfig::new(self.dir.path())
            .instance("durability")
            .cluster(Cluster {
                webhook_password: Some(WEBHOOK_PASSWORD.into()),
                ..Cluster::lab(&self.prism)
            })
    }

    async fn start(&self, host: &HostConfig) -> App {
        let app = App::start(host.config()).await.unwrap();
        wait(
            || app.cluster_status().iter().all(|c| c.registered),
            "webhook registration",
        )
        .await;
        app
    }
}

pub(crate) async fn wait(ready: impl FnMut() -> bool, what: &str) {
    wait_for(Duration::from_secs(30), ready, what).await
}

async fn wait_for(limit: Duration, ready: impl FnMut() -> bool, what: &str) {
    common::wait_until(what, limit, ready).await
}

fn backlog(app: &App, plugin: &str) -> PluginBacklog {
    app.ledger
        .backlog()
        .unwrap()
        .into_iter()
        .find(|b| b.plugin == plugin)
        .unwrap_or(PluginBacklog {
            plugin: plugin.to_owned(),
            pending: 0,
            in_flight: 0,
            retrying: 0,
            dead: 0,
            delivered: 0,
            oldest_pending_ms: None,
        })
}

fn settled(b: &PluginBacklog) -> bool {
    b.pending + b.in_flight + b.retrying == 0
}

/// Posts notifications to cluster `lab` as Prism would.
#[derive(Clone)]
struct Poster {
    http: reqwest::Client,
    url: String,
}

impl Poster {
    fn new(listener: SocketAddr) -> Poster {
        Poster {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            url: format!("http://{listener}/listener/callback/lab"),
        }
    }

    async fn post(&self, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(&self.url)
            .basic_auth(WEBHOOK_USER, Some(WEBHOOK_PASSWORD))
            .body(body.to_string())
            .send()
            .await
    }

    /// Posts and expects 202; returns the ledger's event id.
    async fn accept(&self, body: &Value) -> u64 {
        let r = self.post(body).await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 202, "{} refused: {text}", body["event_type"]);
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_ne!(
            answer["duplicate"], true,
            "{} was taken for a duplicate",
            body["event_type"]
        );
        answer["id"].as_u64().unwrap()
    }
}

/// The seconds a 503 asks the sender to wait.
fn retry_after(refusal: &reqwest::Response) -> u64 {
    refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A notification the probe acts on by its type (see its docs), for
/// `entity`; each one unique so that dedupe keeps it.
fn probe_event(event_type: &str, entity: &str, extra: Value) -> Value {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut body = json!({
        "event_type": event_type,
        "entity_reference": {"kind": "test", "uuid": entity},
        "version": "1.0",
        "n": N.fetch_add(1, Ordering::Relaxed),
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// A VM notification carrying `seq` as the entity's version, so each
/// `(uuid, seq)` is a distinct change to dedupe.
fn vm_note(event_type: &str, uuid: &str, seq: u64) -> Value {
    let power = if event_type == "VM.OFF" { "OFF" } else { "ON" };
    json!({
        "event_type": event_type,
        "entity_reference": {"kind": "vm", "uuid": uuid},
        "data": {"metadata": {
            "metadata": {"kind": "vm", "uuid": uuid, "entity_version": seq.to_string()},
            "spec": {"name": format!("load-{}", &uuid[uuid.len() - 4..]), "resources": {"power_state": power}},
            "status": {"resources": {"power_state": power}},
        }},
        "version": "1.0",
    })
}

/// What the probe recorded for one entity: `(event id, attempt, type)` in
/// the order it handled them.
fn seen(kv: &BTreeMap<String, Vec<u8>>, entity: &str) -> Vec<(u64, u32, String)> {
    let Some(value) = kv.get(&format!("seen/lab/{entity}")) else {
        return Vec::new();
    };
    String::from_utf8_lossy(value)
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next().unwrap().parse().unwrap();
            let attempt = parts.next().unwrap().parse().unwrap();
            (id, attempt, parts.next().unwrap().to_owned())
        })
        .collect()
}

fn seen_ids(app: &App, entity: &str) -> Vec<u64> {
    seen(&app.runtime.kv().dump("probe").unwrap(), entity)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect()
}

fn dead_letter(letters: &[DeadLetter], id: u64) -> &DeadLetter {
    letters
        .iter()
        .find(|d| d.event.id == id)
        .unwrap_or_else(|| panic!("event {id} is not a dead letter: {letters:?}"))
}

/// Stores notifications in a stopped host's ledger, for the probe, as the
/// listener would have: when the host starts, its first claim finds them all
/// pending at once, so they share one `handle` call whatever the timing.
async fn append_while_stopped(data: &Path, bodies: &[Value]) -> Vec<u64> {
    let events = bodies.iter().map(|body| {
        let text = body.to_string();
        let note = parse_notification(text.as_bytes()).unwrap();
        NewEvent {
            cluster: "lab".into(),
            event_type: note.event_type,
            entity_kind: note.entity_kind,
            entity_uuid: note.entity_uuid,
            dedupe_key: None,
            received_at_ms: now_ms(),
            body: text,
            vm: note.vm,
        }
    });
    store_while_stopped(data, events).await
}

/// [`append_while_stopped`] for events as any source could store them.
async fn store_while_stopped(data: &Path, events: impl IntoIterator<Item = NewEvent>) -> Vec<u64> {
    let ledger = RedbLedger::open(LedgerOptions::new(data.join("ledger.redb"))).unwrap();
    let mut ids = Vec::new();
    for event in events {
        match ledger.append(event, vec!["probe".into()]).await.unwrap() {
            Appended::Stored { id, .. } => ids.push(id),
            other => panic!("not stored: {other:?}"),
        }
    }
    ledger.close().await.unwrap();
    ids
}

// ---------------------------------------------------------------------------
// 1. SIGKILL under load, over the real binary.

#[derive(Debug, Clone, Copy)]
struct Ack {
    entity: usize,
    id: u64,
}

/// A test's knob from the environment (a seed, a number of kills), if set.
/// Host binaries inherit the test's environment, and a host refuses to
/// start on a `PRISMHOOK_CLUSTER_*` variable that names no cluster of its:
/// knobs are named otherwise.
pub(crate) fn env_setting<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The VM uuids the load tests post about, one per entity.
fn entity_uuids(entities: usize) -> Vec<String> {
    (0..entities)
        .map(|i| format!("0c4a5e00-0000-4000-8000-{i:012x}"))
        .collect()
}

/// One [`entity_load`] task per entity, and what they got acknowledged.
struct Load {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(uuids: &[String], port: u16, seed: u64) -> Load {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = uuids
            .iter()
            .enumerate()
            .map(|(i, uuid)| {
                tokio::spawn(entity_load(
                    i,
                    uuid.clone(),
                    port,
                    seed ^ (i as u64 + 1),
                    acks.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load { acks, stop, tasks }
    }

    fn acknowledged(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Stops after each entity's notification in progress is answered.
    async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let acks = self.acks.lock().unwrap().clone();
        acks
    }
}

/// SIGKILLs a random node of `nats` and restarts it a moment later;
/// `at` says when, for the test's log.
pub(crate) async fn kill_a_nats_node(nats: &mut Nats, rng: &mut StdRng, at: &str) {
    let node = rng.random_range(0..nats.nodes.len());
    nats.nodes[node].kill();
    eprintln!("{at}: NATS node {}", nats.nodes[node].name);
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
    nats.nodes[node].restart().await.unwrap();
}

/// One entity's notifications, one at a time, as Prism sends them: each is
/// posted until it gets a 202 (connection errors and 503 are tried again,
/// the same body, so a notification stored just before a crash comes back
/// as a duplicate with its original id); only then the next one.
async fn entity_load(
    entity: usize,
    uuid: String,
    port: u16,
    seed: u64,
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let event_type = ["VM.ON", "VM.UPDATE", "VM.OFF"][(seq % 3) as usize];
        let body = vm_note(event_type, &uuid, seq).to_string();
        // Longer than a host may take to start (see `sigkills_under_load`).
        let give_up = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                Instant::now() < give_up,
                "entity {entity} seq {seq}: no 202 within 120 s"
            );
            let answer = http
                .post(format!("http://127.0.0.1:{port}/listener/callback/lab"))
                .basic_auth(WEBHOOK_USER, Some(WEBHOOK_PASSWORD))
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 202 => {
                    // A body cut short by the kill is no acknowledgement.
                    if let Ok(answer) = r.json::<Value>().await {
                        let id = answer["id"].as_u64().expect("202 carries the event id");
                        acks.lock().unwrap().push(Ack { entity, id });
                        break;
                    }
                }
                Ok(r) if r.status() == 503 => {}
                Ok(r) => panic!(
                    "entity {entity} seq {seq}: unexpected {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
}

/// What the probe recorded, from a stopped host's kv: its redb file, or the
/// plugins' kv on `nats` that every host of the stream shares.
pub(crate) async fn probe_records(data: &Path, nats: Option<&Nats>) -> BTreeMap<String, Vec<u8>> {
    let Some(nats) = nats else {
        return KvStore::open(&data.join("kv.redb"))
            .unwrap()
            .dump("probe")
            .unwrap();
    };
    let ledger = JetStreamLedger::open(JetStreamOptions {
        client_name: "prismhook checker".into(),
        ..JetStreamOptions::new(nats.urls())
    })
    .await
    .unwrap();
    let kv = KvStore::new(Arc::new(ledger.plugin_kv().await.unwrap()));
    let records = kv.dump("probe").unwrap();
    ledger.close().await.unwrap();
    records
}

/// The backlog of every plugin in a stopped host's ledger (its redb file, or
/// the stream on `nats`).
pub(crate) async fn stopped_backlog(data: &Path, nats: Option<&Nats>) -> Vec<PluginBacklog> {
    let ledger: SharedLedger = match nats {
        None => Arc::new(RedbLedger::open(LedgerOptions::new(data.join("ledger.redb"))).unwrap()),
        // Under the host's own name, which takes back at once the leases it left behind.
        Some(nats) => Arc::new(
            JetStreamLedger::open(JetStreamOptions {
                client_name: "prismhook durability".into(),
                ..JetStreamOptions::new(nats.urls())
            })
            .await
            .unwrap(),
        ),
    };
    let backlog = ledger.backlog().unwrap();
    ledger.close().await.unwrap();
    backlog
}

/// The host binary of a file-size limit test, its probe subscribed to
/// one pattern.
struct Limited {
    host: HostProcess,
    port: u16,
    log: PathBuf,
}

impl Limited {
    /// Each file the host writes is held to 8 MiB (`RLIMIT_FSIZE`).
    async fn start(w: &World, subscription: &str) -> Limited {
        let port = common::free_port();
        let setup = w.host().listen(format!("127.0.0.1:{port}")).plugin(
            "probe",
            &[&format!(
                "config = {{ subscriptions = [{subscription:?}] }}"
            )],
        );
        std::fs::write(config_of(w), setup.toml()).unwrap();
        let log = w.dir.path().join("host.log");
        let mut host = HostProcess::spawn_with_file_size_limit(&config_of(w), &log, 8 << 20);
        wait_ready(&mut host, port, &log).await;
        Limited { host, port, log }
    }
}

fn config_of(w: &World) -> PathBuf {
    w.dir.path().join("prismhook.toml")
}

/// Starts the stopped host of a [`Limited`] test again, without the limit,
/// until its ledger holds nothing undelivered for the probe (stopping it
/// with SIGTERM to look); none of the probe's deliveries may die.
async fn drain_without_the_limit(w: &World, port: u16, log: &Path) {
    let drain_until = Instant::now() + Duration::from_secs(60);
    loop {
        let mut host = HostProcess::spawn(&config_of(w), log);
        wait_ready(&mut host, port, log).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(host.sigterm().await.success(), "log:\n{}", log_tail(log));
        let probe = stopped_backlog(&w.data(), None)
            .await
            .into_iter()
            .find(|b| b.plugin == "probe")
            .expect("probe backlog");
        assert_eq!(probe.dead, 0, "{probe:?}");
        if settled(&probe) {
            return;
        }
        assert!(Instant::now() < drain_until, "not drained: {probe:?}");
    }
}

/// A ledger file that cannot grow (a file-size limit here; a full disk
/// alike) fails redb for good: notifications are refused with 503 and a
/// `Retry-After`, and the host stops with an error, for its service manager
/// to start it again. Started again with room, it delivers every
/// notification it acknowledged, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_file_that_cannot_grow_stops_the_host_and_loses_nothing_acknowledged() {
    let w = world(&["probe"]).await;
    let Limited {
        mut host,
        port,
        log,
    } = Limited::start(&w, "VM.*").await;

    let poster = Poster::new(SocketAddr::from(([127, 0, 0, 1], port)));
    let uuids = entity_uuids(4);
    let padding = "x".repeat(32 << 10);
    let mut acked: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut sent = 0u64;
    let refusal = loop {
        assert!(
            sent < 2_000,
            "the ledger never reached the limit; log:\n{}",
            log_tail(&log)
        );
        sent += 1;
        let uuid = &uuids[sent as usize % uuids.len()];
        let mut note = vm_note("VM.UPDATE", uuid, sent);
        note["padding"] = json!(padding);
        let answer = poster.post(&note).await.unwrap();
        if answer.status() != 202 {
            break answer;
        }
        let id = answer.json::<Value>().await.unwrap()["id"]
            .as_u64()
            .unwrap();
        acked.entry(uuid).or_default().push(id);
    };
    let status = refusal.status();
    let wait = retry_after(&refusal);
    let text = refusal.text().await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(wait >= 1 && text.contains("restart"), "{wait}: {text}");
    let exit = host
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the host stops");
    assert_eq!(exit.code(), Some(1), "log:\n{}", log_tail(&log));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("the ledger's file failed"),
        "log:\n{}",
        log_tail(&log)
    );
    eprintln!("{} acknowledged before the file filled", sent - 1);

    drain_without_the_limit(&w, port, &log).await;
    let kv = probe_records(&w.data(), None).await;
    let mut report = OrderReport::default();
    for (uuid, ids) in &acked {
        let recorded: Vec<u64> = seen(&kv, uuid).into_iter().map(|(id, _, _)| id).collect();
        report.add(uuid, check_entity(ids, &recorded));
    }
    report.assert(acked.values().map(Vec::len).sum());
}

/// The plugins' kv file failing for good (here it cannot grow past a file-size limit; a full
/// disk alike) stops the host with an error, for its service manager to start it again, which
/// recovers the file. The events whose writes were not stored wait for that at no cost to
/// their attempts: started again with room, the host delivers every one, at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_file_that_cannot_grow_stops_the_host_and_its_events_wait_for_the_restart() {
    let w = world(&["probe"]).await;
    let Limited {
        mut host,
        port,
        log,
    } = Limited::start(&w, "TEST.*").await;

    // Half a MiB of kv each, a few hundred bytes of ledger: the kv file
    // reaches the limit first.
    let poster = Poster::new(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut acked = Vec::new();
    for _ in 0..24 {
        let note = probe_event("TEST.KV", "blob", json!({ "bytes": 512 << 10 }));
        match poster.post(&note).await {
            Ok(answer) if answer.status() == 202 => {
                let id = answer.json::<Value>().await.unwrap()["id"]
                    .as_u64()
                    .unwrap();
                acked.push(id);
            }
            // The host stopped meanwhile.
            _ => break,
        }
    }
    let exit = host
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the host stops; log:\n{}", log_tail(&log)));
    assert_eq!(exit.code(), Some(1), "log:\n{}", log_tail(&log));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the plugins' kv file failed") && !text.contains("retry:"),
        "log:\n{}",
        log_tail(&log)
    );
    let stored_before = seen(&probe_records(&w.data(), None).await, "blob").len();
    assert!(
        stored_before < acked.len(),
        "{stored_before} of {} stored: the file never filled",
        acked.len()
    );

    drain_without_the_limit(&w, port, &log).await;
    let seen = seen(&probe_records(&w.data(), None).await, "blob");
    assert_eq!(
        seen.iter().map(|&(id, _, _)| id).collect::<Vec<_>>(),
        acked,
        "every acknowledged event stored, in order"
    );
    assert!(
        seen.iter().all(|&(_, attempt, _)| attempt == 1),
        "each at its first attempt: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_notification_survives_random_sigkills_in_per_entity_order() {
    sigkills_under_load(None).await
}

/// The same on the JetStream ledger, a stream of three replicas on a
/// three-node cluster: each kill is of the host or of one NATS node (then
/// restarted), never two at once, so the stream always keeps its quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_notification_survives_sigkills_of_the_host_and_of_nats_nodes_on_jetstream(
) {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(dir.path(), 3).await.unwrap();
    sigkills_under_load(Some(&mut nats)).await
}

/// The ledger a host of [`sigkills_under_load`] uses: its redb file, or the
/// stream on `nats`.
pub(crate) fn ledger_lines(nats: Option<&Nats>) -> Option<String> {
    nats.map(|n| {
        format!(
            "jetstream = {{ servers = {:?}, replicas = 3, ack_timeout = \"2s\" }}",
            n.urls()
        )
    })
}

async fn sigkills_under_load(mut nats: Option<&mut Nats>) {
    const ENTITIES: usize = 20;
    let kills: usize = env_setting("PRISMHOOK_CRASH_KILLS").unwrap_or(5);
    let seed: u64 = env_setting("PRISMHOOK_CRASH_SEED").unwrap_or(20_240_611);
    eprintln!(
        "crash test: {kills} SIGKILLs, seed {seed} (PRISMHOOK_CRASH_KILLS, PRISMHOOK_CRASH_SEED)"
    );
    let began = Instant::now();

    let w = world(&["probe"]).await;
    let port = common::free_port();
    let mut setup = w
        .host()
        .listen(format!("127.0.0.1:{port}"))
        .delivery(r#"retry_initial = "20ms""#)
        .delivery(r#"retry_max = "200ms""#)
        .plugin("probe", &[r#"config = { subscriptions = ["VM.*"] }"#]);
    if let Some(lines) = ledger_lines(nats.as_deref()) {
        setup = setup.storage(r#"backend = "jetstream""#).storage(&lines);
    }
    let config = w.dir.path().join("prismhook.toml");
    std::fs::write(&config, setup.toml()).unwrap();
    let log = w.dir.path().join("host.log");
    let mut rng = StdRng::seed_from_u64(seed);
    // A host that starts while a NATS node is down may wait out an election
    // at each of its steps (the stream, its kv, its leases), up to 30 s each.
    let start_limit = Duration::from_secs(if nats.is_some() { 90 } else { 30 });

    let mut host = HostProcess::spawn(&config, &log);
    wait_ready_within(&mut host, port, &log, start_limit).await;
    wait(
        || w.prism.webhooks().len() == 1,
        "the binary to register its webhook",
    )
    .await;

    let uuids: Vec<String> = entity_uuids(ENTITIES);
    let load = Load::start(&uuids, port, seed);

    for kill in 1..=kills {
        // With JetStream, every other kill on average is of a NATS node: the
        // host rides it out on the other two.
        if let Some(nats) = nats.as_deref_mut() {
            if rng.random_bool(0.5) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                let at = format!(
                    "kill {kill}/{kills} at {:.1}s, {} acknowledged so far",
                    began.elapsed().as_secs_f64(),
                    load.acknowledged()
                );
                kill_a_nats_node(nats, &mut rng, &at).await;
                continue;
            }
        }
        // Mostly while serving under load; now and then while starting up
        // (ledger rebuild, plugin load, registration).
        let during_startup = kill > 1 && rng.random_bool(0.25);
        if during_startup {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        } else {
            wait_ready_within(&mut host, port, &log, start_limit).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        }
        host.sigkill().await;
        eprintln!(
            "kill {kill}/{kills} at {:.1}s{}: {} acknowledged so far",
            began.elapsed().as_secs_f64(),
            if during_startup {
                " (during start-up)"
            } else {
                ""
            },
            load.acknowledged()
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        host = HostProcess::spawn(&config, &log);
    }

    wait_ready_within(&mut host, port, &log, start_limit).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acks = load.stop().await;
    eprintln!(
        "load stopped at {:.1}s: {} notifications acknowledged",
        began.elapsed().as_secs_f64(),
        acks.len()
    );
    assert!(
        acks.len() >= 20 * kills,
        "too little load to mean anything: {} acknowledged",
        acks.len()
    );

    // Let it drain, then stop it gracefully; restart and repeat if the
    // ledger says something is still undelivered.
    let drain_until = Instant::now() + start_limit + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = host.sigterm().await;
        assert!(
            status.success(),
            "SIGTERM should end the host cleanly, got {status}; log:\n{}",
            log_tail(&log)
        );
        let probe = stopped_backlog(&w.data(), nats.as_deref())
            .await
            .into_iter()
            .find(|b| b.plugin == "probe")
            .expect("probe backlog");
        assert_eq!(
            probe.dead, 0,
            "no delivery of a plain VM event may die: {probe:?}"
        );
        if settled(&probe) && probe.in_flight == 0 {
            break;
        }
        assert!(
            Instant::now() < drain_until,
            "the ledger did not drain: {probe:?}"
        );
        host = HostProcess::spawn(&config, &log);
        wait_ready_within(&mut host, port, &log, start_limit).await;
    }

    let kv = probe_records(&w.data(), nats.as_deref()).await;
    assert_delivered_in_order(&acks, &kv, &uuids);
    eprintln!(
        "crash test done in {:.1}s: {} acknowledged, all checked",
        began.elapsed().as_secs_f64(),
        acks.len()
    );
}

/// Every acknowledged notification reached the probe (by its records in
/// `kv`), each entity's in the order they were acknowledged.
fn assert_delivered_in_order(acks: &[Ack], kv: &BTreeMap<String, Vec<u8>>, uuids: &[String]) {
    let mut report = OrderReport::default();
    for (entity, uuid) in uuids.iter().enumerate() {
        let acked_ids: Vec<u64> = acks
            .iter()
            .filter(|a| a.entity == entity)
            .map(|a| a.id)
            .collect();
        assert!(
            acked_ids.windows(2).all(|w| w[0] < w[1]),
            "entity {entity}: the ledger numbered its events out of arrival order: {acked_ids:?}"
        );
        let recorded: Vec<u64> = seen(kv, uuid).into_iter().map(|(id, _, _)| id).collect();
        report.add(
            &format!("entity {entity}"),
            check_entity(&acked_ids, &recorded),
        );
    }
    report.assert(acks.len());
}

/// One entity's deliveries, as a plugin recorded them, against what was
/// acknowledged for it.
pub(crate) struct EntityCheck<K> {
    /// Acknowledged, never delivered.
    missing: Vec<K>,
    /// What broke the order.
    disorder: Option<String>,
    /// Deliveries of what had been delivered before (at least once).
    redelivered: usize,
    /// Delivered, never acknowledged (stored just before a crash).
    extra: usize,
}

/// Compares `recorded` (every delivery, redeliveries included) with
/// `acked`, in acknowledgement order: each acknowledged notification must
/// be delivered; their first deliveries must come in that order, and so
/// must their last (a redelivery repeats what followed it too, so that
/// what a plugin did last is the newest change).
pub(crate) fn check_entity<K>(acked: &[K], recorded: &[K]) -> EntityCheck<K>
where
    K: Clone + Eq + std::hash::Hash + std::fmt::Debug,
{
    let mut first: Vec<K> = Vec::new();
    let mut known = HashSet::new();
    let mut redelivered = 0;
    for k in recorded {
        if known.insert(k.clone()) {
            first.push(k.clone());
        } else {
            redelivered += 1;
        }
    }
    let acked_set: HashSet<&K> = acked.iter().collect();
    let extra = first.iter().filter(|k| !acked_set.contains(k)).count();
    let missing = acked
        .iter()
        .filter(|k| !known.contains(*k))
        .cloned()
        .collect();
    let in_ack_order: Vec<&K> = acked.iter().filter(|k| known.contains(*k)).collect();
    let delivered: Vec<&K> = first.iter().filter(|k| acked_set.contains(k)).collect();
    let last: HashMap<&K, usize> = recorded.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let mut by_last = in_ack_order.clone();
    by_last.sort_by_key(|k| last[k]);
    let disorder = first_difference("first deliveries", &delivered, &in_ack_order).or_else(|| {
        first_difference("last deliveries", &by_last, &in_ack_order).map(|d| {
            format!("{d}: an older notification was delivered again after a newer one, alone")
        })
    });
    EntityCheck {
        missing,
        disorder,
        redelivered,
        extra,
    }
}

/// Where `got` first departs from `want`, with a few of each from there.
fn first_difference<K: PartialEq + std::fmt::Debug>(
    what: &str,
    got: &[K],
    want: &[K],
) -> Option<String> {
    (got != want).then(|| {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        format!(
            "{what} {:?} … where acknowledgement order is {:?} …",
            &got[at..(at + 5).min(got.len())],
            &want[at..(at + 5).min(want.len())]
        )
    })
}

/// What [`check_entity`] found over every entity, asserted at once.
#[derive(Default)]
pub(crate) struct OrderReport {
    missing: Vec<String>,
    disorder: Vec<String>,
    redelivered: usize,
    extra: usize,
}

impl OrderReport {
    pub(crate) fn add<K: std::fmt::Debug>(&mut self, entity: &str, check: EntityCheck<K>) {
        self.missing
            .extend(check.missing.iter().map(|k| format!("{entity}: {k:?}")));
        self.disorder
            .extend(check.disorder.map(|d| format!("{entity}: {d}")));
        self.redelivered += check.redelivered;
        self.extra += check.extra;
    }

    /// Nothing missing and nothing out of order, of `acknowledged`.
    pub(crate) fn assert(self, acknowledged: usize) {
        eprintln!(
            "{acknowledged} acknowledged, all delivered; {} redeliveries, {} stored but never acknowledged",
            self.redelivered, self.extra
        );
        assert!(
            self.missing.is_empty(),
            "{} acknowledged notifications never reached the probe: {:?}",
            self.missing.len(),
            &self.missing[..self.missing.len().min(20)]
        );
        assert!(
            self.disorder.is_empty(),
            "per-entity order broken:\n{}",
            self.disorder.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// 2. A firewall outage.

/// `[plugin.paloalto]` for the PAN-OS simulator, with its key injected.
/// Two attempts 50 ms apart, then a dead letter.
fn two_quick_attempts(host: HostConfig) -> HostConfig {
    host.delivery(r#"retry_initial = "50ms""#)
        .delivery(r#"retry_max = "50ms""#)
        .delivery("max_attempts = 2")
}

#[tokio::test]
async fn events_queue_and_retry_through_a_firewall_outage_and_converge_to_the_truth_after_it() {
    let w = world(&["paloalto"]).await;
    let panos = common::setup::start_panos().await;
    let setup = w
        .host()
        // Enough attempts that nothing dies during the outage.
        .delivery(r#"retry_initial = "50ms""#)
        .delivery(r#"retry_max = "400ms""#)
        .delivery("max_attempts = 1000")
        .paloalto(&panos);
    let app = w.start(&setup).await;
    let settled_now = |app: &App| settled(&backlog(app, "paloalto"));

    // Before: a few VMs, applied.
    let mut rng = StdRng::seed_from_u64(4);
    let mut uuids = Vec::new();
    let mut next_ip = 0u32;
    let mut ip = || {
        next_ip += 1;
        format!("10.20.{}.{}", next_ip / 250, next_ip % 250 + 1)
    };
    for i in 0..5 {
        uuids.push(
            w.prism
                .create_vm(NewVm::named(format!("before-{i}")).powered_on().nic([ip()]))
                .await
                .unwrap()
                .uuid,
        );
    }
    wait(|| settled_now(&app), "the first VMs to be applied").await;
    let before = panos.registered();
    assert_eq!(before, common::firewall_truth(&w.prism.vms()));

    // The firewall goes down; a burst of lifecycle events arrives.
    panos.set_faults(Faults {
        fail_status: Some(503),
        ..Faults::default()
    });
    let outage = Instant::now();
    for i in 0..15 {
        let mut vm = NewVm::named(format!("burst-{i}")).nic([ip()]);
        if rng.random_bool(0.7) {
            vm = vm.powered_on();
        }
        if rng.random_bool(0.5) {
            vm = vm.category("AppTier", ["Web", "App", "Db"][rng.random_range(0..3)]);
        }
        uuids.push(w.prism.create_vm(vm).await.unwrap().uuid);
    }
    for _ in 0..40 {
        let uuid = uuids[rng.random_range(0..uuids.len())].clone();
        match rng.random_range(0..6) {
            0 => drop(w.prism.set_power(&uuid, true).await),
            1 => drop(w.prism.set_power(&uuid, false).await),
            2 => {
                let cats = BTreeMap::from([(
                    "Env".to_owned(),
                    ["Prod", "Dev"][rng.random_range(0..2)].to_owned(),
                )]);
                drop(w.prism.set_categories(&uuid, cats).await)
            }
            3 => drop(w.prism.plug_nic(&uuid, NewNic::with_ips([ip()])).await),
            4 if uuids.len() > 10 => {
                drop(w.prism.delete_vm(&uuid).await);
                uuids.retain(|u| u != &uuid);
            }
            _ => drop(w.prism.set_power(&uuid, true).await),
        }
    }
    assert!(
        w.prism.deliveries().iter().all(|d| d.status == Some(202)),
        "every notification is accepted during the outage"
    );
    wait(
        || backlog(&app, "paloalto").retrying > 0,
        "deliveries to be retrying",
    )
    .await;
    // Retrying with backoff, and not dying, for a while.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(outage.elapsed())).await;
    wait(
        || backlog(&app, "paloalto").retrying > 0,
        "deliveries to be still retrying",
    )
    .await;
    let during = backlog(&app, "paloalto");
    assert_eq!(during.dead, 0, "{during:?}");
    assert_eq!(
        panos.registered(),
        before,
        "nothing is applied while the firewall fails"
    );
    let refused = panos.stats().errors;
    assert!(refused > 0);
    let retried = app.dispatcher.counters()["paloalto"].retried;
    eprintln!(
        "outage of {:.1}s: {refused} firewall requests refused, {retried} delivery retries, backlog {during:?}",
        outage.elapsed().as_secs_f64()
    );

    // It recovers: everything is applied, in per-VM order, and equals the truth.
    panos.set_faults(Faults::default());
    wait(|| settled_now(&app), "the queue to drain after the outage").await;
    let after = backlog(&app, "paloalto");
    assert_eq!(after.dead, 0, "{after:?}");
    assert_eq!(panos.registered(), common::firewall_truth(&w.prism.vms()));
    assert_eq!(panos.stats().commits, 0);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

// ---------------------------------------------------------------------------
// 3. Dead letters and replay.

#[tokio::test]
async fn dead_letters_say_why_they_died_and_can_be_replayed_or_dropped() {
    let w = world(&["probe", "paloalto"]).await;
    let panos = common::setup::start_panos().await;
    // retry_initial = retry_max: every backoff is exactly 100 ms.
    let setup = w
        .host()
        .delivery(r#"retry_initial = "100ms""#)
        .delivery(r#"retry_max = "100ms""#)
        .delivery("max_attempts = 2")
        .plugin("probe", &[r#"config = { subscriptions = ["TEST.*"] }"#])
        .paloalto(&panos);
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);
    let probe_settled = |app: &App, dead: u64| {
        let b = backlog(app, "probe");
        b.dead == dead && settled(&b)
    };

    // A reject dies at once; a retry once its attempts are used up; a plain
    // event of a third entity is delivered.
    let rejected = poster
        .accept(&probe_event("TEST.REJECT", "r-1", json!({})))
        .await;
    let retried = poster
        .accept(&probe_event("TEST.RETRY", "t-1", json!({})))
        .await;
    let fine = poster
        .accept(&probe_event("TEST.NOTE", "ok-1", json!({})))
        .await;
    wait(|| probe_settled(&app, 2), "two dead letters").await;
    assert_eq!(seen_ids(&app, "ok-1"), [fine]);
    // A plugin that traps on an event fails its attempts and lets it die.
    let trapped = poster
        .accept(&probe_event("TEST.TRAP", "x-1", json!({})))
        .await;
    wait(|| probe_settled(&app, 3), "three dead letters").await;

    // The firewall is down for longer than the attempts last: the VM's
    // events die for the firewall plugin.
    panos.set_faults(Faults {
        fail_status: Some(503),
        ..Faults::default()
    });
    let vm = w
        .prism
        .create_vm(NewVm::named("late").powered_on().nic(["10.9.0.1"]))
        .await
        .unwrap()
        .uuid;
    wait(
        || backlog(&app, "paloalto").dead > 0 && settled(&backlog(&app, "paloalto")),
        "the firewall's events to die",
    )
    .await;
    panos.set_faults(Faults::default());

    // What an operator sees.
    let letters = app.ledger.dead_letters(None, None, 100).await.unwrap();
    for d in &letters {
        eprintln!(
            "dead letter: {} event {} {} {} after {} attempt(s): {}",
            d.plugin, d.event.id, d.event.event_type, d.event.entity_uuid, d.attempts, d.reason
        );
    }
    let d = dead_letter(&letters, rejected);
    assert_eq!(
        (d.plugin.as_str(), d.event.event_type.as_str(), d.attempts),
        ("probe", "TEST.REJECT", 1)
    );
    assert_eq!(d.reason, "rejected: probe asked to reject");
    let d = dead_letter(&letters, retried);
    assert_eq!(d.attempts, 2);
    assert_eq!(d.reason, "gave up after 2 attempts: probe asked to retry");
    let d = dead_letter(&letters, trapped);
    assert_eq!(d.attempts, 2);
    assert!(
        d.reason
            .starts_with("gave up after 2 attempts: plugin `probe` trapped in handle"),
        "{}",
        d.reason
    );
    let firewall: Vec<&DeadLetter> = letters.iter().filter(|d| d.plugin == "paloalto").collect();
    assert_eq!(letters.len(), 3 + firewall.len());
    for d in &firewall {
        assert_eq!(d.event.entity_uuid, vm);
        assert_eq!(d.attempts, 2);
        assert!(
            d.reason
                .starts_with("gave up after 2 attempts: firewall answered HTTP 503"),
            "{}",
            d.reason
        );
        assert!(
            d.died_at_ms > 0 && d.event.body.contains(&vm),
            "the letter carries the event: {d:?}"
        );
    }
    assert!(panos.registered().is_empty());

    // The firewall is back: replayed, the VM's events are applied.
    let n = app
        .ledger
        .replay_dead(Some("paloalto"), None)
        .await
        .unwrap();
    assert_eq!(n, firewall.len() as u64);
    wait(
        || backlog(&app, "paloalto").dead == 0 && settled(&backlog(&app, "paloalto")),
        "the replayed events",
    )
    .await;
    assert_eq!(panos.registered(), common::firewall_truth(&w.prism.vms()));
    assert_eq!(panos.registered().len(), 1);

    // Replayed, the retrying event is tried afresh and dies again after two
    // new attempts, not after one.
    let before = app.dispatcher.counters()["probe"].retried;
    let first_death = dead_letter(&letters, retried).died_at_ms;
    assert_eq!(
        app.ledger
            .replay_dead(Some("probe"), Some(&[retried]))
            .await
            .unwrap(),
        1
    );
    wait(
        || app.dispatcher.counters()["probe"].retried == before + 2 && probe_settled(&app, 3),
        "the replayed retry to die again",
    )
    .await;
    let letters = app
        .ledger
        .dead_letters(Some("probe"), None, 100)
        .await
        .unwrap();
    let again = dead_letter(&letters, retried);
    assert_eq!(again.attempts, 2);
    assert!(again.died_at_ms > first_death);

    // Dropped, the rejected one is gone for good.
    assert_eq!(
        app.ledger
            .drop_dead(Some("probe"), Some(&[rejected]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        app.ledger
            .drop_dead(Some("probe"), Some(&[rejected]))
            .await
            .unwrap(),
        0
    );
    let left: BTreeSet<u64> = app
        .ledger
        .dead_letters(None, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|d| d.event.id)
        .collect();
    assert_eq!(left, BTreeSet::from([retried, trapped]));

    // Dead letters outlive a restart, reasons and all.
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    let app = w.start(&setup).await;
    let letters = app.ledger.dead_letters(None, None, 100).await.unwrap();
    assert_eq!(
        letters.iter().map(|d| d.event.id).collect::<BTreeSet<_>>(),
        BTreeSet::from([retried, trapped])
    );
    assert_eq!(
        dead_letter(&letters, retried).reason,
        "gave up after 2 attempts: probe asked to retry"
    );
    assert_eq!(backlog(&app, "probe").dead, 2);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// The fuzzing guest: the probe answers each batch with whatever its
/// events script (`TEST.OUTCOMES`), so the host gets random outcome lists,
/// too many or too few for the batch, reasons up to megabytes and delays up
/// to `u64::MAX` ms. Whatever it answers, every event ends delivered or
/// dead, reasons stay bounded, and the host goes on delivering. The seed is
/// printed; `PRISMHOOK_FUZZ_SEED` replays one, and `PRISMHOOK_FUZZ_EVENTS`
/// (60) makes a longer run (BENCHMARKS.md, Fuzzing).
#[tokio::test]
async fn random_outcome_lists_from_a_fuzzing_guest_lose_nothing_and_stay_bounded() {
    let seed = env_setting("PRISMHOOK_FUZZ_SEED").unwrap_or_else(|| rand::rng().random());
    let events: usize = env_setting("PRISMHOOK_FUZZ_EVENTS").unwrap_or(60);
    eprintln!(
        "outcome fuzzing: {events} events, seed {seed} (PRISMHOOK_FUZZ_SEED={seed} replays it)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let w = world(&["probe"]).await;
    let setup = w
        .host()
        .delivery(r#"retry_initial = "20ms""#)
        .delivery(r#"retry_max = "50ms""#)
        .delivery("max_attempts = 3")
        // A plugin's longest delay is held to this.
        .delivery(r#"max_age = "2s""#)
        // Most calls fail here on purpose; the plugin must not be paused.
        .delivery("quarantine_after = 1000")
        // VM.DELETE: something to register with Prism, which start waits for.
        .plugin(
            "probe",
            &[r#"config = { subscriptions = ["TEST.*", "VM.DELETE"] }"#],
        );
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);

    let mut accepted = Vec::new();
    for i in 0..events {
        let outcomes: Vec<Value> = (0..rng.random_range(0..=3))
            .map(|_| {
                let reason = ["", "x", "é", "\u{1F525}", "<a>&\"\\"][rng.random_range(0..5)];
                let repeat: u64 = match rng.random_range(0..4) {
                    0 => 0,
                    1 => rng.random_range(1..100),
                    2 => 5_000,
                    _ => rng.random_range(100_000..1_000_000),
                };
                let delay: Option<u64> = match rng.random_range(0..4) {
                    0 => None,
                    1 => Some(0),
                    2 => Some(u64::MAX),
                    _ => Some(rng.random_range(1..3_000)),
                };
                let kind = ["done", "retry", "reject"][rng.random_range(0..3)];
                json!({ "kind": kind, "reason": reason, "repeat": repeat, "delay_ms": delay })
            })
            .collect();
        // About three events per entity, so each entity's queue stays short.
        let entity = format!("f-{}", i % (events / 3).max(20));
        let body = probe_event("TEST.OUTCOMES", &entity, json!({ "outcomes": outcomes }));
        accepted.push(poster.accept(&body).await);
    }
    wait_for(
        Duration::from_secs(30 + events as u64 / 10),
        || settled(&backlog(&app, "probe")),
        "every scripted event to settle",
    )
    .await;

    let b = backlog(&app, "probe");
    let c = &app.dispatcher.counters()["probe"];
    eprintln!(
        "{} delivered, {} dead; {} calls, {} of them failed (wrong count, trap, memory)",
        b.delivered, b.dead, c.calls, c.failed_calls
    );
    assert_eq!(b.delivered + b.dead, accepted.len() as u64, "{b:?}");
    let letters = app.ledger.dead_letters(None, None, events).await.unwrap();
    assert_eq!(letters.len() as u64, b.dead);
    for d in &letters {
        assert!(accepted.contains(&d.event.id), "{d:?}");
        // The bound, plus the ledger's own words around the plugin's reason.
        assert!(
            d.reason.len() <= MAX_REASON_BYTES + 64,
            "event {}: a reason of {} bytes",
            d.event.id,
            d.reason.len()
        );
    }

    // And the host still delivers.
    let fine = poster
        .accept(&probe_event("TEST.NOTE", "after-fuzz", json!({})))
        .await;
    wait(
        || seen_ids(&app, "after-fuzz") == [fine],
        "a plain event after the fuzzing",
    )
    .await;
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

// ---------------------------------------------------------------------------
// 4. Backpressure.

#[tokio::test]
async fn over_its_backlog_limit_the_listener_answers_503_with_retry_after_and_keeps_every_202() {
    let w = world(&["probe"]).await;
    // Each event is retried once, 5 s later, then dies: until then it is
    // backlog, and the probe cannot work it off.
    let setup = two_quick_attempts(w.host()).storage("max_backlog = 5");
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);
    let stuck =
        |i: usize| probe_event("TEST.RETRY", &format!("bp-{i}"), json!({"delay_ms": 5_000}));

    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..20 {
        let r = poster.post(&stuck(i)).await.unwrap();
        if r.status() == 503 {
            refusal = Some(r);
            break;
        }
        assert_eq!(r.status(), 202);
        accepted.push(r.json::<Value>().await.unwrap()["id"].as_u64().unwrap());
    }
    let refusal = refusal.expect("the listener never pushed back");
    assert_eq!(accepted, [1, 2, 3, 4, 5], "exactly the limit is accepted");
    let retry_after = retry_after(&refusal);
    assert!(
        (1..=3600).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    let text = refusal.text().await.unwrap();
    assert!(text.contains("backlog is at 5 of its limit 5"), "{text}");

    // Refused notifications are not stored; the accepted ones all are.
    for i in 20..25 {
        assert_eq!(poster.post(&stuck(i)).await.unwrap().status(), 503);
    }
    assert_eq!(app.ledger.stats().undelivered, 5);
    let b = backlog(&app, "probe");
    assert_eq!(b.pending + b.in_flight, 5, "{b:?}");
    let refused: u64 = app
        .stats
        .snapshot()
        .iter()
        .filter(|((_, _, status), _)| *status == 503)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(refused, 6);

    // Once the backlog is worked off (here: the five die), it accepts again,
    // and the next event's id shows nothing was stored in between.
    wait(
        || backlog(&app, "probe").dead == 5 && settled(&backlog(&app, "probe")),
        "the backlog to clear",
    )
    .await;
    let kept: Vec<u64> = app
        .ledger
        .dead_letters(Some("probe"), None, 100)
        .await
        .unwrap()
        .iter()
        .map(|d| d.event.id)
        .collect();
    assert_eq!(kept, accepted, "every 202 is kept");
    let next = poster
        .accept(&probe_event("TEST.NOTE", "bp-after", json!({})))
        .await;
    assert_eq!(next, 6);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

// ---------------------------------------------------------------------------
// 5. Per-entity order with a retrying head.

#[tokio::test]
async fn while_its_nats_cluster_is_down_the_listener_answers_503_and_nothing_answered_202_is_lost()
{
    let nats_dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::single(nats_dir.path()).await.unwrap();
    let w = world(&["probe"]).await;
    let setup = w
        .host()
        .storage(r#"backend = "jetstream""#)
        .storage(&format!(
            "jetstream = {{ servers = {:?}, ack_timeout = \"1s\" }}",
            nats.urls()
        ))
        // VM.* makes Prism worth a webhook; the notes are TEST.*.
        .plugin(
            "probe",
            &[r#"config = { subscriptions = ["VM.*", "TEST.*"] }"#],
        );
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);
    let note = |entity: &str| probe_event("TEST.NOTE", entity, json!({}));

    let before = poster.accept(&note("before")).await;
    // Delivered and its completion stored: a completion still on its way to
    // NATS when it goes down is lost with it, and the event is delivered
    // again (at least once), which is not what this test is about.
    wait(
        || seen_ids(&app, "before") == [before] && app.ledger.stats().undelivered == 0,
        "delivery before the outage, recorded",
    )
    .await;

    nats.nodes[0].kill();
    let during = note("during");
    let refusal = poster.post(&during).await.unwrap();
    assert_eq!(refusal.status(), 503);
    let retry_after = retry_after(&refusal);
    assert!(
        (1..=60).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    let text = refusal.text().await.unwrap();
    assert!(text.contains("unavailable"), "{text}");
    assert!(
        app.ledger.check().await.is_err(),
        "readiness sees the outage"
    );

    // Back: the refused notification, posted again as Prism would, and new
    // ones are stored and delivered; the one before was delivered once.
    nats.nodes[0].restart().await.unwrap();
    let during = loop {
        let r = poster.post(&during).await.unwrap();
        if r.status() == 202 {
            break r.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
        }
        assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = poster.accept(&note("after")).await;
    wait(
        || seen_ids(&app, "during") == [during] && seen_ids(&app, "after") == [after],
        "delivery after the outage",
    )
    .await;
    assert_eq!(seen_ids(&app, "before"), [before]);
    app.ledger.check().await.unwrap();
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// A loopback HTTP target for the probe's `TEST.HTTP` events (`{"url": "<origin>/<path>"}`):
/// it answers 200 to each request once `before_answering(path, nth)` is done (`nth`: 1 for the
/// path's first request). Returns its origin and the paths asked for, in order.
async fn probe_target<F, Fut>(before_answering: F) -> (String, Arc<Mutex<Vec<String>>>)
where
    F: Fn(String, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", target.local_addr().unwrap());
    let hits = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = hits.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = target.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                    .await
                    .unwrap();
                assert!(n > 0, "the plugin's request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            let path = String::from_utf8_lossy(&request)
                .split(' ')
                .nth(1)
                .unwrap()
                .to_owned();
            let nth = {
                let mut hits = seen.lock().unwrap();
                hits.push(path.clone());
                hits.iter().filter(|p| **p == path).count()
            };
            before_answering(path, nth).await;
            let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
            // The plugin may have given up waiting.
            let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, reply.as_bytes()).await;
        }
    });
    (origin, hits)
}

/// The probe on a host whose ledger is `nats`, allowed to send to `origin`.
fn probe_on_jetstream(w: &World, nats: &Nats, origin: &str) -> HostConfig {
    w.host()
        .storage(r#"backend = "jetstream""#)
        .storage(&format!("jetstream = {{ servers = {:?} }}", nats.urls()))
        .plugin(
            "probe",
            &[
                r#"config = { subscriptions = ["VM.*", "TEST.*"] }"#,
                &format!(r#"allow = ["{origin}"]"#),
            ],
        )
}

/// A notification within the listener's cap but larger than one message of the NATS servers
/// (their `max_payload`, 1 MiB here) would be refused each time it was sent: it is answered 413
/// with the limit named, not 503 for ever, and the ledger goes on storing the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_larger_than_a_nats_message_is_refused_413_on_jetstream_and_the_next_stored()
{
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = Nats::single(nats_dir.path()).await.unwrap();
    let w = world(&["probe"]).await;
    let setup = probe_on_jetstream(&w, &nats, "http://127.0.0.1:1")
        .listener(&format!("max_body_bytes = {}", 4 << 20));
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);

    // Quotes are escaped in the stored record: 700 KiB of them take 1.4 MiB.
    let padding = "\"".repeat(700 << 10);
    let large = probe_event("TEST.LARGE", "large", json!({ "padding": padding }));
    assert!(large.to_string().len() < 4 << 20);
    let refused = poster.post(&large).await.unwrap();
    let status = refused.status();
    let text = refused.text().await.unwrap();
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains("max_payload") && text.contains("bytes"),
        "the limit is named: {text}"
    );

    poster
        .accept(&probe_event("TEST.SMALL", "small", json!({})))
        .await;
    wait(
        || backlog(&app, "probe").delivered == 1,
        "the next notification delivered",
    )
    .await;
    let b = backlog(&app, "probe");
    assert!(
        settled(&b) && b.dead == 0,
        "only the small one was stored: {b:?}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// Hosts sharing a JetStream ledger race now and then for a kv key: when another host writes a
/// key a call read before the call's writes are stored, the writes are refused and the call is
/// made again once this host reads the winner's write. That costs no attempt and is not the
/// plugin's failure: no event is tried alone, nothing is quarantined (after one failed call,
/// here), and the other host's write stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_kv_writes_lose_a_race_is_made_again_at_no_attempts_cost_and_no_quarantine() {
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = Nats::single(nats_dir.path()).await.unwrap();
    // The second event's request is where the other host writes the record the
    // call has read (the probe appends each event to `seen/<cluster>/<entity>`).
    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let record = format!("prismhook_kv.p{}.k{}", hex("probe"), hex("seen/lab/race"));
    let (origin, hits) = probe_target(move |path, nth| {
        let (js, record) = (js.clone(), record.clone());
        async move {
            if path == "/second" && nth == 1 {
                js.publish(record, "0:0:OTHER.HOST".into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    })
    .await;

    let w = world(&["probe"]).await;
    let setup = probe_on_jetstream(&w, &nats, &origin)
        // Both events in one batch (posted well within the window, even on
        // a loaded machine); one failed call would quarantine.
        .delivery(r#"batch_window = "1s""#)
        .delivery("quarantine_after = 1");
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);
    let get = |path: &str| {
        probe_event(
            "TEST.HTTP",
            "race",
            json!({"url": format!("{origin}/{path}")}),
        )
    };
    let first = poster.accept(&get("first")).await;
    let second = poster.accept(&get("second")).await;
    wait(
        || seen(&app.runtime.kv().dump("probe").unwrap(), "race").len() == 3,
        "the race's events to be recorded",
    )
    .await;

    assert_eq!(
        seen(&app.runtime.kv().dump("probe").unwrap(), "race"),
        [
            (0, 0, "OTHER.HOST".to_owned()),
            (first, 1, "TEST.HTTP".to_owned()),
            (second, 1, "TEST.HTTP".to_owned()),
        ],
        "the other host's write stands, and the batch came again whole, at its first attempt"
    );
    assert_eq!(
        *hits.lock().unwrap(),
        ["/first", "/second", "/first", "/second"],
        "no event tried alone"
    );
    let counters = &app.dispatcher.counters()["probe"];
    assert_eq!(
        (
            counters.kv_conflicts,
            counters.quarantines,
            counters.retried
        ),
        (1, 0, 0),
        "{counters:?}"
    );
    assert!(app.dispatcher.quarantined().is_empty());
    let metrics = common::metrics(&app).await;
    assert!(
        metrics.contains(r#"prismhook_plugin_kv_conflicts_total{plugin="probe"} 1"#),
        "{metrics}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// While the ledger cannot record a batch's outcomes (here a JetStream stream with no room
/// left; a NATS leader election does the same for seconds), the batch is pending again, and the
/// worker waits before it claims again: handed back at once, the plugin would do its work again
/// and again for nothing. Once the ledger records again, the event is delivered, at its first
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_outcomes_cannot_be_recorded_is_not_handed_to_the_plugin_again_at_once() {
    while_a_stream_takes_no_writes("PRISMHOOK").await
}

/// While the plugins' kv store does not take a call's writes (here its JetStream stream with no
/// room left; a NATS leader election does the same for seconds), that is the host's failure,
/// not the events': they wait for the store, at no cost to their attempts, and the worker
/// waits before it claims again. Counted as attempts, an election longer than the retries'
/// backoff made dead letters of healthy events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_kv_writes_the_store_does_not_take_costs_no_attempt_and_is_not_made_again_at_once(
) {
    while_a_stream_takes_no_writes("PRISMHOOK_KV").await
}

/// Fills `stream` while the probe's first call is in its request, for 3 s: the
/// call is made again after a pause (a second, then two), not in a hot loop,
/// and never counted as an attempt; once the stream has room, the event is
/// delivered.
async fn while_a_stream_takes_no_writes(stream: &str) {
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = Nats::single(nats_dir.path()).await.unwrap();
    // The first call waits in its request until the stream is full.
    let (full_tx, full) = tokio::sync::watch::channel(false);
    let (origin, hits) = probe_target(move |_, nth| {
        let mut full = full.clone();
        async move {
            if nth == 1 {
                full.wait_for(|f| *f).await.unwrap();
            }
        }
    })
    .await;
    let w = world(&["probe"]).await;
    let setup = probe_on_jetstream(&w, &nats, &origin);
    let app = w.start(&setup).await;
    // The reconcile at start writes the kv stream's first message: with
    // none, `max_messages = 0` would mean no limit.
    common::registered_and_reconciled(&app).await;
    let poster = Poster::new(app.listener_addr);
    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let mut stream = js.get_stream(stream).await.unwrap();

    let url = format!("{origin}/unstored");
    let id = poster
        .accept(&probe_event("TEST.HTTP", "unstored", json!({ "url": url })))
        .await;
    let calls = || hits.lock().unwrap().len();
    wait(|| calls() == 1, "the first call").await;
    let info = stream.info().await.unwrap().clone();
    assert!(
        info.state.messages > 0,
        "{} is empty: it cannot be filled",
        info.config.name
    );
    let (unlimited, mut full) = (info.config.clone(), info.config);
    full.max_messages = i64::try_from(info.state.messages).unwrap();
    // Refused, not stored by discarding the oldest (the kv stream's way).
    full.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(full).await.unwrap();
    full_tx.send_replace(true);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let made = calls();
    assert!(
        (2..=6).contains(&made),
        "{made} calls in {window:?} while the writes could not be stored: \
         about one a second is a retry, many more a hot loop"
    );

    js.update_stream(unlimited).await.unwrap();
    wait(
        || backlog(&app, "probe").delivered == 1,
        "delivery once the stream takes writes again",
    )
    .await;
    let seen = seen(&app.runtime.kv().dump("probe").unwrap(), "unstored");
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|&(seen, attempt, _)| (seen, attempt) == (id, 1)),
        "every call was the event's first attempt: {seen:?}"
    );
    let counters = &app.dispatcher.counters()["probe"];
    assert_eq!(
        (counters.retried, counters.quarantines),
        (0, 0),
        "{counters:?}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_retrying_event_holds_back_later_events_of_its_entity_only() {
    let w = world(&["probe"]).await;
    let setup = two_quick_attempts(w.host());
    let app = w.start(&setup).await;
    let poster = Poster::new(app.listener_addr);

    // A's first event fails and will be tried again in 4 s (then die).
    let head = poster
        .accept(&probe_event("TEST.RETRY", "A", json!({"delay_ms": 4_000})))
        .await;
    wait(
        || backlog(&app, "probe").retrying == 1,
        "A's head to be retrying",
    )
    .await;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        a.push(
            poster
                .accept(&probe_event("TEST.NOTE", "A", json!({})))
                .await,
        );
        b.push(
            poster
                .accept(&probe_event("TEST.NOTE", "B", json!({})))
                .await,
        );
    }

    // B proceeds; A waits behind its head.
    wait(
        || seen_ids(&app, "B").len() == 3 && backlog(&app, "probe").delivered == 3,
        "B's events",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen_ids(&app, "B"), b);
    assert!(
        seen_ids(&app, "A").is_empty(),
        "A's later events overtook its retrying head"
    );
    let held = backlog(&app, "probe");
    assert_eq!(
        (held.pending, held.retrying, held.in_flight),
        (4, 1, 0),
        "{held:?}"
    );

    // Once the head is settled (dead here), A's events follow, in order.
    wait(
        || settled(&backlog(&app, "probe")),
        "A's events after its head",
    )
    .await;
    assert_eq!(seen_ids(&app, "A"), a);
    assert_eq!(
        app.ledger
            .dead_letters(Some("probe"), None, 10)
            .await
            .unwrap()
            .iter()
            .map(|d| d.event.id)
            .collect::<Vec<_>>(),
        [head]
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn isolating_a_failed_batch_stops_after_two_deadlines_and_the_rest_share_its_failure() {
    let w = world(&["probe"]).await;
    // One attempt each: every outcome is a dead letter with its reason.
    let setup = w
        .host()
        .delivery("max_attempts = 1")
        .plugin("probe", &["limits = { deadline_ms = 300 }"]);
    // Four events that each take the whole deadline, as with a firewall
    // that drops traffic: one call for the batch, then one alone (a second
    // would start with less than its deadline left of the budget).
    let bodies: Vec<Value> = ["A", "B", "C", "D"]
        .iter()
        .map(|entity| probe_event("TEST.LOOP", entity, json!({})))
        .collect();
    append_while_stopped(&w.data(), &bodies).await;
    let app = w.start(&setup).await;
    wait(|| backlog(&app, "probe").dead == 4, "the batch to settle").await;
    let letters = app
        .ledger
        .dead_letters(Some("probe"), None, 10)
        .await
        .unwrap();
    let untried: Vec<&str> = letters
        .iter()
        .map(|d| d.reason.as_str())
        .filter(|r| r.contains("not tried alone: isolating its batch's failure took 600ms"))
        .collect();
    assert_eq!(untried.len(), 3, "{letters:#?}");
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// A call still running past the shutdown's deadline is stopped, not left
/// behind holding the runtime: shutdown ends without waiting for the call
/// (it would take a minute), the same data directory opens again, and the
/// event is delivered again.
#[tokio::test]
async fn a_call_that_outlives_the_shutdown_deadline_is_stopped_and_its_event_comes_back() {
    let w = world(&["probe"]).await;
    let setup = w
        .host()
        .plugin("probe", &["limits = { deadline_ms = 60000 }"]);
    append_while_stopped(&w.data(), &[probe_event("TEST.LOOP", "A", json!({}))]).await;
    let app = w.start(&setup).await;
    wait(
        || backlog(&app, "probe").in_flight == 1,
        "the call to start",
    )
    .await;
    // A bound on the wait, far from the call's minute: not a timing test.
    tokio::time::timeout(
        Duration::from_secs(20),
        app.shutdown(false, Duration::from_millis(200)),
    )
    .await
    .expect("shutdown waited for the call")
    .unwrap();

    let app = w.start(&setup).await;
    wait(
        || backlog(&app, "probe").in_flight == 1,
        "the event to be delivered again",
    )
    .await;
    app.shutdown(false, Duration::from_millis(200))
        .await
        .unwrap();
}

/// Isolating a failed batch hands an entity's later event to the plugin
/// only after its earlier one went through: one answered `retry` holds it
/// back, as a failed call does, so the plugin never sees it first.
#[tokio::test]
async fn isolating_holds_an_entitys_later_events_behind_one_that_asked_for_a_retry() {
    let w = world(&["probe"]).await;
    let setup = w.host();
    // Waiting in the ledger at start, they go out in one call, which X's
    // trap fails: each is then tried alone.
    let bodies = [
        probe_event("TEST.TRAP", "X", json!({})),
        probe_event("TEST.RETRY", "A", json!({"delay_ms": 60_000})),
        probe_event("TEST.NOTE", "A", json!({})),
    ];
    append_while_stopped(&w.data(), &bodies).await;
    let app = w.start(&setup).await;
    wait(
        || {
            let b = backlog(&app, "probe");
            b.retrying == 2 && b.in_flight == 0
        },
        "the batch to be isolated",
    )
    .await;
    assert!(
        seen_ids(&app, "A").is_empty(),
        "A's later event reached the plugin before its head"
    );
    assert_eq!(
        backlog(&app, "probe").pending,
        3,
        "{:?}",
        backlog(&app, "probe")
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn coalescing_hands_over_each_entitys_newest_event_and_never_merges_events_without_one() {
    let w = world(&["probe"]).await;
    let setup = w.host().plugin("probe", &["coalesce = true"]);
    // Waiting in the ledger at start, all four go out in one call. Prism's
    // notifications always name their VM; an event source need not.
    let events = ["A", "", "A", ""].map(|entity| NewEvent {
        cluster: "lab".into(),
        event_type: "TEST.NOTE".into(),
        entity_kind: "test".into(),
        entity_uuid: entity.into(),
        dedupe_key: None,
        received_at_ms: now_ms(),
        body: "{}".into(),
        vm: None,
    });
    let [_, lone_1, newest, lone_2] = store_while_stopped(&w.data(), events).await[..] else {
        unreachable!()
    };
    let app = w.start(&setup).await;
    wait(|| settled(&backlog(&app, "probe")), "the batch to settle").await;
    assert_eq!(seen_ids(&app, "A"), [newest], "A's newest stands for both");
    assert_eq!(
        seen_ids(&app, ""),
        [lone_1, lone_2],
        "events without an entity are each handed over"
    );
    assert_eq!(backlog(&app, "probe").delivered, 4, "all four are done");
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// The newest event stands for its VM: when it fails, the older events it
/// was handed over for are done, not retried with it until they die
/// without the plugin ever seeing them.
#[tokio::test]
async fn with_coalescing_only_the_newest_event_is_retried_and_dies() {
    let w = world(&["probe"]).await;
    let setup = two_quick_attempts(w.host()).plugin("probe", &["coalesce = true"]);
    let bodies = [
        probe_event("TEST.NOTE", "A", json!({})),
        probe_event("TEST.NOTE", "A", json!({})),
        probe_event("TEST.RETRY", "A", json!({"delay_ms": 50})),
    ];
    let [older_1, older_2, newest] = append_while_stopped(&w.data(), &bodies).await[..] else {
        unreachable!()
    };
    let app = w.start(&setup).await;
    wait(|| settled(&backlog(&app, "probe")), "A to settle").await;
    let dead: Vec<u64> = app
        .ledger
        .dead_letters(Some("probe"), None, 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.event.id)
        .collect();
    assert_eq!(dead, [newest], "the older ones were never handed over");
    assert_eq!(backlog(&app, "probe").delivered, 2);
    assert!(![older_1, older_2].iter().any(|id| dead.contains(id)));
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_retry_inside_a_batch_sends_the_entitys_later_events_again_after_it() {
    let w = world(&["probe"]).await;
    let setup = two_quick_attempts(w.host());
    // Waiting in the ledger at start, A's three events go out in one call.
    let bodies = [
        probe_event("TEST.NOTE", "A", json!({})),
        probe_event("TEST.RETRY", "A", json!({"delay_ms": 3_000})),
        probe_event("TEST.NOTE", "A", json!({})),
    ];
    let [before, head, after] = append_while_stopped(&w.data(), &bodies).await[..] else {
        unreachable!()
    };
    let app = w.start(&setup).await;

    // The probe handled `after` in the same call its head failed in, but
    // `after` must not count as delivered before the head is settled.
    wait(
        || backlog(&app, "probe").retrying == 1,
        "the head to be retrying",
    )
    .await;
    assert_eq!(
        seen_ids(&app, "A"),
        [before, after],
        "one call with all three"
    );
    let held = backlog(&app, "probe");
    assert_eq!(
        (held.pending, held.retrying, held.delivered),
        (2, 1, 1),
        "`after` waits behind its head: {held:?}"
    );

    // The head dies after its second attempt; `after` is delivered again,
    // after it.
    wait(|| settled(&backlog(&app, "probe")), "A to settle").await;
    assert_eq!(seen_ids(&app, "A"), [before, after, after]);
    assert_eq!(
        app.ledger
            .dead_letters(Some("probe"), None, 10)
            .await
            .unwrap()[0]
            .event
            .id,
        head
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// `limits.kv_mib` bounds what a plugin keeps in kv over all its calls (it
/// shares the disk with the ledger). A call that would pass it stores none
/// of its writes; its event is retried with why, then kept as a dead
/// letter, and once the operator raises the limit (the plugin's settings
/// file), replaying it loses nothing.
#[tokio::test]
async fn a_plugin_over_its_kv_limit_keeps_its_events_until_the_limit_is_raised() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    common::setup::install(&plugins, &["probe"]);
    std::fs::write(plugins.join("probe.toml"), "limits = { kv_mib = 1 }").unwrap();
    let host = HostConfig::new(dir.path())
        .dirs(&dir.path().join("data"), &plugins)
        .watch(true)
        .fast_retries()
        .delivery("max_attempts = 2");
    let app = App::start(host.config()).await.unwrap();
    let blob = || json!({ "bytes": 700_000 }).to_string();
    let kv_of = |app: &App| app.runtime.kv().dump("probe").unwrap();

    let first = common::append_body(&app, 1, "vm-1", "TEST.KV", blob()).await;
    common::drained(&app).await;
    let second = common::append_body(&app, 2, "vm-2", "TEST.KV", blob()).await;
    wait_for(
        Duration::from_secs(30),
        || backlog(&app, "probe").dead == 1,
        "the second event to die",
    )
    .await;
    let letters = app.ledger.dead_letters(Some("probe"), None, 10).await;
    let letters = letters.unwrap();
    assert_eq!(letters[0].event.id, second);
    // Refused at the `set` that would pass the limit, so the plugin could
    // say which event's record it could not keep.
    let reason = &letters[0].reason;
    assert!(
        reason.starts_with("rejected: kv set failed: the plugin's kv would hold ")
            && reason.ends_with(" bytes, over its limit of 1048576 (`limits.kv_mib`)"),
        "{reason}"
    );
    let kv = kv_of(&app);
    assert!(kv.contains_key(&format!("blob/{first}")), "{:?}", kv.keys());
    assert!(
        !kv.contains_key(&format!("blob/{second}")),
        "none of it stored"
    );

    std::fs::write(plugins.join("probe.toml"), "limits = { kv_mib = 4 }").unwrap();
    wait_for(
        Duration::from_secs(20),
        || {
            app.registry
                .get("probe")
                .and_then(|e| e.plugin)
                .is_some_and(|p| p.limits().kv_bytes == 4 << 20)
        },
        "the plugin to load with the new limit",
    )
    .await;
    assert_eq!(
        app.ledger.replay_dead(Some("probe"), None).await.unwrap(),
        1
    );
    common::drained(&app).await;
    assert!(kv_of(&app).contains_key(&format!("blob/{second}")));
    assert_eq!(backlog(&app, "probe").dead, 0);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}
