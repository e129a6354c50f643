//! Issue 3's figures: the listener, measured with wrk.
//!
//! A: the real host (`App::start` with a config like tests/nutanix.rs: Basic
//!    auth, paloalto.wasm loaded and subscribed, ledger with group commit,
//!    dispatcher delivering to a PAN-OS simulator while it accepts).
//! B: a trivial axum 0.8 handler (reads the body, answers 202) in the same
//!    process.
//! Both get the same wrk Lua script: POST of the vm_*.json fixtures in turn,
//! each with its entity uuid and IPs made unique per request (identical
//! notifications would be deduplicated), with the Authorization header.
//! A and B alternate; before each A round the host's backlog is drained so
//! a round is not charged with the previous round's deliveries.
//!
//! `cargo bench -p prismhook --bench listener`

mod common;

use std::time::Duration;

use common::*;

#[tokio::main]
async fn main() {
    init_tracing();
    println!("# prismhook bench: listener (issue 3)");
    machine_note();
    println!("load generator: wrk (separate process) on the same 2 cores as the server");
    let rig = start_host().await;
    let trivial = start_trivial().await;
    let sides = [
        Target {
            name: "prismhook listener (durable, full host)",
            url: rig.url.clone(),
        },
        Target {
            name: "trivial axum handler",
            url: format!("http://{trivial}/listener/callback/lab"),
        },
    ];
    let script = wrk_script();
    let fixtures: Vec<String> = vm_fixtures()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    println!(
        "bodies: {} ({} fixtures, 4.3–7.5 KB)",
        fixtures.join(", "),
        fixtures.len()
    );

    let mut round_id = 1u32;
    let mut results: Vec<Vec<WrkResult>> = vec![Vec::new(), Vec::new()];
    let mut commits = Vec::new();
    // Warm-up (connections, page cache, the JIT of wrk's Lua).
    for s in &sides {
        wrk_with(&s.url, 2, 64, 1, &script, &rig.auth, round_id).await;
        round_id += 1;
    }
    drain(&rig.app.ledger, Duration::from_secs(120)).await;

    println!("\n## Accept rate: wrk -t2 -c64 -d5s --latency, 3 rounds, A/B alternating");
    println!("| round | side | 202/s | p50 | p90 | p99 | non-2xx | socket errors | ledger commits | events/commit | drain after |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for round in 0..3 {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let commits_before = rig.app.ledger.stats().commits;
            let r = wrk_with(&sides[i].url, 2, 64, 5, &script, &rig.auth, round_id).await;
            round_id += 1;
            let (c, per, drained) = if i == 0 {
                let c = rig.app.ledger.stats().commits - commits_before;
                commits.push(c);
                let drained = drain(&rig.app.ledger, Duration::from_secs(180)).await;
                let per = r.requests.saturating_sub(r.non_2xx) as f64 / c.max(1) as f64;
                (
                    c.to_string(),
                    format!("{per:.1}"),
                    drained.map_or("> 180 s".into(), |d| format!("{:.1} s", d.as_secs_f64())),
                )
            } else {
                ("–".into(), "–".into(), "–".into())
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {c} | {per} | {drained} |",
                round + 1,
                sides[i].name,
                rate(r.ok_per_s),
                us(r.p50_us),
                us(r.p90_us),
                us(r.p99_us),
                r.non_2xx,
                r.socket_errors
            );
            results[i].push(r);
        }
    }

    println!("\n## One connection: wrk -t1 -c1 -d3s --latency, 2 rounds, alternating");
    let mut single: Vec<Vec<WrkResult>> = vec![Vec::new(), Vec::new()];
    println!("| round | side | 202/s | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|---|");
    for round in 0..2 {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let r = wrk_with(&sides[i].url, 1, 1, 3, &script, &rig.auth, round_id).await;
            round_id += 1;
            if i == 0 {
                drain(&rig.app.ledger, Duration::from_secs(120)).await;
            }
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                round + 1,
                sides[i].name,
                rate(r.ok_per_s),
                us(r.p50_us),
                us(r.p90_us),
                us(r.p99_us)
            );
            single[i].push(r);
        }
    }

    let med =
        |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!("\n## Summary (medians over rounds)");
    println!("| figure | prismhook listener | trivial axum | ratio |");
    println!("|---|---|---|---|");
    let (a, b) = (&results[0], &results[1]);
    let (ra, rb) = (med(a, |r| r.ok_per_s), med(b, |r| r.ok_per_s));
    println!(
        "| 202/s, 64 connections | {} | {} | {:.2}× ({:.0}% of trivial) |",
        rate(ra),
        rate(rb),
        ra / rb,
        100.0 * ra / rb
    );
    let (pa, pb) = (med(a, |r| r.p50_us), med(b, |r| r.p50_us));
    println!(
        "| p50, 64 connections | {} | {} | {:.1}× |",
        us(pa),
        us(pb),
        pa / pb
    );
    let (pa, pb) = (med(a, |r| r.p99_us), med(b, |r| r.p99_us));
    println!(
        "| p99, 64 connections | {} | {} | {:.1}× |",
        us(pa),
        us(pb),
        pa / pb
    );
    let (a, b) = (&single[0], &single[1]);
    let (ra, rb) = (med(a, |r| r.ok_per_s), med(b, |r| r.ok_per_s));
    println!(
        "| 202/s, 1 connection | {} | {} | {:.2}× |",
        rate(ra),
        rate(rb),
        ra / rb
    );
    let (pa, pb) = (med(a, |r| r.p50_us), med(b, |r| r.p50_us));
    println!(
        "| p50, 1 connection | {} | {} | {:.1}× |",
        us(pa),
        us(pb),
        pa / pb
    );
    let (pa, pb) = (med(a, |r| r.p99_us), med(b, |r| r.p99_us));
    println!(
        "| p99, 1 connection | {} | {} | {:.1}× |",
        us(pa),
        us(pb),
        pa / pb
    );
    let stats = rig.panos.stats();
    println!(
        "\nfirewall over the whole run: {} requests, {} uid-messages, {} commits, {} errors",
        stats.requests, stats.uid_messages, stats.commits, stats.errors
    );
    let _ = std::fs::remove_file(&script);
    let _ = &rig.prism;
    let _ = &rig.dir;
}
