//! The ledger's promises, as one behaviour suite that every backend runs.
//!
//! Each case is a function of a [`Harness`], which opens (and reopens) ledgers of one backend on
//! storage that lives as long as the harness; the `backends!` macro at the end turns every case
//! into one `#[tokio::test]` per backend. A new backend adds a harness and a line to the macro,
//! and is then held to exactly the same behaviour as the others.

use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;
use crate::clock::now_ms;
use crate::event::Vm;

const MINUTE_MS: u64 = 60_000;

/// What a case asks of a backend: the limits and policies every backend honours.
#[derive(Debug, Clone)]
pub(super) struct Policy {
    pub dedupe_window: Duration,
    pub max_backlog: u64,
    pub retention: Duration,
    pub retry: RetryPolicy,
}

/// A retry time far enough off that what a test checks right after a
/// `complete` (backlog, an empty claim) comes before it even on a machine
/// loaded by a parallel build: 100 ms once was not, against JetStream.
const NOT_YET: Duration = Duration::from_secs(1);

/// The defaults, with retries that do not jitter (so backoff can be checked).
fn policy() -> Policy {
    Policy {
        dedupe_window: Duration::from_secs(10 * 60),
        max_backlog: 1_000_000,
        retention: Duration::from_secs(24 * 60 * 60),
        retry: RetryPolicy {
            jitter: Jitter::None,
            ..RetryPolicy::default()
        },
    }
}

/// One backend under test.
pub(super) trait Harness {
    /// A ledger on this harness's storage; what an earlier ledger (now dropped or closed) stored
    /// is there again.
    fn open(&self, policy: &Policy) -> SharedLedger;
}

/// The embedded backend: a redb file in a temporary directory.
struct Redb(TempDir);

impl Harness for Redb {
    fn open(&self, p: &Policy) -> SharedLedger {
        let opts = LedgerOptions {
            dedupe_window: p.dedupe_window,
            max_backlog: p.max_backlog,
            retention: p.retention,
            retry: p.retry.clone(),
            ..LedgerOptions::new(self.0.path().join("data").join("ledger.redb"))
        };
        Arc::new(RedbLedger::open(opts).expect("ledger opens"))
    }
}

fn redb() -> Redb {
    Redb(TempDir::new().unwrap())
}

/// The JetStream backend: a real single-node `nats-server` for the harness's lifetime; every
/// open is a new connection and a new fold of the same stream. Without the event cache, every
/// claim reads its events back from the stream, the path a cold or failed-over host takes.
struct JetStream {
    nats: prismhook_sim::nats::Nats,
    cache_events: usize,
    _dir: TempDir,
}

impl Harness for JetStream {
    fn open(&self, p: &Policy) -> SharedLedger {
        let opts = JetStreamOptions {
            dedupe_window: p.dedupe_window,
            max_backlog: p.max_backlog,
            retention: p.retention,
            retry: p.retry.clone(),
            cache_events: self.cache_events,
            ..JetStreamOptions::new(self.nats.urls())
        };
        let ledger = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(JetStreamLedger::open(opts))
        });
        Arc::new(ledger.expect("ledger opens"))
    }
}

async fn jetstream(cache_events: usize) -> JetStream {
    let dir = TempDir::new().unwrap();
    let nats = prismhook_sim::nats::Nats::single(dir.path())
        .await
        .expect("nats-server starts");
    JetStream {
        nats,
        cache_events,
        _dir: dir,
    }
}

fn vm(uuid: &str) -> Vm {
    Vm {
        uuid: uuid.into(),
        power_state: Some("ON".into()),
        categories: vec![("AppTier".into(), "Web".into())],
        ..Vm::default()
    }
}

fn event(entity: &str, received_at_ms: u64) -> NewEvent {
    NewEvent {
        cluster: "c1".into(),
        event_type: "VM.UPDATE".into(),
        entity_kind: "vm".into(),
        entity_uuid: entity.into(),
        dedupe_key: None,
        received_at_ms,
        body: format!(r#"{{"entity":"{entity}","at":{received_at_ms}}}"#),
        vm: Some(vm(entity)),
    }
}

fn plugins(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

async fn append(ledger: &SharedLedger, entity: &str, to: &[&str]) -> u64 {
    append_at(ledger, entity, now_ms(), to).await
}

async fn append_at(ledger: &SharedLedger, entity: &str, received_at_ms: u64, to: &[&str]) -> u64 {
    match ledger
        .append(event(entity, received_at_ms), plugins(to))
        .await
        .expect("append succeeds")
    {
        Appended::Stored { id, .. } => id,
        other => panic!("expected a stored event, got {other:?}"),
    }
}

/// A subscription to every event type.
fn every() -> [String; 1] {
    ["*".to_owned()]
}

fn ids(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(|d| d.event.id).collect()
}

async fn complete_all(
    ledger: &SharedLedger,
    plugin: &str,
    deliveries: &[Delivery],
    outcome: Outcome,
) {
    let results = deliveries
        .iter()
        .map(|d| (d.event.id, outcome.clone()))
        .collect();
    ledger
        .complete(plugin, results)
        .await
        .expect("complete succeeds");
}

fn retry(reason: &str) -> Outcome {
    Outcome::Retry {
        reason: reason.into(),
        delay: None,
    }
}

fn backlog_of(ledger: &SharedLedger, plugin: &str) -> PluginBacklog {
    ledger
        .backlog()
        .unwrap()
        .into_iter()
        .find(|b| b.plugin == plugin)
        .unwrap_or_else(|| panic!("no backlog for {plugin}"))
}

/// Waits until `plugin` has something due, for at most `limit`.
async fn until_due(ledger: &SharedLedger, plugin: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    let due = ledger.next_due(plugin).expect("something is pending");
    assert!(due <= deadline, "due {:?} from now", due - Instant::now());
    tokio::time::sleep_until(due.into()).await;
    // Due times have millisecond resolution.
    tokio::time::sleep(Duration::from_millis(2)).await;
}

/// `futures::join_all` without the dependency: spawn and await in order.
pub(super) async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("task completes"));
    }
    out
}

