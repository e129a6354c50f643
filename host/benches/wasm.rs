//! Issue 2's figures: the Wasm runtime.
//!
//! 1. Instantiation per call: `Plugin::handle` with one trivial event is a
//!    fresh Store + instantiate (pooling allocator) + `init` + `handle` +
//!    drop; probe.wasm and paloalto.wasm alternate.
//! 2. Per-event cost of `handle`, the Palo Alto plugin through Wasm versus the
//!    same crate compiled natively and called directly. Both sides get the
//!    same 1,000-event batches (VM.ON for 1,000 VMs, then VM.OFF for them),
//!    the same kind of firewall (a PanosSim each, on loopback, over one
//!    shared-config reqwest client), and the same kv store (a `KvSession` on
//!    the runtime's redb file, committed with an fsync at the end of the
//!    call). Wasm and native alternate. A third column runs the native logic
//!    against an in-memory kv and a canned firewall answer: the floor.
//! 3. Requests and commits at the firewall for batches of 1,000 VM events.
//!
//! `cargo bench -p prismhook --bench wasm`
//!
//! For a profile, `PRISMHOOK_BENCH_PROFILE` runs one workload in a loop
//! instead of the tables, for `PRISMHOOK_BENCH_SECONDS` (20): `probe` or
//! `paloalto` (section 1's call), or `batches` (section 2's Wasm side,
//! batches of 256 VM.ON then VM.OFF, built before the loop). It keeps the
//! compiled components in the cache directory it prints, where `perf
//! report` reads the guest functions' names:
//! `PRISMHOOK_BENCH_PROFILE=batches perf record -g -D 5000 target/release/deps/wasm-… --bench`

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prismhook::nutanix::payload::parse_notification;
use prismhook::runtime::bindings::Vm as WitVm;
use prismhook::runtime::bindings::{Event, Outcome};
use prismhook::runtime::kv_store::{KvSession, KvStore};
use prismhook::runtime::policy::{InjectedHeader, OriginRule, OutboundPolicy};
use prismhook::runtime::{Plugin, PluginSettings, Runtime, RuntimeOptions};
use prismhook::secret::Secret;
use prismhook_plugin_paloalto as pa;
use prismhook_sim::panos::{PanosConfig, PanosSim};

use common::*;

const BATCH: u64 = 1000;

fn paloalto_settings(panos: &PanosSim) -> PluginSettings {
    let fw = panos.base_url();
    let origin = OriginRule::parse(&fw).unwrap();
    PluginSettings {
        config: serde_json::json!({ "firewall": fw }),
        policy: OutboundPolicy::new(
            vec![origin.clone()],
            vec![InjectedHeader {
                origin,
                name: http::HeaderName::from_static("x-pan-key"),
                value: Secret::new(PanosConfig::default().api_key),
            }],
        ),
        ..Default::default()
    }
}

fn trivial_event(event_type: &str) -> Event {
    Event {
        id: "1".into(),
        cluster: "lab".into(),
        event_type: event_type.into(),
        entity_kind: "subnet".into(),
        entity_uuid: "00000000-0000-4000-8000-000000000001".into(),
        attempt: 1,
        received_at_ms: 0,
        body: "{}".into(),
        vm: None,
    }
}

/// One event per VM of series `series`, rendered from `template` and parsed
/// the way the dispatcher hands it over.
fn vm_events(
    template: &VmTemplate,
    series: u32,
    count: u64,
    event_type: &str,
    first_id: u64,
) -> Vec<Event> {
    (0..count)
        .map(|n| {
            let body = template.render(series, n);
            let note = parse_notification(body.as_bytes()).expect("fixture parses");
            Event {
                id: (first_id + n).to_string(),
                cluster: "lab".into(),
                event_type: event_type.into(),
                entity_kind: note.entity_kind,
                entity_uuid: note.entity_uuid,
                attempt: 1,
                received_at_ms: 0,
                body,
                vm: note.vm.as_ref().map(WitVm::from),
            }
        })
        .collect()
}

// ------------------------------------------------------------ native host

/// The same conversion the component does at its edge (lib.rs).
fn native_event(e: Event) -> pa::host::Event {
    pa::host::Event {
        id: e.id,
        cluster: e.cluster,
        event_type: e.event_type,
        entity_uuid: e.entity_uuid,
        vm: e.vm.map(|vm| pa::host::Vm {
            uuid: vm.uuid,
            name: vm.name,
            power_state: vm.power_state,
            categories: vm
                .categories
                .into_iter()
                .map(|c| (c.key, c.value))
                .collect(),
            nics: vm.nics.into_iter().map(|n| n.ips).collect(),
            // The benchmark's templates do not name it, so the component
            // asks the host for none either.
            cluster_name: None,
        }),
    }
}

