//! Behaviour of the embedded ledger that is its own (the file, its size limit, the group commit);
//! what every backend promises is in `ledger/suite.rs`.

use std::time::Duration;

use tempfile::TempDir;

use super::*;
use crate::ledger::suite::{futures_join_all, the_unreadable_middle_event_is_a_dead_letter};
use crate::ledger::{Jitter, SharedLedger};

fn options(dir: &TempDir) -> LedgerOptions {
    LedgerOptions {
        retry: RetryPolicy {
            jitter: Jitter::None,
            ..RetryPolicy::default()
        },
        ..LedgerOptions::new(dir.path().join("data").join("ledger.redb"))
    }
}

fn open(dir: &TempDir) -> RedbLedger {
    RedbLedger::open(options(dir)).expect("ledger opens")
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
        vm: None,
    }
}

fn plugins(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn the_embedded_ledger_can_be_shared_between_tasks_as_a_ledger() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<RedbLedger>();
    shareable::<SharedLedger>();
}

#[tokio::test]
async fn appends_are_refused_once_the_file_reaches_its_size_limit_until_prune_frees_room() {
    let dir = TempDir::new().unwrap();
    let mut opts = options(&dir);
    opts.max_file_bytes = 4 << 20;
    opts.retention = Duration::ZERO;
    let ledger = RedbLedger::open(opts).unwrap();
    let body = "x".repeat(64 << 10);
    let bulky = |n: u64| NewEvent {
        body: body.clone(),
        ..event(&format!("vm-{n}"), now_ms())
    };
    let mut accepted = 0u64;
    let refusal = loop {
        match ledger.append(bulky(accepted), plugins(&["fw"])).await {
            Ok(_) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted < 1000, "never refused");
    };
    assert!(
        matches!(
            refusal,
            LedgerError::Backpressure {
                resource: Resource::Storage,
                ..
            }
        ),
        "{refusal:?}"
    );
    // redb doubles the file as it grows, so refusal may come when the data fills half of it.
    assert!(
        accepted * (64 << 10) >= 1 << 20,
        "refused too early: {accepted}"
    );
    assert!(ledger.stats().bytes >= 4 << 20);

    while !ledger.claim("fw", 256).await.unwrap().is_empty() {}
    let in_flight: Vec<u64> = (1..=accepted).collect();
    let results = in_flight.iter().map(|&id| (id, Outcome::Done)).collect();
    ledger.complete("fw", results).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(ledger.prune().await.unwrap(), accepted);
    assert!(ledger.stats().bytes < 4 << 20, "{}", ledger.stats().bytes);
    ledger.append(bulky(0), plugins(&["fw"])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_appends_share_far_fewer_commits() {
    let dir = TempDir::new().unwrap();
    let ledger = open(&dir);
    let before = ledger.stats().commits;
    let appends = (0..1000).map(|n| {
        let ledger = ledger.clone();
        async move {
            match ledger
                .append(
                    event(&format!("vm-{}", n % 50), now_ms()),
                    plugins(&["fw", "siem"]),
                )
                .await
                .unwrap()
            {
                Appended::Stored { id, .. } => id,
                other => panic!("{other:?}"),
            }
        }
    });
    let mut stored = futures_join_all(appends).await;
    let commits = ledger.stats().commits - before;
    stored.sort_unstable();
    stored.dedup();
    assert_eq!(stored.len(), 1000);
    assert!(commits < 100, "{commits} commits for 1000 appends");
    assert_eq!(ledger.stats().undelivered, 2000);
    drop(ledger);
    assert_eq!(open(&dir).stats().undelivered, 2000);
}

/// A delivery's record spoilt on disk does not keep the ledger from
/// opening: its event is pending again, and the others are as they were.
#[tokio::test]
async fn a_delivery_record_that_cannot_be_read_is_pending_again_and_the_ledger_opens() {
    let dir = TempDir::new().unwrap();
    let path = options(&dir).path;
    let ledger = open(&dir);
    let mut ids = Vec::new();
    for entity in ["vm-1", "vm-2"] {
        match ledger
            .append(event(entity, now_ms()), plugins(&["fw"]))
            .await
        {
            Ok(Appended::Stored { id, .. }) => ids.push(id),
            other => panic!("not stored: {other:?}"),
        }
    }
    drop(ledger);
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(store::DELIVERIES)
            .unwrap()
            .insert(("fw", ids[0]), &b"\xff not a record"[..])
            .unwrap();
        txn.commit().unwrap();
    }

    let ledger = open(&dir);
    let batch = ledger.claim("fw", 10).await.unwrap();
    let claimed: Vec<u64> = batch.iter().map(|d| d.event.id).collect();
    assert_eq!(claimed, ids);
    // Its outcome is recorded like any other: the record was written anew.
    let done = claimed.iter().map(|&id| (id, Outcome::Done)).collect();
    ledger.complete("fw", done).await.unwrap();
    let fw = &ledger.backlog().unwrap()[0];
    assert_eq!((fw.pending, fw.delivered), (0, 2), "{fw:?}");
}

/// Rejects every delivery `fw` has.
async fn reject_all(ledger: &RedbLedger) {
    loop {
        let batch = ledger.claim("fw", 1000).await.unwrap();
        if batch.is_empty() {
            return;
        }
        let rejected = batch
            .iter()
            .map(|d| {
                let reason = "no".to_owned();
                (d.event.id, Outcome::Reject { reason })
            })
            .collect();
        ledger.complete("fw", rejected).await.unwrap();
    }
}

/// Replaying or dropping more dead letters than one chunk takes several
/// transactions, each short, so the appends between them are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_replayed_and_dropped_a_chunk_per_transaction() {
    let dir = TempDir::new().unwrap();
    let ledger = open(&dir);
    let letters = writer::CHUNK + 10;
    let appends = (0..letters).map(|n| {
        let ledger = ledger.clone();
        async move {
            ledger
                .append(event(&format!("vm-{n}"), now_ms()), plugins(&["fw"]))
                .await
                .unwrap()
        }
    });
    futures_join_all(appends).await;
    reject_all(&ledger).await;
    let dead = |l: &RedbLedger| l.backlog().unwrap()[0].dead;
    assert_eq!(dead(&ledger), letters as u64);

    let before = ledger.stats().commits;
    assert_eq!(
        ledger.replay_dead(Some("fw"), None).await.unwrap(),
        letters as u64
    );
    assert_eq!(ledger.stats().commits - before, 2);
    assert_eq!(ledger.stats().undelivered, letters as u64);

    reject_all(&ledger).await;
    let before = ledger.stats().commits;
    assert_eq!(
        ledger.drop_dead(Some("fw"), None).await.unwrap(),
        letters as u64
    );
    assert_eq!(ledger.stats().commits - before, 2);
    assert_eq!(dead(&ledger), 0);
}