/// What every backend does with three events of `plugin` whose middle one it cannot read: a
/// claim delivers the other two, and the middle one is a dead letter whose reason names it.
pub(super) async fn the_unreadable_middle_event_is_a_dead_letter(
    ledger: &dyn Ledger,
    plugin: &str,
    ids: &[u64],
) {
    let claimed = ledger
        .claim(plugin, 10)
        .await
        .expect("the claim goes on past the unreadable event");
    let claimed: Vec<u64> = claimed.iter().map(|d| d.event.id).collect();
    assert_eq!(claimed, [ids[0], ids[2]]);
    let letters = ledger.dead_letters(Some(plugin), None, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event.id, ids[1]);
    assert_eq!(letters[0].event.entity_uuid, "", "nothing of it is made up");
    assert!(
        letters[0]
            .reason
            .starts_with("the host cannot read this event")
            && letters[0].reason.contains(&format!("event {}", ids[1])),
        "the reason is the host's and says which event: {}",
        letters[0].reason
    );
    assert_eq!(letters[0].attempts, 0, "the plugin never had it");
    let backlog = ledger.backlog().unwrap();
    let backlog = backlog.iter().find(|b| b.plugin == plugin).unwrap();
    assert_eq!((backlog.in_flight, backlog.dead), (2, 1), "{backlog:?}");
}

async fn an_appended_event_survives_reopening_with_its_content(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let id = append_at(&ledger, "vm-1", 1234, &["fw"]).await;
    drop(ledger);

    let ledger = h.open(&policy());
    let claimed = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, 1);
    assert_eq!(
        claimed[0].event,
        StoredEvent {
            id,
            cluster: "c1".into(),
            event_type: "VM.UPDATE".into(),
            entity_kind: "vm".into(),
            entity_uuid: "vm-1".into(),
            received_at_ms: 1234,
            body: r#"{"entity":"vm-1","at":1234}"#.into(),
            vm: Some(vm("vm-1")),
        }
    );
    ledger.close().await.unwrap();
}

async fn event_ids_keep_increasing_across_reopens_even_after_everything_is_pruned(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let first = append_at(&ledger, "vm-1", 1, &[]).await;
    assert_eq!(ledger.prune().await.unwrap(), 1);
    drop(ledger);
    let ledger = h.open(&policy());
    let second = append(&ledger, "vm-1", &[]).await;
    assert!(second > first, "{second} after {first}");
}

async fn in_flight_deliveries_are_pending_again_after_a_crash(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let a = append(&ledger, "vm-1", &["fw"]).await;
    let b = append(&ledger, "vm-2", &["fw"]).await;
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [a, b]);
    assert_eq!(backlog_of(&ledger, "fw").in_flight, 2);
    drop(ledger); // no close: the process "dies" with both in flight

    let ledger = h.open(&policy());
    assert_eq!(ledger.stats().undelivered, 2);
    let again = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&again), [a, b]);
    assert!(
        again.iter().all(|d| d.attempt == 1),
        "a crash is not a failed attempt"
    );
}

async fn each_subscribed_plugin_gets_its_own_delivery(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let appended = ledger
        .append(event("vm-1", now_ms()), plugins(&["fw", "siem", "fw"]))
        .await
        .unwrap();
    let Appended::Stored { id, deliveries } = appended else {
        panic!("{appended:?}")
    };
    assert_eq!(deliveries, 2, "duplicate plugin names count once");
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [id]);
    assert_eq!(ids(&ledger.claim("siem", 10).await.unwrap()), [id]);
    assert!(ledger.claim("lb", 10).await.unwrap().is_empty());
    assert_eq!(ledger.stats().undelivered, 2);
}

async fn a_batch_mixes_entities_in_arrival_order_and_holds_consecutive_events_of_one(
    h: &dyn Harness,
) {
    let ledger = h.open(&policy());
    let mut expected = Vec::new();
    for entity in ["a", "b", "a", "c", "a", "b"] {
        expected.push(append(&ledger, entity, &["fw"]).await);
    }
    let batch = ledger.claim("fw", 256).await.unwrap();
    assert_eq!(ids(&batch), expected);
}

async fn a_claim_returns_at_most_the_batch_size(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let mut all = Vec::new();
    for n in 0..10 {
        all.push(append(&ledger, &format!("vm-{n}"), &["fw"]).await);
    }
    let first = ledger.claim("fw", 4).await.unwrap();
    let second = ledger.claim("fw", 4).await.unwrap();
    let third = ledger.claim("fw", 4).await.unwrap();
    assert_eq!(ids(&first), all[0..4]);
    assert_eq!(ids(&second), all[4..8]);
    assert_eq!(ids(&third), all[8..10]);
    assert!(ledger.claim("fw", 0).await.unwrap().is_empty());
}

