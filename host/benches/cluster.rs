//! Issue 13's figures: what a 202 costs on JetStream against redb, and how
//! long a dead host's partitions take to move.
//!
//! 1. Durable accepts, side by side in one run: the listener's own router
//!    (Nutanix routes, paloalto.wasm subscribed, so each accept stores the
//!    event and one pending delivery) over three ledgers:
//!    - redb, fsync before every 202;
//!    - JetStream R1, one local `nats-server`;
//!    - JetStream R3, three local nodes: a 202 once two of them have it.
//!
//!    `wrk -t2 -c64` for 5 s, rotating, 3 rounds.
//! 2. The ack latency at a fixed 1,000 notifications/s (open loop), 2 rounds
//!    of 5 s. No dispatcher runs in 1 and 2: they isolate accepting.
//! 3. Failover: three ledger handles ("hosts") sharing a stream on the
//!    three nodes. Each round drops a host as a crash does (no leave: its
//!    leases stay until they expire), appends an event
//!    of a partition it served through a survivor, and times until a
//!    survivor claims it; then the host comes back under its name. 20 kills.
//!
//! `cargo bench -p prismhook --bench cluster` (nats-server from `cargo xtask
//! nats-server`, found as the tests find it).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prismhook::clock::now_ms;
use prismhook::ledger::{
    partition_of_entity, JetStreamLedger, JetStreamOptions, Ledger, LedgerOptions, NewEvent,
    Outcome, RedbLedger, SharedLedger, PARTITIONS,
};
use prismhook_sim::nats::Nats;

use common::*;

fn on(nats: &Nats, stream: &str, host: &str, replicas: usize) -> JetStreamOptions {
    JetStreamOptions {
        stream: stream.into(),
        replicas: Some(replicas),
        client_name: host.into(),
        ..JetStreamOptions::new(nats.urls())
    }
}