/// What a file written before `event_records` and `event_keys` held: the tables as those
/// releases defined them.
mod older_layout {
    use redb::TableDefinition;

    pub const EVENTS: TableDefinition<u64, (u64, &str, &str, &str, &str, &str)> =
        TableDefinition::new("events");
    pub const EVENT_VMS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_vms");
    pub const DEDUPE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("dedupe");
    pub const DEDUPE_BY_TIME: TableDefinition<(u64, &str), ()> =
        TableDefinition::new("dedupe_by_time");
    pub const DELIVERIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deliveries");
    pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
}

#[tokio::test]
async fn a_file_of_the_older_layout_opens_with_its_events_deliveries_and_dedupe_window() {
    let dir = TempDir::new().unwrap();
    let path = options(&dir).path;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // More events than two conversion chunks, so that it takes several transactions; the first
    // two are in the current layout already, as a conversion that crashed midway leaves them.
    let count = 2 * writer::CHUNK as u64 + 3;
    let t = now_ms();
    let vm = crate::event::Vm {
        uuid: "vm-1".into(),
        power_state: Some("ON".into()),
        ..Default::default()
    };
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(older_layout::EVENTS).unwrap();
            let mut vms = txn.open_table(older_layout::EVENT_VMS).unwrap();
            let mut dedupe = txn.open_table(older_layout::DEDUPE).unwrap();
            let mut by_time = txn.open_table(older_layout::DEDUPE_BY_TIME).unwrap();
            let mut deliveries = txn.open_table(older_layout::DELIVERIES).unwrap();
            let mut meta = txn.open_table(older_layout::META).unwrap();
            let mut moved = txn.open_table(store::EVENTS).unwrap();
            for id in 1..=count {
                let uuid = format!("vm-{id}");
                let body = format!(r#"{{"n":{id}}}"#);
                let encoded = store::encode_vm(&vm);
                let vm = (id == 1).then_some(encoded.as_slice());
                if id <= 2 {
                    let row = (t, "c1", "VM.ON", "vm", uuid.as_str(), vm, body.as_str());
                    moved.insert(id, row).unwrap();
                } else {
                    let row = (t, "c1", "VM.ON", "vm", uuid.as_str(), body.as_str());
                    events.insert(id, row).unwrap();
                }
                if id == 3 {
                    vms.insert(id, encoded.as_slice()).unwrap();
                }
                deliveries.insert(("fw", id), b"{}".as_slice()).unwrap();
            }
            dedupe.insert("key-of-1", (1, t)).unwrap();
            by_time.insert((t, "key-of-1"), ()).unwrap();
            meta.insert("delivered/fw", 7).unwrap();
        }
        txn.commit().unwrap();
    }

    let ledger = open(&dir);
    assert_eq!(ledger.stats().undelivered, count);
    let claimed = ledger.claim("fw", 4).await.unwrap();
    let vms: Vec<_> = claimed.iter().map(|d| d.event.vm.is_some()).collect();
    assert_eq!(vms, [true, false, true, false]);
    assert_eq!(claimed[2].event.vm.as_ref(), Some(&vm));
    assert_eq!(claimed[2].event.body, r#"{"n":3}"#);
    assert_eq!(claimed[3].event.entity_uuid, "vm-4");
    assert_eq!(ledger.backlog().unwrap()[0].delivered, 7);
    let again = NewEvent {
        dedupe_key: Some("key-of-1".into()),
        ..event("vm-1", t + 1)
    };
    assert_eq!(
        ledger.append(again, plugins(&["fw"])).await.unwrap(),
        Appended::Duplicate { id: 1 }
    );
    let next = ledger
        .append(event("vm-x", t), plugins(&["fw"]))
        .await
        .unwrap();
    assert!(
        matches!(next, Appended::Stored { id, .. } if id == count + 1),
        "{next:?}"
    );
    drop(ledger);

    // A release of the older layout finds a table of another type where it kept its events, so
    // it refuses the file instead of deleting its deliveries as orphans.
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(matches!(
        txn.open_table(older_layout::EVENTS),
        Err(redb::TableError::TableTypeMismatch { .. })
    ));
    for gone in ["dedupe", "dedupe_by_time", "event_vms"] {
        assert!(
            !txn.list_tables().unwrap().any(|t| {
                use redb::TableHandle;
                t.name() == gone
            }),
            "{gone} is still there"
        );
    }
}

/// A row the host cannot decode used to fail every claim of the plugins it was due to, so
/// nothing after it was delivered again.
#[tokio::test]
async fn a_delivery_whose_event_cannot_be_read_is_a_dead_letter_and_the_others_are_delivered() {
    let dir = TempDir::new().unwrap();
    let path = options(&dir).path;
    let t = now_ms();
    let ledger = open(&dir);
    let mut ids = Vec::new();
    for entity in ["vm-1", "vm-2", "vm-3"] {
        match ledger.append(event(entity, t), plugins(&["fw"])).await {
            Ok(Appended::Stored { id, .. }) => ids.push(id),
            other => panic!("not stored: {other:?}"),
        }
    }
    drop(ledger);
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(store::EVENTS).unwrap();
            let body = r#"{"entity":"vm-2"}"#;
            let row = (
                t,
                "c1",
                "VM.UPDATE",
                "vm",
                "vm-2",
                Some(&b"\xff not a vm"[..]),
                body,
            );
            events.insert(ids[1], row).unwrap();
        }
        txn.commit().unwrap();
    }

    let ledger = open(&dir);
    the_unreadable_middle_event_is_a_dead_letter(&ledger, "fw", &ids).await;
}