async fn an_entity_with_a_batch_in_flight_gets_nothing_more_until_it_completes(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let a1 = append(&ledger, "a", &["fw"]).await;
    let b1 = append(&ledger, "b", &["fw"]).await;
    let first = ledger.claim("fw", 1).await.unwrap();
    assert_eq!(ids(&first), [a1]);
    let a2 = append(&ledger, "a", &["fw"]).await;
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [b1]);
    complete_all(&ledger, "fw", &first, Outcome::Done).await;
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [a2]);
}

async fn a_retrying_event_holds_back_later_events_of_its_entity_only(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = NOT_YET;
    let ledger = h.open(&opts);
    let a1 = append(&ledger, "a", &["fw"]).await;
    let b1 = append(&ledger, "b", &["fw"]).await;
    let a2 = append(&ledger, "a", &["fw"]).await;
    let b2 = append(&ledger, "b", &["fw"]).await;

    let first = ledger.claim("fw", 1).await.unwrap();
    assert_eq!(ids(&first), [a1]);
    complete_all(&ledger, "fw", &first, retry("firewall timed out")).await;

    // Entity b flows on; a waits for its retry time, a2 behind a1.
    let others = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&others), [b1, b2]);
    complete_all(&ledger, "fw", &others, Outcome::Done).await;
    assert!(ledger.claim("fw", 10).await.unwrap().is_empty());
    assert_eq!(backlog_of(&ledger, "fw").retrying, 1);

    until_due(&ledger, "fw", Duration::from_secs(2)).await;
    let again = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&again), [a1, a2]);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(again[1].attempt, 1);
}

async fn a_done_behind_a_retry_in_the_same_batch_comes_again_after_it(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = NOT_YET;
    let ledger = h.open(&opts);
    let a1 = append(&ledger, "a", &["fw"]).await;
    let a2 = append(&ledger, "a", &["fw"]).await;
    let b1 = append(&ledger, "b", &["fw"]).await;
    let a3 = append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&batch), [a1, a2, b1, a3]);

    // a1 is done, a2 fails, a3 and b1 are done: a3 must not overtake a2.
    let results = vec![
        (a1, Outcome::Done),
        (a2, retry("firewall busy")),
        (b1, Outcome::Done),
        (a3, Outcome::Done),
    ];
    ledger.complete("fw", results).await.unwrap();
    let b = backlog_of(&ledger, "fw");
    assert_eq!(
        (b.delivered, b.pending, b.retrying, b.in_flight),
        (2, 2, 1, 0)
    );
    assert!(
        ledger.claim("fw", 10).await.unwrap().is_empty(),
        "a waits for a2's retry time"
    );

    until_due(&ledger, "fw", Duration::from_secs(2)).await;
    let again = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&again), [a2, a3]);
    assert_eq!(
        (again[0].attempt, again[1].attempt),
        (2, 1),
        "held back, a3 used no attempt"
    );
}

async fn a_done_behind_a_retry_that_dies_is_delivered(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.max_attempts = 1;
    let ledger = h.open(&opts);
    let a1 = append(&ledger, "a", &["fw"]).await;
    let a2 = append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&batch), [a1, a2]);
    ledger
        .complete("fw", vec![(a1, retry("no")), (a2, Outcome::Done)])
        .await
        .unwrap();
    let b = backlog_of(&ledger, "fw");
    assert_eq!((b.delivered, b.dead, b.pending), (1, 1, 0));
}

async fn retry_backoff_doubles_and_honours_a_longer_plugin_delay(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = Duration::from_millis(200);
    let ledger = h.open(&opts);
    append(&ledger, "a", &["fw"]).await;

    // The retry time is the backoff after the moment `complete` stored the
    // outcome, somewhere between the call and its return: checked against
    // both ends, so a slow call on a loaded machine is no failure. (Due
    // times have millisecond resolution.)
    let ms = Duration::from_millis(5);
    for (attempt, expected_ms) in (1..=3).zip([200u64, 400, 800]) {
        let batch = ledger.claim("fw", 1).await.unwrap();
        assert_eq!(batch[0].attempt, attempt);
        let before = Instant::now();
        complete_all(&ledger, "fw", &batch, retry("busy")).await;
        let after = Instant::now();
        let due = ledger.next_due("fw").unwrap();
        let expected = Duration::from_millis(expected_ms);
        assert!(
            due + ms >= before + expected && due <= after + expected + ms,
            "attempt {attempt}: due {:?} after the call began, {:?} after it returned; expected {expected:?}",
            due.saturating_duration_since(before),
            due.saturating_duration_since(after),
        );
        until_due(&ledger, "fw", Duration::from_secs(2)).await;
    }

    let batch = ledger.claim("fw", 1).await.unwrap();
    let before = Instant::now();
    let results = vec![(
        batch[0].event.id,
        Outcome::Retry {
            reason: "rate limited".into(),
            delay: Some(Duration::from_secs(30)),
        },
    )];
    ledger.complete("fw", results).await.unwrap();
    let wait = ledger.next_due("fw").unwrap() - before;
    assert!(wait >= Duration::from_secs(29), "{wait:?}");
    assert!(wait <= Duration::from_secs(31), "{wait:?}");
}

async fn a_plugin_delay_of_u64_max_ms_is_held_to_the_max_age(h: &dyn Harness) {
    let opts = policy();
    let ledger = h.open(&opts);
    append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 1).await.unwrap();
    let before = Instant::now();
    let forever = Outcome::Retry {
        reason: "later".into(),
        delay: Some(Duration::from_millis(u64::MAX)),
    };
    complete_all(&ledger, "fw", &batch, forever).await;
    let wait = ledger.next_due("fw").expect("still pending") - before;
    let max_age = opts.retry.max_age;
    assert!(wait <= max_age + Duration::from_secs(1), "{wait:?}");
    assert!(wait + Duration::from_secs(1) >= max_age, "{wait:?}");
    assert_eq!(backlog_of(&ledger, "fw").pending, 1);
}