/// The host imports, natively: the runtime's kv session and a reqwest
/// client that adds the firewall key, as the Wasm host's imports do.
struct NativeHost {
    kv: KvSession,
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
    key: String,
    requests: u32,
}

impl pa::host::Host for NativeHost {
    fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.kv.get(key).map_err(|e| e.to_string())
    }
    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.kv
            .set(key.to_owned(), value.to_vec())
            .map_err(|e| e.to_string())
    }
    fn kv_delete(&mut self, key: &str) -> Result<(), String> {
        self.kv.delete(key.to_owned()).map_err(|e| e.to_string())
    }
    fn kv_list_after(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, String> {
        self.kv
            .list_keys_after(prefix, after, limit as usize)
            .map_err(|e| e.to_string())
    }
    fn send(
        &mut self,
        request: pa::host::Request,
    ) -> Result<pa::host::Response, pa::host::HttpError> {
        self.requests += 1;
        let mut req = self
            .client
            .request(
                http::Method::from_bytes(request.method.as_bytes()).unwrap(),
                &request.url,
            )
            .header("x-pan-key", &self.key)
            .timeout(Duration::from_secs(5))
            .body(request.body);
        for (k, v) in &request.headers {
            req = req.header(k, v);
        }
        self.rt.block_on(async move {
            let resp = req
                .send()
                .await
                .map_err(|e| pa::host::HttpError::Other(e.to_string()))?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = resp
                .bytes()
                .await
                .map_err(|e| pa::host::HttpError::Other(e.to_string()))?
                .to_vec();
            Ok(pa::host::Response {
                status,
                headers,
                body,
            })
        })
    }
    fn log(&mut self, level: pa::host::Level, message: &str) {
        match level {
            pa::host::Level::Debug => tracing::debug!(plugin = "paloalto-native", "{message}"),
            pa::host::Level::Info => tracing::info!(plugin = "paloalto-native", "{message}"),
            pa::host::Level::Warn => tracing::warn!(plugin = "paloalto-native", "{message}"),
        }
    }
}

/// In-memory kv and a firewall that accepts everything: the logic alone.
#[derive(Default)]
struct FakeHost {
    kv: BTreeMap<String, Vec<u8>>,
    requests: u32,
}

const UID_OK: &[u8] = b"<response status=\"success\"><result><uid-response><version>1.0</version><payload/></uid-response></result></response>";

impl pa::host::Host for FakeHost {
    fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.kv.get(key).cloned())
    }
    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.kv.insert(key.to_owned(), value.to_vec());
        Ok(())
    }
    fn kv_delete(&mut self, key: &str) -> Result<(), String> {
        self.kv.remove(key);
        Ok(())
    }
    fn kv_list_after(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, String> {
        Ok(self
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit as usize)
            .map(|(k, _)| k.clone())
            .collect())
    }
    fn send(
        &mut self,
        request: pa::host::Request,
    ) -> Result<pa::host::Response, pa::host::HttpError> {
        self.requests += 1;
        std::hint::black_box(&request.body);
        Ok(pa::host::Response {
            status: 200,
            headers: vec![],
            body: UID_OK.to_vec(),
        })
    }
    fn log(&mut self, _level: pa::host::Level, message: &str) {
        std::hint::black_box(message);
    }
}

struct Native {
    kv: KvStore,
    client: reqwest::Client,
    config: Arc<str>,
}

impl Native {
    async fn handle(&self, events: Vec<Event>) -> Vec<pa::host::Outcome> {
        let (kv, client, config) = (self.kv.clone(), self.client.clone(), self.config.clone());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // The component parses its configuration in init, on every call.
            let config = pa::config::Config::parse(&config).expect("config");
            let events: Vec<pa::host::Event> = events.into_iter().map(native_event).collect();
            let mut host = NativeHost {
                kv: kv.session("paloalto-native", u64::MAX),
                client,
                rt,
                key: PanosConfig::default().api_key,
                requests: 0,
            };
            let out = pa::handler::handle(&config, &mut host, &events);
            host.kv.commit().expect("kv commit");
            out
        })
        .await
        .unwrap()
    }
}

