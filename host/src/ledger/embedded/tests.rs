//! Behaviour of the embedded ledger that is its own (the file, its size limit, the group commit);
//! what every backend promises is in `ledger/suite.rs`.

use std::time::Duration;

use tempfile::TempDir;

use super::*;
use crate::ledger::suite::futures_join_all;
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