async fn retry_state_survives_reopening(h: &dyn Harness) {
    let mut opts = policy();
    // Longer than reopening takes: a JetStream host restarted under its name first makes sure
    // the process it replaces is gone (about a second and a half).
    opts.retry.initial = Duration::from_secs(3);
    let ledger = h.open(&opts);
    append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 1).await.unwrap();
    complete_all(&ledger, "fw", &batch, retry("down")).await;
    drop(ledger);

    let ledger = h.open(&opts);
    assert!(
        ledger.claim("fw", 1).await.unwrap().is_empty(),
        "still waiting"
    );
    until_due(&ledger, "fw", Duration::from_secs(4)).await;
    assert_eq!(ledger.claim("fw", 1).await.unwrap()[0].attempt, 2);
}

async fn a_delivery_is_dead_after_its_last_allowed_attempt(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = Duration::from_millis(1);
    opts.retry.max_attempts = 3;
    let ledger = h.open(&opts);
    let id = append(&ledger, "a", &["fw"]).await;
    let later = append(&ledger, "a", &["fw"]).await;

    for _ in 0..3 {
        until_due(&ledger, "fw", Duration::from_secs(1)).await;
        let batch = ledger.claim("fw", 1).await.unwrap();
        assert_eq!(ids(&batch), [id]);
        complete_all(&ledger, "fw", &batch, retry("connection refused")).await;
    }
    let dead = ledger.dead_letters(Some("fw"), None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id, id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(
        dead[0].reason,
        "gave up after 3 attempts: connection refused"
    );
    // A dead letter no longer holds back its entity.
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [later]);
    let backlog = backlog_of(&ledger, "fw");
    assert_eq!(
        (backlog.dead, backlog.retrying, backlog.in_flight),
        (1, 0, 1)
    );
}

async fn a_delivery_is_dead_once_it_has_failed_for_longer_than_the_max_age(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = Duration::from_millis(1);
    opts.retry.max_age = Duration::from_millis(150);
    let ledger = h.open(&opts);
    append(&ledger, "a", &["fw"]).await;
    let started = Instant::now();
    while ledger
        .dead_letters(None, None, 10)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(started.elapsed() < Duration::from_secs(5), "never died");
        until_due(&ledger, "fw", Duration::from_secs(1)).await;
        let batch = ledger.claim("fw", 1).await.unwrap();
        complete_all(&ledger, "fw", &batch, retry("down")).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(150));
    let dead = &ledger.dead_letters(None, None, 10).await.unwrap()[0];
    assert!(
        dead.reason.starts_with("gave up after 0."),
        "{}",
        dead.reason
    );
    assert!(
        dead.reason.ends_with("s of retries: down"),
        "{}",
        dead.reason
    );
}

async fn a_rejected_delivery_is_dead_at_once(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let id = append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 1).await.unwrap();
    let reject = Outcome::Reject {
        reason: "malformed body".into(),
    };
    complete_all(&ledger, "fw", &batch, reject).await;
    let dead = ledger.dead_letters(None, None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].plugin.as_str(), dead[0].event.id, dead[0].attempts),
        ("fw", id, 1)
    );
    assert_eq!(dead[0].reason, "rejected: malformed body");
    assert!(dead[0].died_at_ms > 0);
    assert_eq!(ledger.stats().undelivered, 0);
    assert_eq!(ledger.next_due("fw"), None);
}