/// One workload in a loop, for a profiler (see the module documentation).
async fn profile(workload: &str, probe: &Plugin, paloalto: &Plugin) {
    let seconds: u64 = env_number("PRISMHOOK_BENCH_SECONDS", 20);
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut events = 0u64;
    match workload {
        "probe" | "paloalto" => {
            let (plugin, event_type) = if workload == "probe" {
                (probe, "TEST.REJECT")
            } else {
                (paloalto, "SUBNET.CREATE")
            };
            while Instant::now() < until {
                let out = plugin.handle(vec![trivial_event(event_type)]).await;
                std::hint::black_box(out.expect("a trivial call"));
                events += 1;
            }
        }
        "batches" => {
            let template = VmTemplate::load(&fixtures_dir().join("vm_update_nic_ip.json"));
            let batches: Vec<_> = (0..20u32)
                .flat_map(|series| {
                    [
                        vm_events(&template, 100 + series, 256, "VM.ON", 1),
                        vm_events(&template, 100 + series, 256, "VM.OFF", 257),
                    ]
                })
                .collect();
            'run: loop {
                for batch in &batches {
                    if Instant::now() >= until {
                        break 'run;
                    }
                    timed_wasm(paloalto, batch.clone()).await;
                    events += batch.len() as u64;
                }
            }
        }
        other => {
            panic!("PRISMHOOK_BENCH_PROFILE: no workload `{other}` (probe, paloalto, batches)")
        }
    }
    println!(
        "{workload}: {events} events in {:.1} s, {:.2} µs per event",
        started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64() * 1e6 / events.max(1) as f64
    );
}

async fn timed_wasm(plugin: &Plugin, events: Vec<Event>) -> Duration {
    let started = Instant::now();
    let out = plugin.handle(events).await.expect("wasm handle");
    let took = started.elapsed();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Done)),
        "{:?}",
        &out[..1]
    );
    took
}

async fn timed_native(native: &Native, events: Vec<Event>) -> Duration {
    let started = Instant::now();
    let out = native.handle(events).await;
    let took = started.elapsed();
    assert!(
        out.iter().all(|o| matches!(o, pa::host::Outcome::Done)),
        "{:?}",
        &out[..1]
    );
    took
}

fn row(label: &str, samples: &[f64]) {
    let s = sorted(samples.to_vec());
    println!(
        "| {label:<42} | {:>9} | {:>9} | {:>9} | {:>6} |",
        us(percentile(&s, 50.0)),
        us(percentile(&s, 99.0)),
        us(s.iter().sum::<f64>() / s.len() as f64),
        s.len()
    );
}