#[tokio::main]
async fn main() {
    init_tracing();
    println!("# prismhook bench: cluster (issue 13)");
    machine_note();
    let dir = tempfile::tempdir().unwrap();
    let registry = paloalto_registry(dir.path()).await;
    let one = Nats::single(&dir.path().join("r1")).await.unwrap();
    let three = Nats::start(&dir.path().join("r3"), 3).await.unwrap();

    let redb: SharedLedger =
        Arc::new(RedbLedger::open(LedgerOptions::new(dir.path().join("ledger.redb"))).unwrap());
    let r1: SharedLedger = Arc::new(
        JetStreamLedger::open(on(&one, "PRISMHOOK", "bench", 1))
            .await
            .unwrap(),
    );
    let r3: SharedLedger = Arc::new(
        JetStreamLedger::open(on(&three, "PRISMHOOK", "bench", 3))
            .await
            .unwrap(),
    );
    let mut targets = Vec::new();
    for (name, ledger) in [
        ("redb (fsync)", redb),
        ("JetStream R1", r1),
        ("JetStream R3", r3),
    ] {
        let router = listener_router(ledger, registry.clone(), dir.path());
        targets.push(Target {
            name,
            url: format!("http://{}/listener/callback/lab", serve(router).await),
        });
    }
    let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
    let script = wrk_script();
    let mut round_id = 5000u32;

    // ------------------------------------------------------------ 1
    println!("\n## 1. Durable accepts at saturation: wrk -t2 -c64 -d5s --latency (wrk shares the 2 cores with the host and the NATS nodes)");
    let sat = saturate(
        &targets,
        3,
        &script,
        &auth,
        &mut round_id,
        &[],
        |_| (),
        |_, (), _| String::new(),
    )
    .await;

    println!("\n## 2. Ack latency at a fixed 1,000 notifications/s (open loop; 2 rounds × 5 s per ledger)");
    let (paced_lat, paced_bad) = paced_rounds(&targets, 2, &auth, 6000, &mut round_id).await;

    let med =
        |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!("\n## Summary, accepting (medians over rounds; paced latencies pooled)");
    println!("| ledger | 202/s saturated | vs redb | p99 saturated | p50 @1k/s | p99 @1k/s | p99.9 @1k/s | non-202 @1k/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let redb_rate = med(&sat[0], |r| r.ok_per_s);
    for i in 0..3 {
        let l = sorted(paced_lat[i].clone());
        println!(
            "| {} | {} | {:.2}× | {} | {} | {} | {} | {} |",
            targets[i].name,
            rate(med(&sat[i], |r| r.ok_per_s)),
            med(&sat[i], |r| r.ok_per_s) / redb_rate,
            us(med(&sat[i], |r| r.p99_us)),
            us(percentile(&l, 50.0)),
            us(percentile(&l, 99.0)),
            us(percentile(&l, 99.9)),
            paced_bad[i]
        );
    }
    let r3_rate = med(&sat[2], |r| r.ok_per_s);
    println!(
        "floors: JetStream R3 ≥ 3,000 durable accepts/s → {} ({}); ≥ 0.3× redb → {:.2}× ({})",
        rate(r3_rate),
        if r3_rate >= 3000.0 { "met" } else { "NOT met" },
        r3_rate / redb_rate,
        if r3_rate >= 0.3 * redb_rate {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(targets);
    let _ = std::fs::remove_file(&script);

    // ------------------------------------------------------------ 3
    println!("\n## 3. Failover: a host dropped as by a crash → the first event of one of its partitions claimed by a survivor (3 hosts, R3, 20 kills)");
    let names = ["host a", "host b", "host c"];
    let mut hosts: Vec<Option<JetStreamLedger>> = Vec::new();
    for name in names {
        hosts.push(Some(
            JetStreamLedger::open(on(&three, "FAILOVER", name, 3))
                .await
                .unwrap(),
        ));
    }
    let mut took = Vec::new();
    let mut serial = 0u64;
    for kill in 0..20 {
        shared_out(&hosts).await;
        let victim = kill % names.len();
        let dead = hosts[victim].take().unwrap();
        let partition = dead.membership().unwrap().serving[0];
        // An entity of that partition.
        let entity = (0u64..)
            .map(|i| format!("failover-{kill}-{i}"))
            .find(|uuid| partition_of_entity("lab", uuid) == partition)
            .unwrap();
        drop(dead);
        let killed = Instant::now();
        serial += 1;
        let survivor = hosts.iter().flatten().next().unwrap();
        survivor
            .append(
                NewEvent {
                    cluster: "lab".into(),
                    event_type: "VM.UPDATE".into(),
                    entity_kind: "vm".into(),
                    entity_uuid: entity,
                    dedupe_key: Some(format!("failover-{serial}")),
                    received_at_ms: now_ms(),
                    body: "{}".into(),
                    vm: None,
                },
                vec!["fw".into()],
            )
            .await
            .unwrap();
        'claimed: loop {
            for host in hosts.iter().flatten() {
                let batch = host.claim("fw", 10).await.unwrap();
                if !batch.is_empty() {
                    took.push(killed.elapsed().as_secs_f64() * 1e6);
                    let done = batch.iter().map(|d| (d.event.id, Outcome::Done)).collect();
                    host.complete("fw", done).await.unwrap();
                    break 'claimed;
                }
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "kill {}: {} (partition {partition}) → claimed after {}",
            kill + 1,
            names[victim],
            us(*took.last().unwrap())
        );
        hosts[victim] = Some(
            JetStreamLedger::open(on(&three, "FAILOVER", names[victim], 3))
                .await
                .unwrap(),
        );
    }
    let took = sorted(took);
    println!(
        "failover over {} kills: p50 {}, p99 {}, max {} (target p99 < 5 s: {})",
        took.len(),
        us(percentile(&took, 50.0)),
        us(percentile(&took, 99.0)),
        us(*took.last().unwrap()),
        if percentile(&took, 99.0) < 5e6 {
            "met"
        } else {
            "NOT met"
        }
    );
    // The listeners and their ledgers live on in server tasks: the process
    // ends before the NATS nodes stop under them, which would only log.
    std::process::exit(0);
}

/// Waits until the live hosts serve every partition between them.
async fn shared_out(hosts: &[Option<JetStreamLedger>]) {
    let started = Instant::now();
    loop {
        let served: usize = hosts
            .iter()
            .flatten()
            .map(|h| h.membership().unwrap().serving.len())
            .sum();
        if served == PARTITIONS {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the hosts never shared the partitions out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