async fn dead_letters_can_be_replayed_with_a_fresh_attempt_count_or_dropped(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let a = append(&ledger, "a", &["fw"]).await;
    let b = append(&ledger, "b", &["fw"]).await;
    let c = append(&ledger, "c", &["siem"]).await;
    for plugin in ["fw", "siem"] {
        let batch = ledger.claim(plugin, 10).await.unwrap();
        complete_all(
            &ledger,
            plugin,
            &batch,
            Outcome::Reject {
                reason: "no".into(),
            },
        )
        .await;
    }
    assert_eq!(ledger.dead_letters(None, None, 10).await.unwrap().len(), 3);
    // Listed in pages, each from the last one's cursor, by plugin then event.
    let first = ledger.dead_letters(None, None, 2).await.unwrap();
    let keys = |letters: &[DeadLetter]| {
        letters
            .iter()
            .map(|d| (d.plugin.clone(), d.event.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&first), [("fw".into(), a), ("fw".into(), b)]);
    let after = first[1].cursor();
    let second = ledger.dead_letters(None, Some(&after), 2).await.unwrap();
    assert_eq!(keys(&second), [("siem".into(), c)]);
    let after = second[0].cursor();
    assert!(ledger
        .dead_letters(None, Some(&after), 2)
        .await
        .unwrap()
        .is_empty());
    let after_a = first[0].cursor();
    let fw = ledger.dead_letters(Some("fw"), Some(&after_a), 10).await;
    assert_eq!(keys(&fw.unwrap()), [("fw".into(), b)]);
    // A cursor need not name a letter that exists.
    let between = DeadLetterCursor {
        plugin: "fx".into(),
        event_id: 0,
    };
    let rest = ledger.dead_letters(None, Some(&between), 10).await;
    assert_eq!(keys(&rest.unwrap()), [("siem".into(), c)]);

    assert_eq!(ledger.replay_dead(Some("fw"), Some(&[b])).await.unwrap(), 1);
    let replayed = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&replayed), [b]);
    assert_eq!(replayed[0].attempt, 1);
    complete_all(&ledger, "fw", &replayed, Outcome::Done).await;

    // Replays survive a restart.
    assert_eq!(ledger.replay_dead(Some("siem"), None).await.unwrap(), 1);
    drop(ledger);
    let ledger = h.open(&policy());
    assert_eq!(ids(&ledger.claim("siem", 10).await.unwrap()), [c]);

    assert_eq!(ledger.drop_dead(None, None).await.unwrap(), 1);
    assert!(ledger
        .dead_letters(None, None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(ledger.replay_dead(None, None).await.unwrap(), 0);
    let fw = backlog_of(&ledger, "fw");
    assert_eq!((fw.dead, fw.pending, fw.delivered), (0, 0, 1));
}

async fn replay_since_gives_a_new_plugin_the_retained_events_from_that_time(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let t = now_ms() - 10 * MINUTE_MS;
    let old = append_at(&ledger, "a", t, &["fw"]).await;
    let mid = append_at(&ledger, "b", t + MINUTE_MS, &["fw"]).await;
    let mut deleted = event("c", t + 2 * MINUTE_MS);
    deleted.event_type = "VM.DELETE".into();
    let new = match ledger.append(deleted, plugins(&["fw"])).await.unwrap() {
        Appended::Stored { id, .. } => id,
        other => panic!("{other:?}"),
    };
    let batch = ledger.claim("fw", 10).await.unwrap();
    complete_all(&ledger, "fw", &batch, Outcome::Done).await;

    // A plugin added later sees nothing old on its own...
    assert!(ledger.claim("lb", 10).await.unwrap().is_empty());
    // ...until asked for.
    assert_eq!(
        ledger
            .replay_since("lb", t + MINUTE_MS, &every())
            .await
            .unwrap(),
        2
    );
    assert_eq!(ids(&ledger.claim("lb", 10).await.unwrap()), [mid, new]);
    // Pending or in flight already: not replayed twice.
    assert_eq!(ledger.replay_since("lb", t, &every()).await.unwrap(), 1);
    assert_eq!(ids(&ledger.claim("lb", 10).await.unwrap()), [old]);

    // An existing plugin can have delivered events again, of the types its
    // subscriptions cover.
    let types = ["VM.DEL*".to_string(), "IMAGE.CREATE".to_string()];
    assert_eq!(ledger.replay_since("fw", t, &types).await.unwrap(), 1);
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [new]);
}

async fn the_same_notification_within_the_dedupe_window_is_stored_once_and_again_after_it(
    h: &dyn Harness,
) {
    let ledger = h.open(&policy());
    let t = now_ms();
    let keyed = |at: u64| NewEvent {
        dedupe_key: Some("c1|VM.UPDATE|vm-1|v7".into()),
        ..event("vm-1", at)
    };
    let first = ledger.append(keyed(t), plugins(&["fw"])).await.unwrap();
    let Appended::Stored { id, .. } = first else {
        panic!("{first:?}")
    };
    let again = ledger
        .append(keyed(t + 9 * MINUTE_MS), plugins(&["fw"]))
        .await
        .unwrap();
    assert_eq!(again, Appended::Duplicate { id });
    assert_eq!(ledger.stats().undelivered, 1);

    let later = ledger
        .append(keyed(t + 11 * MINUTE_MS), plugins(&["fw"]))
        .await
        .unwrap();
    assert!(
        matches!(later, Appended::Stored { id: newer, .. } if newer > id),
        "{later:?}"
    );
    let other_key = NewEvent {
        dedupe_key: Some("c1|VM.UPDATE|vm-1|v8".into()),
        ..event("vm-1", t)
    };
    assert!(matches!(
        ledger.append(other_key, plugins(&["fw"])).await.unwrap(),
        Appended::Stored { .. }
    ));
}

/// A dedupe key is the caller's text: line breaks, and a megabyte of it, dedupe like any other
/// (JetStream carries the key in a header, which a line break would break).
async fn any_dedupe_key_dedupes_line_breaks_and_a_megabyte_included(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let t = now_ms();
    let long = "9".repeat(1 << 20);
    for (key, other) in [
        (
            "1\r\nNats-Msg-Id: x".to_owned(),
            "1\r\nNats-Msg-Id: y".to_owned(),
        ),
        (format!("{long}a"), format!("{long}b")),
    ] {
        let keyed = |key: &str| NewEvent {
            dedupe_key: Some(key.to_owned()),
            ..event("vm-1", t)
        };
        let first = ledger.append(keyed(&key), plugins(&["fw"])).await.unwrap();
        let Appended::Stored { id, .. } = first else {
            panic!("{first:?}")
        };
        let again = ledger.append(keyed(&key), plugins(&["fw"])).await.unwrap();
        assert_eq!(again, Appended::Duplicate { id });
        let other = ledger
            .append(keyed(&other), plugins(&["fw"]))
            .await
            .unwrap();
        assert!(matches!(other, Appended::Stored { .. }), "{other:?}");
    }
}