#[tokio::main]
async fn main() {
    init_tracing();
    println!("# prismhook bench: wasm runtime (issue 2)");
    machine_note();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RuntimeOptions::new(dir.path().join("kv.redb"));
    opts.cache_dir = Some(dir.path().join("cache"));
    let runtime = Runtime::new(opts).unwrap();

    let panos_wasm = PanosSim::start("127.0.0.1:0".parse().unwrap(), PanosConfig::default())
        .await
        .unwrap();
    let panos_native = PanosSim::start("127.0.0.1:0".parse().unwrap(), PanosConfig::default())
        .await
        .unwrap();
    // As the host serves them once their snapshot after init is made.
    let probe = runtime
        .load(&component("probe"), PluginSettings::default())
        .await
        .unwrap();
    let probe = runtime.pre_initialise(probe).await;
    let paloalto = runtime
        .load(&component("paloalto"), paloalto_settings(&panos_wasm))
        .await
        .unwrap();
    let paloalto = runtime.pre_initialise(paloalto).await;
    println!(
        "components: probe.wasm {} KiB, paloalto.wasm {} KiB (built with LTO by `cargo xtask plugins`, both at opt-level 3, \
         the native side this bench profile, opt-level 3 too)",
        probe.size() >> 10,
        paloalto.size() >> 10
    );

    if let Ok(workload) = std::env::var("PRISMHOOK_BENCH_PROFILE") {
        profile(&workload, &probe, &paloalto).await;
        println!(
            "compiled components (for perf's symbols) kept in {}",
            dir.keep().join("cache").display()
        );
        return;
    }

    // ------------------------------------------------------------ 1
    println!("\n## 1. Instantiate per call: fresh Store + instantiate + init + handle(1 trivial event) + drop");
    println!(
        "pre-initialised (no init per call, the instance starts from the snapshot after init): probe {}, paloalto {}",
        probe.pre_initialised(),
        paloalto.pre_initialised()
    );
    println!("probe gets TEST.REJECT (answers reject, no kv, no http); paloalto gets SUBNET.CREATE (not a VM event: done, no kv, no http)");
    let (mut t_probe, mut t_pa) = (Vec::new(), Vec::new());
    let iterations = 4000;
    for i in 0..(iterations + 300) {
        let order: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_probe in order {
            let (plugin, ev, into) = if is_probe {
                (&probe, "TEST.REJECT", &mut t_probe)
            } else {
                (&paloalto, "SUBNET.CREATE", &mut t_pa)
            };
            let started = Instant::now();
            let out = plugin.handle(vec![trivial_event(ev)]).await.unwrap();
            let took = started.elapsed().as_secs_f64() * 1e6;
            std::hint::black_box(out);
            if i >= 300 {
                into.push(took);
            }
        }
    }
    println!(
        "| {:<42} | {:>9} | {:>9} | {:>9} | {:>6} |",
        "per call", "p50", "p99", "mean", "calls"
    );
    println!(
        "|{:-<44}|{:-<11}|{:-<11}|{:-<11}|{:-<8}|",
        "", "", "", "", ""
    );
    row("probe.wasm", &t_probe);
    row("paloalto.wasm", &t_pa);

    // ------------------------------------------------------------ 2
    println!("\n## 2. Per-event cost of handle: Palo Alto plugin through Wasm vs natively, same batches, same I/O");
    let template = VmTemplate::load(&fixtures_dir().join("vm_update_nic_ip.json"));
    let native = Native {
        kv: runtime.kv().clone(),
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        config: serde_json::json!({ "firewall": panos_native.base_url() })
            .to_string()
            .into(),
    };
    println!(
        "batches: one event per VM, from vm_update_nic_ip.json (2 NICs, 2 IPs, 2 categories → 3 tags per IP), \
         first all VM.ON then all VM.OFF for the same VMs; each side has its own PanosSim; kv = KvSession on the \
         same redb file, committed (fsync) per call; wasm and native alternate, 12 rounds"
    );
    println!("\n| batch | events | wasm per event | native per event, same I/O | ratio wasm/native | native, in-memory host | wasm whole batch | native whole batch |");
    println!("|---|---|---|---|---|---|---|---|");
    let config = pa::config::Config::parse(
        &serde_json::json!({ "firewall": "https://fw.example" }).to_string(),
    )
    .unwrap();
    for (size, series) in [(256u64, 10u32), (BATCH, 1)] {
        let on_w = vm_events(&template, series, size, "VM.ON", 1);
        let off_w = vm_events(&template, series, size, "VM.OFF", 1 + size);
        let on_n = vm_events(&template, series + 1, size, "VM.ON", 1);
        let off_n = vm_events(&template, series + 1, size, "VM.OFF", 1 + size);
        // Warm up both (connections, caches); check they did the work.
        timed_wasm(&paloalto, on_w.clone()).await;
        let after_on = panos_wasm.stats().registered_entries;
        timed_wasm(&paloalto, off_w.clone()).await;
        timed_native(&native, on_n.clone()).await;
        let after_on_n = panos_native.stats().registered_entries;
        timed_native(&native, off_n.clone()).await;
        assert_eq!(
            (after_on, after_on_n),
            (size * 6, size * 6),
            "each VM registers 2 IPs × 3 tags"
        );
        assert_eq!(
            (
                panos_wasm.stats().registered_entries,
                panos_native.stats().registered_entries
            ),
            (0, 0)
        );

        let (mut w_on, mut w_off, mut n_on, mut n_off) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..12 {
            for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                if side == 0 {
                    w_on.push(timed_wasm(&paloalto, on_w.clone()).await.as_secs_f64() * 1e6);
                    w_off.push(timed_wasm(&paloalto, off_w.clone()).await.as_secs_f64() * 1e6);
                } else {
                    n_on.push(timed_native(&native, on_n.clone()).await.as_secs_f64() * 1e6);
                    n_off.push(timed_native(&native, off_n.clone()).await.as_secs_f64() * 1e6);
                }
            }
        }
        // The logic alone, natively, with kv in memory and a canned answer.
        let mut fake = FakeHost::default();
        let (mut f_on, mut f_off) = (Vec::new(), Vec::new());
        for _ in 0..24 {
            for (events, into) in [(&on_n, &mut f_on), (&off_n, &mut f_off)] {
                let events = events.clone();
                let started = Instant::now();
                let ev: Vec<pa::host::Event> = events.into_iter().map(native_event).collect();
                let out = pa::handler::handle(&config, &mut fake, &ev);
                into.push(started.elapsed().as_secs_f64() * 1e6);
                assert!(out.iter().all(|o| matches!(o, pa::host::Outcome::Done)));
            }
        }
        let per = |v: &[f64]| median(v) / size as f64;
        for (label, w, n, f) in [
            ("VM.ON", &w_on, &n_on, &f_on),
            ("VM.OFF", &w_off, &n_off, &f_off),
        ] {
            println!(
                "| {size} | {label} | {} | {} | {:.2}× | {} | {} | {} |",
                us(per(w)),
                us(per(n)),
                per(w) / per(n),
                us(per(f)),
                us(median(w)),
                us(median(n))
            );
        }
    }

    // How the plugin's own logic scales with the batch (native, in memory).
    println!("\nnative logic alone (in-memory host), per event, VM.ON then VM.OFF, by batch size:");
    println!("| batch | VM.ON per event | VM.OFF per event |");
    println!("|---|---|---|");
    for size in [16u64, 64, 256, 1000] {
        let on = vm_events(&template, 20, size, "VM.ON", 1);
        let off = vm_events(&template, 20, size, "VM.OFF", 1 + size);
        let mut fake = FakeHost::default();
        let (mut t_on, mut t_off) = (Vec::new(), Vec::new());
        let reps = (8000 / size).clamp(10, 200);
        for _ in 0..reps {
            for (events, into) in [(&on, &mut t_on), (&off, &mut t_off)] {
                let ev: Vec<pa::host::Event> =
                    events.clone().into_iter().map(native_event).collect();
                let started = Instant::now();
                std::hint::black_box(pa::handler::handle(&config, &mut fake, &ev));
                into.push(started.elapsed().as_secs_f64() * 1e6 / size as f64);
            }
        }
        println!(
            "| {size} | {} | {} |",
            us(median(&t_on)),
            us(median(&t_off))
        );
    }

    // ------------------------------------------------------------ 3
    println!("\n## 3. Firewall requests and commits per batch of {BATCH} VM events (one handle call, Wasm plugin)");
    let panos_count = PanosSim::start("127.0.0.1:0".parse().unwrap(), PanosConfig::default())
        .await
        .unwrap();
    let counted = runtime
        .load(&component("paloalto"), paloalto_settings(&panos_count))
        .await
        .unwrap();
    let counted = runtime.pre_initialise(counted).await;
    let mixed: Vec<Event> = {
        // 250 VMs × a lifecycle of four notifications, interleaved as they
        // would arrive: create, power on, update (2nd NIC + categories), NIC plug.
        let names = [
            "vm_create.json",
            "vm_on.json",
            "vm_update_nic_ip.json",
            "vm_nic_plug.json",
        ];
        let types = ["VM.CREATE", "VM.ON", "VM.UPDATE", "VM.NIC_PLUG"];
        let ts: Vec<VmTemplate> = names
            .iter()
            .map(|n| VmTemplate::load(&fixtures_dir().join(n)))
            .collect();
        let mut v = Vec::new();
        for step in 0..4 {
            let mut evs = vm_events(&ts[step], 4, 250, types[step], 1 + step as u64 * 250);
            v.append(&mut evs);
        }
        v
    };
    println!(
        "| batch | events | firewall requests | uid-messages | commits | ip-tag entries after |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, events) in [
        (
            "1,000 × VM.ON, distinct VMs",
            vm_events(&template, 3, BATCH, "VM.ON", 1),
        ),
        (
            "1,000 × VM.OFF, same VMs",
            vm_events(&template, 3, BATCH, "VM.OFF", 1 + BATCH),
        ),
        ("1,000 mixed: 250 VMs × CREATE, ON, UPDATE, NIC_PLUG", mixed),
    ] {
        let before = panos_count.stats();
        let n = events.len();
        let out = counted.handle(events).await.unwrap();
        assert!(out.iter().all(|o| matches!(o, Outcome::Done)));
        let after = panos_count.stats();
        println!(
            "| {label} | {n} | {} | {} | {} | {} |",
            after.requests - before.requests,
            after.uid_messages - before.uid_messages,
            after.commits - before.commits,
            after.registered_entries
        );
    }
    println!("| 2017 reference (per docs), 1,000 events | 1000 | ~7000 | – | ~1000 | – |");
    println!("(through the dispatcher a burst is cut into batches of delivery.batch_max = 256, so 1,000 events are ≥ 4 requests)");
}