async fn the_dedupe_window_survives_reopening_and_ends_where_it_would_have(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let t = now_ms();
    let keyed = |key: &str, at: u64| NewEvent {
        dedupe_key: Some(key.into()),
        ..event("vm-1", at)
    };
    let stored = |appended: Appended| match appended {
        Appended::Stored { id, .. } => id,
        other => panic!("{other:?}"),
    };
    let recent = stored(
        ledger
            .append(keyed("recent", t), plugins(&["fw"]))
            .await
            .unwrap(),
    );
    let stale = keyed("stale", t - 11 * MINUTE_MS);
    stored(
        ledger
            .append(stale.clone(), plugins(&["fw"]))
            .await
            .unwrap(),
    );
    drop(ledger);

    let ledger = h.open(&policy());
    assert_eq!(
        ledger
            .append(keyed("recent", t + MINUTE_MS), plugins(&["fw"]))
            .await
            .unwrap(),
        Appended::Duplicate { id: recent }
    );
    let again = NewEvent {
        received_at_ms: t,
        ..stale
    };
    stored(ledger.append(again, plugins(&["fw"])).await.unwrap());
    assert_eq!(ledger.stats().undelivered, 3);
}

async fn concurrent_duplicates_in_one_group_commit_are_stored_once(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let t = now_ms();
    let appends = (0..50).map(|_| {
        let ledger = ledger.clone();
        let ev = NewEvent {
            dedupe_key: Some("same".into()),
            ..event("vm-1", t)
        };
        async move { ledger.append(ev, plugins(&["fw"])).await.unwrap() }
    });
    let results = futures_join_all(appends).await;
    let stored = results
        .iter()
        .filter(|r| matches!(r, Appended::Stored { .. }))
        .count();
    assert_eq!(stored, 1, "{results:?}");
    assert_eq!(ledger.stats().undelivered, 1);
}

async fn appends_are_refused_above_the_backlog_limit_until_deliveries_drain(h: &dyn Harness) {
    let mut opts = policy();
    opts.max_backlog = 3;
    let ledger = h.open(&opts);
    append(&ledger, "a", &["fw"]).await;
    append(&ledger, "b", &["fw", "siem"]).await;
    let refused = ledger.append(event("c", now_ms()), plugins(&["fw"])).await;
    match refused {
        Err(LedgerError::Backpressure {
            resource: Resource::Backlog,
            current: 3,
            limit: 3,
            retry_after,
        }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected backpressure, got {other:?}"),
    }
    let batch = ledger.claim("fw", 10).await.unwrap();
    complete_all(&ledger, "fw", &batch, Outcome::Done).await;
    assert_eq!(ledger.stats().undelivered, 1);
    append(&ledger, "c", &["fw"]).await;
}

/// An event received while the clock ran a day fast (stepped back since)
/// neither stops a prune at it, keeping every later event however old, nor
/// is kept itself once a later event is old enough to go.
async fn a_prune_goes_past_events_stamped_ahead_of_a_clock_that_stepped_back(h: &dyn Harness) {
    let mut opts = policy();
    opts.retention = Duration::from_secs(3600);
    let ledger = h.open(&opts);
    let (now, day) = (now_ms(), 24 * 3600 * 1000);
    append_at(&ledger, "a", now + day, &["fw"]).await;
    append_at(&ledger, "b", now - 2 * 3600 * 1000, &["fw"]).await;
    let ahead = append_at(&ledger, "c", now + day, &["fw"]).await;
    let recent = append(&ledger, "d", &["fw"]).await;
    let batch = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(batch.len(), 4);
    complete_all(&ledger, "fw", &batch, Outcome::Done).await;

    assert_eq!(
        ledger.prune().await.unwrap(),
        2,
        "the old one, and the one before it"
    );
    assert_eq!(ledger.replay_since("audit", 0, &every()).await.unwrap(), 2);
    assert_eq!(
        ids(&ledger.claim("audit", 10).await.unwrap()),
        [ahead, recent]
    );
}

/// A replay queues no more than the backlog limit has room for, and says
/// when the first event it left out was received, to replay again from.
async fn a_replay_stops_at_the_backlog_limit_and_says_where_to_go_on(h: &dyn Harness) {
    let mut opts = policy();
    opts.max_backlog = 3;
    let ledger = h.open(&opts);
    let t = now_ms() - MINUTE_MS;
    let mut retained = Vec::new();
    for (i, entity) in ["a", "b", "c", "d"].into_iter().enumerate() {
        retained.push(append_at(&ledger, entity, t + i as u64, &["fw"]).await);
        let batch = ledger.claim("fw", 10).await.unwrap();
        complete_all(&ledger, "fw", &batch, Outcome::Done).await;
    }
    retained.push(append_at(&ledger, "e", t + 4, &["siem"]).await);

    let mut since = t;
    let mut replayed = Vec::new();
    for (room, stops_at) in [(2, Some(t + 2)), (2, Some(t + 4)), (1, None)] {
        match ledger.replay_since("audit", since, &every()).await {
            Err(LedgerError::ReplayStopped {
                replayed,
                limit: 3,
                resume_since_ms,
            }) if Some(resume_since_ms) == stops_at => {
                assert_eq!(replayed, room);
                assert_eq!(
                    ledger.stats().undelivered,
                    3,
                    "filled to the limit, no further"
                );
                since = resume_since_ms;
            }
            Ok(n) if stops_at.is_none() => assert_eq!(n, room),
            other => panic!("{other:?}, expected a stop at {stops_at:?}"),
        }
        let batch = ledger.claim("audit", 10).await.unwrap();
        assert_eq!(batch.len() as u64, room);
        replayed.extend(ids(&batch));
        complete_all(&ledger, "audit", &batch, Outcome::Done).await;
    }
    assert_eq!(replayed, retained, "each retained event once, in order");
    let full = ledger
        .replay_since("audit", t, &every())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        full.contains("replayed 2 event(s), then stopped at the backlog limit of 3")
            && full.contains("replay again since"),
        "{full}"
    );
}

async fn prune_removes_only_old_events_whose_deliveries_are_all_done(h: &dyn Harness) {
    let mut opts = policy();
    opts.retention = Duration::from_secs(3600);
    let ledger = h.open(&opts);
    let old = now_ms() - 2 * 3600 * 1000;
    let delivered = append_at(&ledger, "a", old, &["fw"]).await;
    let half_delivered = append_at(&ledger, "b", old + 1, &["fw", "siem"]).await;
    let dead = append_at(&ledger, "c", old + 2, &["fw"]).await;
    let unsubscribed = append_at(&ledger, "d", old + 3, &[]).await;
    let pending = append_at(&ledger, "e", old + 4, &["siem"]).await;
    let recent = append(&ledger, "f", &["fw"]).await;

    let batch = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&batch), [delivered, half_delivered, dead, recent]);
    let results = batch
        .iter()
        .map(|d| {
            let outcome = if d.event.id == dead {
                Outcome::Reject {
                    reason: "no".into(),
                }
            } else {
                Outcome::Done
            };
            (d.event.id, outcome)
        })
        .collect();
    ledger.complete("fw", results).await.unwrap();

    assert_eq!(
        ledger.prune().await.unwrap(),
        2,
        "delivered and unsubscribed"
    );
    assert_eq!(ledger.prune().await.unwrap(), 0);

    // What is left is exactly what a new plugin can still be given.
    assert_eq!(ledger.replay_since("audit", 0, &every()).await.unwrap(), 4);
    let left = ids(&ledger.claim("audit", 10).await.unwrap());
    assert_eq!(left, [half_delivered, dead, pending, recent]);
    assert!(!left.contains(&unsubscribed));
    // The survivors are intact and still deliverable.
    assert_eq!(
        ids(&ledger.claim("siem", 10).await.unwrap()),
        [half_delivered, pending]
    );
    assert_eq!(
        ledger.dead_letters(None, None, 10).await.unwrap()[0]
            .event
            .id,
        dead
    );
}

async fn prune_forgets_dedupe_keys_older_than_the_window(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let old = now_ms() - 20 * MINUTE_MS;
    let keyed = |at: u64| NewEvent {
        dedupe_key: Some("k".into()),
        ..event("vm-1", at)
    };
    ledger.append(keyed(old), plugins(&[])).await.unwrap();
    ledger.prune().await.unwrap();
    // With the key gone, an old-stamped copy is new again (the window check alone would say
    // duplicate: 0 ms apart).
    let again = ledger.append(keyed(old), plugins(&[])).await.unwrap();
    assert!(matches!(again, Appended::Stored { .. }), "{again:?}");
}

async fn release_returns_deliveries_without_counting_an_attempt(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let a = append(&ledger, "a", &["fw"]).await;
    let b = append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 10).await.unwrap();
    ledger.release("fw", &ids(&batch)).await.unwrap();
    let again = ledger.claim("fw", 10).await.unwrap();
    assert_eq!(ids(&again), [a, b]);
    assert!(again.iter().all(|d| d.attempt == 1));
}

async fn a_claim_abandoned_before_it_returns_leaves_nothing_in_flight(h: &dyn Harness) {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let ledger = h.open(&policy());
    let a = append(&ledger, "a", &["fw"]).await;
    {
        let mut claim = Box::pin(ledger.claim("fw", 10));
        match claim.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            // The events are being read (redb: off the runtime; JetStream: from the stream).
            Poll::Pending => assert_eq!(backlog_of(&ledger, "fw").in_flight, 1),
            // A backend that had the event in memory answered at once: nothing was abandoned,
            // and the caller gives the claim back as the dispatcher does at shutdown.
            Poll::Ready(claimed) => {
                assert_eq!(ids(&claimed.unwrap()), [a]);
                ledger.release("fw", &[a]).await.unwrap();
            }
        }
    } // dropped, as by a `select!` that took another branch
    assert_eq!(backlog_of(&ledger, "fw").in_flight, 0);
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [a]);
}

async fn outcomes_for_deliveries_not_in_flight_are_ignored(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let a = append(&ledger, "a", &["fw"]).await;
    ledger
        .complete("fw", vec![(a, Outcome::Done)])
        .await
        .unwrap();
    ledger
        .complete("fw", vec![(999, Outcome::Done)])
        .await
        .unwrap();
    assert_eq!(ledger.stats().undelivered, 1);
    assert_eq!(ids(&ledger.claim("fw", 10).await.unwrap()), [a]);
}

async fn waiting_for_work_wakes_the_plugin_an_append_is_for(h: &dyn Harness) {
    let ledger = h.open(&policy());
    assert_eq!(ledger.next_due("fw"), None);
    let (fw, siem, _) = tokio::join!(
        ledger.wait_for_work("fw", Duration::from_secs(5)),
        ledger.wait_for_work("siem", Duration::from_millis(300)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            append(&ledger, "a", &["fw"]).await
        },
    );
    assert_eq!(fw, Wake::Signalled);
    assert_eq!(siem, Wake::TimedOut);
    assert!(ledger.next_due("fw").unwrap() <= Instant::now());
}

async fn a_signal_raised_before_the_wait_is_not_lost(h: &dyn Harness) {
    let ledger = h.open(&policy());
    assert!(ledger.claim("fw", 10).await.unwrap().is_empty());
    append(&ledger, "a", &["fw"]).await;
    let woke = ledger.wait_for_work("fw", Duration::from_secs(5)).await;
    assert_eq!(woke, Wake::Signalled);
}

async fn waiting_for_work_ends_when_a_retry_falls_due(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = NOT_YET;
    let ledger = h.open(&opts);
    append(&ledger, "a", &["fw"]).await;
    let batch = ledger.claim("fw", 1).await.unwrap();
    complete_all(&ledger, "fw", &batch, retry("busy")).await;
    // The completion itself signals; the wait after it ends at the retry time.
    let _ = ledger.wait_for_work("fw", Duration::from_secs(5)).await;
    assert!(
        ledger.claim("fw", 1).await.unwrap().is_empty(),
        "not due yet"
    );
    let started = Instant::now();
    assert_eq!(
        ledger.wait_for_work("fw", Duration::from_secs(5)).await,
        Wake::Due
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not the 5 s limit"
    );
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(ledger.claim("fw", 1).await.unwrap()[0].attempt, 2);
}

async fn after_close_other_handles_get_closed_errors_and_it_reopens(h: &dyn Harness) {
    let ledger = h.open(&policy());
    let other = ledger.clone();
    append(&ledger, "a", &["fw"]).await;
    ledger.close().await.unwrap();
    let refused = other.append(event("b", now_ms()), plugins(&["fw"])).await;
    assert!(matches!(refused, Err(LedgerError::Closed)), "{refused:?}");
    assert!(matches!(other.check().await, Err(LedgerError::Closed)));
    drop((ledger, other));
    let reopened = h.open(&policy());
    assert_eq!(reopened.stats().undelivered, 1);
    reopened.check().await.unwrap();
}

async fn backlog_reports_each_plugins_counts(h: &dyn Harness) {
    let mut opts = policy();
    opts.retry.initial = Duration::from_secs(60);
    let ledger = h.open(&opts);
    let t = now_ms() - MINUTE_MS;
    for (n, entity) in ["a", "b", "c", "d"].iter().enumerate() {
        append_at(&ledger, entity, t + n as u64, &["fw"]).await;
    }
    let batch = ledger.claim("fw", 3).await.unwrap();
    let results = vec![
        (batch[0].event.id, Outcome::Done),
        (batch[1].event.id, retry("busy")),
    ];
    ledger.complete("fw", results).await.unwrap();
    assert_eq!(
        ledger.backlog().unwrap(),
        vec![PluginBacklog {
            plugin: "fw".into(),
            pending: 2,
            in_flight: 1,
            retrying: 1,
            dead: 0,
            delivered: 1,
            oldest_pending_ms: Some(t + 1),
        }]
    );
    drop(ledger);
    let reopened = h.open(&policy()).backlog().unwrap();
    assert_eq!((reopened[0].pending, reopened[0].delivered), (3, 1));
}

/// One `#[tokio::test]` per case and backend: `redb::a_claim_returns_at_most_the_batch_size`,
/// `jetstream::…` (every claim read from the stream), `jetstream_cached::…` (as configured by
/// default).
macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::redb()).await
                }
            )*
        }
        mod jetstream {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::jetstream(0).await).await
                }
            )*
        }
        mod jetstream_cached {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::jetstream(16_384).await).await
                }
            )*
        }
    };
}

backends!(
    an_appended_event_survives_reopening_with_its_content,
    event_ids_keep_increasing_across_reopens_even_after_everything_is_pruned,
    in_flight_deliveries_are_pending_again_after_a_crash,
    each_subscribed_plugin_gets_its_own_delivery,
    a_batch_mixes_entities_in_arrival_order_and_holds_consecutive_events_of_one,
    a_claim_returns_at_most_the_batch_size,
    an_entity_with_a_batch_in_flight_gets_nothing_more_until_it_completes,
    a_retrying_event_holds_back_later_events_of_its_entity_only,
    a_done_behind_a_retry_in_the_same_batch_comes_again_after_it,
    a_done_behind_a_retry_that_dies_is_delivered,
    retry_backoff_doubles_and_honours_a_longer_plugin_delay,
    a_plugin_delay_of_u64_max_ms_is_held_to_the_max_age,
    retry_state_survives_reopening,
    a_delivery_is_dead_after_its_last_allowed_attempt,
    a_delivery_is_dead_once_it_has_failed_for_longer_than_the_max_age,
    a_rejected_delivery_is_dead_at_once,
    dead_letters_can_be_replayed_with_a_fresh_attempt_count_or_dropped,
    replay_since_gives_a_new_plugin_the_retained_events_from_that_time,
    the_same_notification_within_the_dedupe_window_is_stored_once_and_again_after_it,
    the_dedupe_window_survives_reopening_and_ends_where_it_would_have,
    any_dedupe_key_dedupes_line_breaks_and_a_megabyte_included,
    concurrent_duplicates_in_one_group_commit_are_stored_once,
    appends_are_refused_above_the_backlog_limit_until_deliveries_drain,
    prune_removes_only_old_events_whose_deliveries_are_all_done,
    a_prune_goes_past_events_stamped_ahead_of_a_clock_that_stepped_back,
    a_replay_stops_at_the_backlog_limit_and_says_where_to_go_on,
    prune_forgets_dedupe_keys_older_than_the_window,
    release_returns_deliveries_without_counting_an_attempt,
    a_claim_abandoned_before_it_returns_leaves_nothing_in_flight,
    outcomes_for_deliveries_not_in_flight_are_ignored,
    after_close_other_handles_get_closed_errors_and_it_reopens,
    backlog_reports_each_plugins_counts,
    waiting_for_work_wakes_the_plugin_an_append_is_for,
    a_signal_raised_before_the_wait_is_not_lost,
    waiting_for_work_ends_when_a_retry_falls_due,
);
