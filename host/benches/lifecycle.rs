//! Figures of the host's life cycle, and of the four guest languages.
//!
//! 1. Reload latency: a running host (`App`, `plugins.watch = true`) gets a
//!    new paloalto.wasm (other bytes: a custom section appended) together
//!    with a new `paloalto.toml` whose `static_tag` names the reload
//!    (`ntnx.rNNN`), while notifications arrive at a steady rate through the
//!    listener. Measured from the file being in place (rename done) to
//!    (a) the new version being in the registry and (b) the first firewall
//!    request carrying the new tag, i.e. the first event handled by the new
//!    version. First with never-seen bytes (Cranelift compiles), then
//!    alternating two already-compiled versions (cache hits).
//! 2. Events lost across those reloads: 202 answers counted by the sender
//!    versus addresses registered at the PAN-OS simulator (one distinct VM
//!    and IP per notification) once the ledger has drained.
//! 3. Start-up to ready with paloalto (Rust), f5-bigip (Python) and
//!    forwarder (JavaScript): `App::start` returning, the listener answering,
//!    and the cluster registered; cold (empty data directory, so every
//!    component is compiled) versus warm (restart on the same data
//!    directory: compiled components come from the cache).
//!    Beside it, each component's compile time with Winch (the first tier)
//!    and with Cranelift, on an idle host (`compilers`).
//! 4. The four languages side by side on one `Runtime`: instantiate per
//!    call (a non-VM event: no kv, no http) and per-event cost of VM.ON /
//!    VM.OFF batches, each plugin against its simulator or receiver; then
//!    the F5 plugin's logic under the machine's `python3`, sending the same
//!    requests to the same simulator (`plugins/f5-bigip/bench.py --bigip`).
//! 5. Resident memory of the real `prismhook run` binary with the four
//!    plugins: idle, and under a paced 1,000 notifications/s for 20 s.
//! 6. Idle CPU of the real binary with the watcher on and a plugin whose
//!    `init` refuses its settings (`idle`).
//! 7. A fleet (`fleet`): the real binary feeding 1 and then 4 instances of
//!    the Palo Alto component, each its own PAN-OS simulator, a burst of
//!    1,000 VM.ON notifications: requests and commits per firewall, time
//!    until every firewall holds every address, and the host's memory per
//!    added instance.
//!
//! 8. A burst through the four languages (`burst`): the real binary with
//!    the four plugins, 1,000 VM.ON notifications as fast as the listener
//!    takes them: requests each plugin made to its system, and when each
//!    system held all 1,000 VMs.
//!
//! `cargo bench -p prismhook --bench lifecycle`

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use prismhook::app::App;
use prismhook::config::Config;
use prismhook::nutanix::payload::parse_notification;
use prismhook::reload::Report;
use prismhook::runtime::bindings::Vm as WitVm;
use prismhook::runtime::bindings::{Event, Outcome};
use prismhook::runtime::{Plugin, Runtime, RuntimeOptions, Tier};
use prismhook_sim::bigip::{BigipConfig, BigipSim};
use prismhook_sim::fmc::FmcSim;
use prismhook_sim::panos::PanosSim;
use prismhook_sim::prism::PrismSim;

use common::setup::{self, Cluster, HostConfig};
use common::*;

const POOL: &str = "/Common/web";
const LANGS: [(&str, &str); 4] = [
    ("paloalto", "Rust"),
    ("f5-bigip", "Python"),
    ("forwarder", "JavaScript"),
    ("cisco-fmc", "Go"),
];

// ------------------------------------------------------------ the world

/// A stand-in SIEM for the forwarder: counts the JSON events posted to it,
/// and the posts.
async fn start_receiver(events: Arc<AtomicU64>, posts: Arc<AtomicU64>) -> SocketAddr {
    let app = axum::Router::new().route(
        "/ingest",
        post(move |body: axum::body::Bytes| {
            let (events, posts) = (events.clone(), posts.clone());
            async move {
                posts.fetch_add(1, Ordering::Relaxed);
                let n = match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(serde_json::Value::Array(a)) => a.len() as u64,
                    Ok(_) => 1,
                    Err(_) => return axum::http::StatusCode::BAD_REQUEST,
                };
                events.fetch_add(n, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        }),
    );
    serve(app).await
}

struct World {
    prism: PrismSim,
    panos: PanosSim,
    bigip: BigipSim,
    fmc: FmcSim,
    siem_url: String,
    siem_events: Arc<AtomicU64>,
    siem_posts: Arc<AtomicU64>,
}

async fn world() -> World {
    let siem_events = Arc::new(AtomicU64::new(0));
    let siem_posts = Arc::new(AtomicU64::new(0));
    let siem_url = format!(
        "http://{}",
        start_receiver(siem_events.clone(), siem_posts.clone()).await
    );
    World {
        prism: setup::start_prism().await,
        panos: setup::start_panos().await,
        bigip: BigipSim::start(
            "127.0.0.1:0".parse().unwrap(),
            BigipConfig {
                pools: vec![POOL.into()],
                ..Default::default()
            },
        )
        .await
        .unwrap(),
        fmc: setup::start_fmc().await,
        siem_url,
        siem_events,
        siem_posts,
    }
}

/// What the host injects into the F5 plugin's requests: the BIG-IP
/// simulator's own (default) credentials.
fn bigip_authorization() -> String {
    let sim = BigipConfig::default();
    basic_auth(&sim.user, &sim.password)
}

impl World {
    /// The four plugins' tables (applied to the files present in the
    /// plugins directory) and cluster `lab`.
    fn host(&self, data: &Path, plugins: &Path, watch: bool) -> HostConfig {
        let lb = self.bigip.base_url();
        let siem = &self.siem_url;
        HostConfig::new(data)
            .instance("bench")
            .dirs(data, plugins)
            .watch(watch)
            .paloalto(&self.panos)
            .plugin(
                "f5-bigip",
                &[
                    &format!(r#"config = {{ bigip = "{lb}", port = 8080, category = "F5Pool" }}"#),
                    &format!(r#"allow = ["{lb}"]"#),
                    &format!(r#"inject = [{{ origin = "{lb}", header = "Authorization", value = "{}" }}]"#, bigip_authorization()),
                ],
            )
            .plugin(
                "forwarder",
                &[
                    &format!(r#"config = {{ url = "{siem}/ingest", events = ["VM.*"], fields = ["id", "event_type", "entity_uuid", "attempt", "vm"] }}"#),
                    &format!(r#"allow = ["{siem}"]"#),
                    &format!(r#"inject = [{{ origin = "{siem}", header = "Authorization", value = "Bearer siem-token" }}]"#),
                ],
            )
            .cisco_fmc(&self.fmc, "")
            .cluster(Cluster {
                webhook_password: Some(WEBHOOK_PASSWORD.into()),
                extra: vec![format!("webhook_user = {WEBHOOK_USER:?}")],
                ..Cluster::lab(&self.prism)
            })
    }

    fn config_text(
        &self,
        data: &Path,
        plugins: &Path,
        watch: bool,
        listen: &str,
        admin: &str,
    ) -> String {
        self.host(data, plugins, watch)
            .listen(listen)
            .admin_listen(admin)
            .toml()
    }

    fn config(&self, data: &Path, plugins: &Path, watch: bool) -> Config {
        self.host(data, plugins, watch).config()
    }
}

/// vm_on.json with the VM in the load balancer's pool category, so that
/// every plugin has work for it (firewall tag, pool member, forwarded).
fn vm_on_template() -> VmTemplate {
    let text = std::fs::read_to_string(fixtures_dir().join("vm_on.json")).unwrap();
    assert_eq!(
        text.matches("\"categories\": {}").count(),
        1,
        "vm_on.json changed shape"
    );
    let text = text.replace(
        "\"categories\": {}",
        "\"categories\": {\"F5Pool\": \"web\"}",
    );
    VmTemplate::from_text("vm_on.json+F5Pool".into(), &text)
}

async fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Steady open-loop sender: one notification (a distinct VM each) every
/// `1/per_s` until stopped; counts the 202 answers.
struct Sender {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    other: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn start_sender(
    client: reqwest::Client,
    url: String,
    per_s: u64,
    series: u32,
    template: VmTemplate,
) -> Sender {
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let (stop, accepted, other) = (stop.clone(), accepted.clone(), other.clone());
        async move {
            let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / per_s));
            let mut inflight = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let req = client
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .body(template.render(series, n));
                n += 1;
                let (accepted, other) = (accepted.clone(), other.clone());
                inflight.spawn(async move {
                    let ok = match req.send().await {
                        Ok(r) => r.status() == reqwest::StatusCode::ACCEPTED,
                        Err(_) => false,
                    };
                    if ok { accepted } else { other }.fetch_add(1, Ordering::Relaxed);
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        }
    });
    Sender {
        stop,
        accepted,
        other,
        task,
    }
}

impl Sender {
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.accepted.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

/// The component with a custom section appended: other bytes (and sha256),
/// same behaviour — a "new version" of the file.
fn variant(name: &str, n: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(component(name)).unwrap();
    let section_name = b"prismhook-bench-variant";
    let mut section = vec![section_name.len() as u8];
    section.extend_from_slice(section_name);
    section.extend_from_slice(&n.to_le_bytes());
    bytes.push(0);
    bytes.push(section.len() as u8);
    bytes.extend_from_slice(&section);
    bytes
}

/// Writes a file in one step, as a careful deployer would.
fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

fn pct_row(label: &str, n: usize, a: &[f64], b: &[f64]) {
    let (a, b) = (sorted(a.to_vec()), sorted(b.to_vec()));
    println!(
        "| {label} | {n} | {} | {} | {} | {} | {} |",
        us(percentile(&a, 50.0)),
        us(percentile(&a, 90.0)),
        us(percentile(&b, 50.0)),
        us(percentile(&b, 90.0)),
        us(*b.last().unwrap_or(&f64::NAN)),
    );
}

// ------------------------------------------------------------ 1 + 2

async fn reloads(w: &World, client: &reqwest::Client) {
    println!("\n## 1. Reload latency: new paloalto.wasm + paloalto.toml renamed into a watched plugins directory, under 500 notifications/s");
    println!(
        "(the reload task waits {} ms after a rename into place, {} ms after a write in place; new bytes serve with Winch's code first)",
        prismhook::reload::SETTLE.as_millis(),
        prismhook::reload::DEBOUNCE.as_millis()
    );
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let fw = w.panos.base_url();
    // The firewall's key is the main configuration's to inject (a settings
    // file in the plugins directory may not name secrets).
    let toml_for = |k: u32| {
        format!(
            "config = {{ firewall = \"{fw}\", static_tag = \"ntnx.r{k:03}\" }}\nallow = [\"{fw}\"]\n"
        )
    };
    std::fs::write(plugins.join("paloalto.toml"), toml_for(0)).unwrap();
    install(&plugins, "paloalto.wasm", &variant("paloalto", 0));
    let app = App::start(w.config(&dir.path().join("data"), &plugins, true))
        .await
        .unwrap();
    wait_for("registration", Duration::from_secs(30), || {
        app.cluster_status().iter().all(|c| c.registered)
    })
    .await;
    let url = format!("http://{}/listener/callback/lab", app.listener_addr);
    let entries_before = w.panos.registered().len();
    let template = VmTemplate::load(&fixtures_dir().join("vm_on.json"));
    let sender = start_sender(client.clone(), url, 500, 7000, template);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sha = || {
        app.registry
            .get("paloalto")
            .and_then(|e| e.plugin)
            .map(|p| (p.sha256().to_owned(), p.from_cache()))
    };
    let tier = || {
        app.registry
            .get("paloalto")
            .and_then(|e| e.plugin)
            .map(|p| p.tier())
    };
    // 10 never-seen versions, then 12 alternating between the last two.
    let fresh = 10u32;
    let cached = 12u32;
    let (mut swap_fresh, mut first_fresh, mut swap_cached, mut first_cached) =
        (vec![], vec![], vec![], vec![]);
    let mut optimized_fresh = vec![];
    let mut not_cached_when_expected = 0;
    println!("| reload | bytes | from cache | first code | file in place → new version serving | → first event handled by it | → Cranelift's code serving |");
    println!("|---|---|---|---|---|---|---|");
    for k in 1..=(fresh + cached) {
        let v = if k <= fresh {
            k
        } else if k % 2 == 1 {
            fresh - 1
        } else {
            fresh
        };
        let (before, _) = sha().unwrap();
        let tag = format!("ntnx.r{k:03}");
        install(&plugins, "paloalto.wasm", &variant("paloalto", v));
        let t0 = Instant::now();
        install(&plugins, "paloalto.toml", toml_for(k).as_bytes());
        let mut swapped = None;
        let mut first = None;
        let mut from_cache = false;
        let mut first_tier = None;
        while first.is_none() && t0.elapsed() < Duration::from_secs(30) {
            if swapped.is_none() {
                if let Some((s, c)) = sha() {
                    if s != before {
                        swapped = Some(t0.elapsed());
                        from_cache = c;
                        first_tier = tier();
                    }
                }
            }
            if w.panos
                .requests(8)
                .iter()
                .any(|r| r.xml_cmd.as_deref().is_some_and(|x| x.contains(&tag)))
            {
                first = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let (s, f) = (
            swapped.expect("the new version loaded").as_secs_f64() * 1e6,
            first
                .expect("the new version handled an event")
                .as_secs_f64()
                * 1e6,
        );
        while tier() != Some(Tier::Optimized) && t0.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let o = t0.elapsed().as_secs_f64() * 1e6;
        let first_tier = match first_tier {
            Some(Tier::Baseline) => "Winch",
            Some(Tier::Optimized) => "Cranelift",
            None => "?",
        };
        let optimized = if first_tier == "Winch" {
            us(o)
        } else {
            "–".into()
        };
        println!(
            "| {k} | v{v} | {from_cache} | {first_tier} | {} | {} | {optimized} |",
            us(s),
            us(f)
        );
        if k <= fresh {
            swap_fresh.push(s);
            first_fresh.push(f);
            optimized_fresh.push(o);
        } else {
            if !from_cache {
                not_cached_when_expected += 1;
            }
            swap_cached.push(s);
            first_cached.push(f);
        }
        // Let the dust settle between reloads (and stay clear of the debounce).
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (accepted, other) = sender.finish().await;
    let drained = drain(&app.ledger, Duration::from_secs(60)).await;
    println!("\n| reloads | n | serving p50 | serving p90 | first event p50 | first event p90 | first event max |");
    println!("|---|---|---|---|---|---|---|");
    pct_row(
        "new bytes (compile)",
        swap_fresh.len(),
        &swap_fresh,
        &first_fresh,
    );
    pct_row(
        "known bytes (compiled-component cache)",
        swap_cached.len(),
        &swap_cached,
        &first_cached,
    );
    let o = sorted(optimized_fresh);
    println!(
        "new bytes, file in place → Cranelift's code serving: p50 {}, p90 {}, max {}",
        us(percentile(&o, 50.0)),
        us(percentile(&o, 90.0)),
        us(*o.last().unwrap_or(&f64::NAN))
    );
    if not_cached_when_expected > 0 {
        println!(
            "(!) {not_cached_when_expected} of the alternating reloads did not come from the cache"
        );
    }
    let p50 = percentile(&sorted(first_fresh.clone()), 50.0);
    let p50c = percentile(&sorted(first_cached.clone()), 50.0);
    println!(
        "target < 250 ms file → first event by the new version: new bytes p50 {} ({}), cached p50 {} ({})",
        us(p50),
        if p50 < 250_000.0 { "met" } else { "NOT met" },
        us(p50c),
        if p50c < 250_000.0 { "met" } else { "NOT met" }
    );

    println!("\n## 2. Events lost across those {} reloads (steady 500 notifications/s through the listener)", fresh + cached);
    let registered = w.panos.registered().len() - entries_before;
    let counters = app.dispatcher.counters();
    let c = &counters["paloalto"];
    println!("| 202 answers | other answers | addresses registered at the PAN-OS sim | delivered (dispatcher) | retried | rejected | lost | drained |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {accepted} | {other} | {registered} | {} | {} | {} | {} | {} |",
        c.delivered,
        c.retried,
        c.rejected,
        accepted as i64 - registered as i64,
        drained.map_or("NO (60 s)".into(), |d| format!(
            "{:.2} s after",
            d.as_secs_f64()
        ))
    );
    println!(
        "target 0 lost: {}",
        if accepted as usize == registered && other == 0 {
            "met"
        } else {
            "NOT met"
        }
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

// ------------------------------------------------------------ 3

/// One start: (App::start returned, listener answered, registered, every
/// plugin on Cranelift's code, all from the cache, how many served first
/// with Winch's code).
async fn start_once(
    w: &World,
    data: &Path,
    plugins: &Path,
    client: &reqwest::Client,
) -> (Duration, Duration, Duration, Duration, bool, usize) {
    let started = Instant::now();
    let app = App::start(w.config(data, plugins, false)).await.unwrap();
    let returned = started.elapsed();
    let url = format!("http://{}/listener/callback/lab", app.listener_addr);
    loop {
        // Any answer (401 without credentials) means it accepts.
        if client.post(&url).body("{}").send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let answering = started.elapsed();
    wait_for("registration", Duration::from_secs(30), || {
        app.cluster_status().iter().all(|c| c.registered)
    })
    .await;
    let registered = started.elapsed();
    let loaded = app
        .registry
        .snapshot()
        .iter()
        .filter(|(_, e)| e.plugin.is_some())
        .count();
    let all_cached = app
        .registry
        .snapshot()
        .iter()
        .all(|(_, e)| e.plugin.as_ref().is_some_and(|p| p.from_cache()));
    assert_eq!(loaded, 3, "{:?}", app.loaded);
    let winch = app
        .loaded
        .iter()
        .filter(|r| {
            matches!(
                r,
                Report::Loaded {
                    tier: Tier::Baseline,
                    ..
                }
            )
        })
        .count();
    wait_for_cranelift(&app).await;
    let optimized = started.elapsed();
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    (
        returned, answering, registered, optimized, all_cached, winch,
    )
}

/// Returns a data directory whose compiled-component cache is warm.
async fn startup(w: &World, client: &reqwest::Client) -> tempfile::TempDir {
    println!("\n## 3. Start-up to ready, paloalto.wasm (Rust) + f5-bigip.wasm (Python) + forwarder.wasm (JavaScript)");
    for (name, lang) in LANGS {
        println!(
            "- {name}.wasm ({lang}): {} KiB",
            std::fs::metadata(component(name)).unwrap().len() >> 10
        );
    }
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for (name, _) in LANGS {
        std::fs::copy(component(name), plugins.join(format!("{name}.wasm"))).unwrap();
    }
    let warm = tempfile::tempdir().unwrap();
    println!("| round | kind | App::start returned | listener answering | cluster registered | all on Cranelift's code | all from cache | served first by Winch |");
    println!("|---|---|---|---|---|---|---|---|");
    let (mut cold, mut hot) = (Vec::new(), Vec::new());
    // C W W C W W: cold starts compile ~30 MB of components, so fewer.
    for (round, is_cold) in [true, false, false, true, false, false]
        .into_iter()
        .enumerate()
    {
        let scratch;
        let data = if is_cold {
            scratch = tempfile::tempdir().unwrap();
            scratch.path().to_owned()
        } else {
            warm.path().to_owned()
        };
        let (r, a, g, o, cached, winch) = start_once(w, &data, &plugins, client).await;
        println!(
            "| {} | {} | {} | {} | {} | {} | {cached} | {winch} of 3 |",
            round + 1,
            if is_cold {
                "cold (empty data dir)"
            } else {
                "warm (restart)"
            },
            us(r.as_secs_f64() * 1e6),
            us(a.as_secs_f64() * 1e6),
            us(g.as_secs_f64() * 1e6),
            us(o.as_secs_f64() * 1e6)
        );
        // The very first warm round fills the warm cache: not a warm start.
        if round == 1 {
            continue;
        }
        if is_cold { &mut cold } else { &mut hot }.push((r, a, g, o));
    }
    type Start = (Duration, Duration, Duration, Duration);
    let med = |v: &[Start], f: fn(&Start) -> Duration| {
        median(
            &v.iter()
                .map(|x| f(x).as_secs_f64() * 1e6)
                .collect::<Vec<_>>(),
        )
    };
    println!("\n| start | n | App::start returned (median) | listener answering | registered | all on Cranelift's code |");
    println!("|---|---|---|---|---|---|");
    for (label, v) in [("cold", &cold), ("warm", &hot)] {
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            v.len(),
            us(med(v, |x| x.0)),
            us(med(v, |x| x.1)),
            us(med(v, |x| x.2)),
            us(med(v, |x| x.3))
        );
    }
    println!(
        "warm/cold (listener answering): {:.3}×  (round 2 warmed the cache and is not counted)",
        med(&hot, |x| x.1) / med(&cold, |x| x.1)
    );
    warm
}

/// Each component compiled by Winch and by Cranelift (no cache), as the
/// runtime compiles them: the two tiers' costs side by side.
fn compilers() {
    println!("\n## 3a. Compile time by tier (idle host, no cache; median of the runs)");
    let scratch = tempfile::tempdir().unwrap();
    let runtime = |tiered| {
        let mut opts = RuntimeOptions::new(scratch.path().join(format!("kv-{tiered}.redb")));
        opts.tiered = tiered;
        Runtime::new(opts).unwrap()
    };
    let (winch, cranelift) = (runtime(true), runtime(false));
    println!("| component | size | runs | Winch | Cranelift | Cranelift / Winch |");
    println!("|---|---|---|---|---|---|");
    for (name, lang) in LANGS {
        let file = component(name);
        let runs = if name == "paloalto" { 5 } else { 2 };
        let time = |rt: &Runtime, want: Tier| {
            let mut t = Vec::new();
            for _ in 0..runs {
                let started = Instant::now();
                let c = rt.compile_file(&file, None).unwrap();
                t.push(started.elapsed().as_secs_f64() * 1e6);
                assert_eq!(c.tier(), want, "{name}");
            }
            median(&t)
        };
        let (w, c) = (
            time(&winch, Tier::Baseline),
            time(&cranelift, Tier::Optimized),
        );
        let size = std::fs::metadata(&file).unwrap().len() >> 10;
        println!(
            "| {name} ({lang}) | {size} KiB | {runs} | {} | {} | {:.1}× |",
            us(w),
            us(c),
            c / w
        );
    }
}

/// The same plugin running Winch's code and Cranelift's, side by side: what
/// a plugin pays in the seconds before Cranelift's code takes over.
async fn tier_speed(w: &World) {
    println!("\n## 3b. Per-event cost by tier: each plugin loaded once with Winch's code and once with Cranelift's (same file, same settings), alternating, 12 rounds (2 warm-up)");
    let scratch = tempfile::tempdir().unwrap();
    let mut opts = RuntimeOptions::new(scratch.path().join("kv.redb"));
    opts.tiered = true;
    let runtime = Runtime::new(opts).unwrap();
    let config = w.config(scratch.path(), scratch.path(), false);
    let template = vm_on_template();
    println!("| plugin | events per call | Winch, per event (VM.ON / VM.OFF) | Cranelift, per event | Winch / Cranelift |");
    println!("|---|---|---|---|---|");
    let mut id = 1u64;
    for (j, (name, lang)) in LANGS.iter().enumerate() {
        let winch = runtime
            .load(
                &component(name),
                config.plugin_settings(name, None).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(winch.tier(), Tier::Baseline, "{name}");
        let code = runtime
            .optimizer()
            .unwrap()
            .compile(&winch.source().unwrap())
            .unwrap();
        let cranelift = runtime.upgrade(&winch, code).await.unwrap();
        let tiers = [&winch, &cranelift];
        // The F5 plugin makes one request per VM (the host allows 16 a
        // call): keep its batches small. The others send one per batch.
        let size = if *name == "f5-bigip" { 10 } else { 256 };
        let (mut on_t, mut off_t) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for round in 0..12u32 {
            for k in 0..2 {
                let t = (round as usize + k) % 2;
                let series = 7000 + round * 8 + j as u32 * 2 + t as u32;
                let on: Vec<Event> = (0..size)
                    .map(|n| note_event(&template, series, n, "VM.ON", id + n))
                    .collect();
                let off: Vec<Event> = (0..size)
                    .map(|n| note_event(&template, series, n, "VM.OFF", id + size + n))
                    .collect();
                id += 2 * size;
                let started = Instant::now();
                let out = tiers[t].handle(on).await.unwrap();
                let t_on = started.elapsed().as_secs_f64() * 1e6 / size as f64;
                let started = Instant::now();
                let out_off = tiers[t].handle(off).await.unwrap();
                let t_off = started.elapsed().as_secs_f64() * 1e6 / size as f64;
                assert!(
                    out.iter()
                        .chain(&out_off)
                        .all(|o| matches!(o, Outcome::Done)),
                    "{name}: {out:?}"
                );
                if round >= 2 {
                    on_t[t].push(t_on);
                    off_t[t].push(t_off);
                }
            }
        }
        let (w_on, w_off, c_on, c_off) = (
            median(&on_t[0]),
            median(&off_t[0]),
            median(&on_t[1]),
            median(&off_t[1]),
        );
        println!(
            "| {name} ({lang}) | {size} | {} / {} | {} / {} | {:.1}× |",
            us(w_on),
            us(w_off),
            us(c_on),
            us(c_off),
            (w_on + w_off) / (c_on + c_off)
        );
    }
}

/// Compiles the four components into the persistent cache (or copies a
/// freshly warmed one there).
fn fill_cache(from_or_into: &Path) {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-data/cache");
    std::fs::create_dir_all(&cache).unwrap();
    if from_or_into != cache {
        for e in std::fs::read_dir(from_or_into).unwrap().flatten() {
            let _ = std::fs::copy(e.path(), cache.join(e.file_name()));
        }
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut options = RuntimeOptions::new(scratch.path().join("kv.redb"));
    options.cache_dir = Some(cache);
    let runtime = Runtime::new(options).unwrap();
    for (name, _) in LANGS {
        let started = Instant::now();
        let c = runtime.compile_file(&component(name), None).unwrap();
        println!(
            "compiled-component cache: {name} {} in {:.1} s",
            if c.from_cache { "found" } else { "compiled" },
            started.elapsed().as_secs_f64()
        );
    }
}

// ------------------------------------------------------------ 4

fn note_event(template: &VmTemplate, series: u32, n: u64, event_type: &str, id: u64) -> Event {
    let mut body = template.render(series, n);
    if event_type == "VM.OFF" {
        body = body
            .replace("\"power_state\": \"ON\"", "\"power_state\": \"OFF\"")
            .replace("\"VM.ON\"", "\"VM.OFF\"");
    }
    let note = parse_notification(body.as_bytes()).unwrap();
    Event {
        id: id.to_string(),
        cluster: "lab".into(),
        event_type: event_type.into(),
        entity_kind: note.entity_kind,
        entity_uuid: note.entity_uuid,
        attempt: 1,
        received_at_ms: 0,
        body,
        vm: note.vm.as_ref().map(WitVm::from),
    }
}

async fn languages(w: &World, warm_data: &Path) {
    println!("\n## 4. The four languages side by side (one Runtime, pooling allocator, compiled components from the cache)");
    let n = LANGS.len();
    let scratch = tempfile::tempdir().unwrap();
    let mut opts = RuntimeOptions::new(scratch.path().join("kv.redb"));
    opts.cache_dir = Some(warm_data.join("cache"));
    let runtime = Runtime::new(opts).unwrap();
    let config = w.config(scratch.path(), scratch.path(), false);
    let mut plugins = Vec::new();
    for (name, lang) in LANGS {
        let started = Instant::now();
        let p = runtime
            .load(
                &component(name),
                config.plugin_settings(name, None).unwrap(),
            )
            .await
            .unwrap();
        println!(
            "- {name} ({lang}): loaded in {} (from cache: {})",
            us(started.elapsed().as_secs_f64() * 1e6),
            p.from_cache()
        );
        plugins.push(p);
    }
    // Each as the host serves it: from its snapshot after `init` where one
    // can be made (the Rust plugin), else running `init` in every call.
    // The Rust plugin without it stays in the rotation below, for the
    // comparison in one run.
    let plain_rust = plugins[0].clone();
    for p in plugins.iter_mut() {
        *p = runtime.pre_initialise(p.clone()).await;
        println!(
            "- {}: {}",
            p.name(),
            match p.init_every_call() {
                _ if p.pre_initialised() => "calls start from its snapshot after init".to_owned(),
                Some(why) => format!("runs init in every call: {why}"),
                None => "runs init in every call".to_owned(),
            }
        );
    }
    let trivial = || Event {
        id: "1".into(),
        cluster: "lab".into(),
        event_type: "SUBNET.CREATE".into(),
        entity_kind: "subnet".into(),
        entity_uuid: "00000000-0000-4000-8000-000000000001".into(),
        attempt: 1,
        received_at_ms: 0,
        body: "{}".into(),
        vm: None,
    };
    // Instantiate per call: fresh Store + instantiate (+ init) + handle(1
    // non-VM event) + drop, in µs. The rotation puts each Rust variant
    // right after a large plugin's call (Go's, Python's).
    let rows: Vec<(String, &str, &Plugin)> = vec![
        ("paloalto".into(), "Rust", &plugins[0]),
        (LANGS[1].0.into(), LANGS[1].1, &plugins[1]),
        ("paloalto, `init` per call".into(), "Rust", &plain_rust),
        (LANGS[2].0.into(), LANGS[2].1, &plugins[2]),
        (LANGS[3].0.into(), LANGS[3].1, &plugins[3]),
    ];
    let call = async |j: usize| {
        let started = Instant::now();
        let out = rows[j].2.handle(vec![trivial()]).await.unwrap();
        let took = started.elapsed().as_secs_f64() * 1e6;
        assert!(matches!(out[0], Outcome::Done), "{}: {:?}", rows[j].0, out);
        took
    };
    let m = rows.len();
    let mut inst: Vec<Vec<f64>> = vec![Vec::new(); m];
    for i in 0..330 {
        for (j, times) in inst.iter_mut().enumerate() {
            let took = call(j).await;
            if i >= 30 {
                times.push(took);
            }
        }
    }
    // The same calls, one plugin's in a row: what a call costs right after
    // another language's (whose call evicted its working set from the
    // caches) against a warm run of its own.
    let mut alone: Vec<Vec<f64>> = vec![Vec::new(); m];
    for (j, times) in alone.iter_mut().enumerate() {
        for i in 0..330 {
            let took = call(j).await;
            if i >= 30 {
                times.push(took);
            }
        }
    }
    println!("\nInstantiate per call: fresh Store + instantiate (+ init, unless it starts from its snapshot) + handle(one SUBNET.CREATE: no kv, no http) + drop; in turn as listed, 300 calls each, so each Rust row follows a Go or Python call; then 300 of each plugin in a row");
    println!("| plugin | language | p50 | p99 | vs Rust (p50) | p50, in a row | p99, in a row |");
    println!("|---|---|---|---|---|---|---|");
    let rust_inst = median(&inst[0]);
    for (j, (name, lang, _)) in rows.iter().enumerate() {
        let s = sorted(inst[j].clone());
        let a = sorted(alone[j].clone());
        println!(
            "| {name} | {lang} | {} | {} | {:.1}× | {} | {} |",
            us(percentile(&s, 50.0)),
            us(percentile(&s, 99.0)),
            percentile(&s, 50.0) / rust_inst,
            us(percentile(&a, 50.0)),
            us(percentile(&a, 99.0)),
        );
    }

    // Per event: VM.ON then VM.OFF for the same distinct VMs (F5Pool=web, one IP).
    let template = vm_on_template();
    println!("\nPer event: batches of distinct VMs (vm_on.json + category F5Pool=web, 1 NIC, 1 IP), VM.ON then VM.OFF; each plugin against its own simulator/receiver; rotating, 10 rounds");
    println!("| batch | plugin | language | VM.ON per event | VM.OFF per event | VM.ON whole batch | vs Rust (VM.ON) |");
    println!("|---|---|---|---|---|---|---|");
    // 10, not more: the host caps a call at 16 outbound requests by default
    // and the F5 plugin makes one per VM.
    let mut python_component_on = None;
    for size in [1u64, 10] {
        let mut not_done = vec![0usize; n];
        let mut on_t: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut off_t: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut id = 1u64;
        for round in 0..12u32 {
            for k in 0..n {
                let j = (round as usize + k) % n;
                let series = 9000 + round * 4 + j as u32 + size as u32 * 100;
                let on: Vec<Event> = (0..size)
                    .map(|n| note_event(&template, series, n, "VM.ON", id + n))
                    .collect();
                let off: Vec<Event> = (0..size)
                    .map(|n| note_event(&template, series, n, "VM.OFF", id + size + n))
                    .collect();
                id += 2 * size;
                let started = Instant::now();
                let out = plugins[j].handle(on).await.unwrap();
                let t_on = started.elapsed().as_secs_f64() * 1e6;
                not_done[j] += out.iter().filter(|o| !matches!(o, Outcome::Done)).count();
                let started = Instant::now();
                let out = plugins[j].handle(off).await.unwrap();
                let t_off = started.elapsed().as_secs_f64() * 1e6;
                not_done[j] += out.iter().filter(|o| !matches!(o, Outcome::Done)).count();
                if round >= 2 {
                    on_t[j].push(t_on);
                    off_t[j].push(t_off);
                }
            }
        }
        let rust_on = median(&on_t[0]);
        if size == 10 {
            python_component_on = Some(median(&on_t[1]) / size as f64);
        }
        for (j, (name, lang)) in LANGS.iter().enumerate() {
            println!(
                "| {size} | {name} | {lang} | {} | {} | {} | {:.1}× |",
                us(median(&on_t[j]) / size as f64),
                us(median(&off_t[j]) / size as f64),
                us(median(&on_t[j])),
                median(&on_t[j]) / rust_on
            );
        }
        if not_done.iter().any(|&n| n > 0) {
            println!("(!) outcomes other than done, batch {size}: {not_done:?} ({LANGS:?})");
        }
    }
    if let Some(component) = python_component_on {
        python_with_the_same_requests(w, component);
    }
    println!(
        "work done: PAN-OS {} requests; BIG-IP {} members added, {} removed; SIEM {} events received; FMC {} mappings added, {} removed",
        w.panos.stats().requests,
        w.bigip.stats().members_added,
        w.bigip.stats().members_removed,
        w.siem_events.load(Ordering::Relaxed),
        w.fmc.stats().mappings_added,
        w.fmc.stats().mappings_removed,
    );
}

/// The F5 plugin's logic under the machine's CPython, sending the same
/// requests to the same simulator as the component just did
/// (`plugins/f5-bigip/bench.py --bigip`), against the component's figure
/// for batches of 10 VM.ON.
fn python_with_the_same_requests(w: &World, component_us: f64) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/f5-bigip/bench.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["--bigip", &w.bigip.base_url()])
        .args(["--authorization", &bigip_authorization()])
        .output();
    let text = match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => {
            println!(
                "(!) {} failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("(!) could not run python3 {}: {e}", script.display());
            return;
        }
    };
    println!("\n{}", text.trim());
    let native_us = text
        .split("VM.ON ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    if let Some(native_us) = native_us {
        println!(
            "f5-bigip per event, batches of 10 VM.ON, the same requests to the same simulator: component {} against CPython natively {}: **{:.1}×** (the component's kv is the host's redb, the native one a dict)",
            us(component_us),
            us(native_us),
            component_us / native_us
        );
    }
}

// ------------------------------------------------------------ 5

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary (`CARGO_BIN_EXE_prismhook`) running the four plugins
/// from a warm compiled-code cache, ready (`/readyz` 200).
struct RunningHost {
    child: std::process::Child,
    pid: u32,
    port: u16,
    root: tempfile::TempDir,
    /// How long it took to become ready after spawn.
    ready_after: Duration,
}

impl RunningHost {
    /// `extra` files are written into the plugins directory beside the
    /// four components.
    async fn start(
        w: &World,
        warm_data: &Path,
        client: &reqwest::Client,
        watch: bool,
        extra: &[(&str, Vec<u8>)],
    ) -> RunningHost {
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path().join("plugins");
        let data = root.path().join("data");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(data.join("cache")).unwrap();
        for (name, _) in LANGS {
            std::fs::copy(component(name), plugins.join(format!("{name}.wasm"))).unwrap();
        }
        for (name, bytes) in extra {
            std::fs::write(plugins.join(name), bytes).unwrap();
        }
        // Start from compiled components, as any restart after the first does.
        for e in std::fs::read_dir(warm_data.join("cache"))
            .unwrap()
            .flatten()
        {
            std::fs::copy(e.path(), data.join("cache").join(e.file_name())).unwrap();
        }
        let (port, admin_port) = (free_port(), free_port());
        let text = w.config_text(
            &data,
            &plugins,
            watch,
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{admin_port}"),
        );
        RunningHost::spawn(root, &text, port, admin_port, client).await
    }

    /// Runs the binary on `text` (written into `root`), listening on
    /// `port` and `admin_port`, and waits until it is ready.
    async fn spawn(
        root: tempfile::TempDir,
        text: &str,
        port: u16,
        admin_port: u16,
        client: &reqwest::Client,
    ) -> RunningHost {
        let cfg = root.path().join("prismhook.toml");
        std::fs::write(&cfg, text).unwrap();
        let bin = env!("CARGO_BIN_EXE_prismhook");
        let log = std::fs::File::create(root.path().join("host.log")).unwrap();
        let mut child = std::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("PRISMHOOK_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the prismhook binary");
        let pid = child.id();
        let started = Instant::now();
        let ready = format!("http://127.0.0.1:{admin_port}/readyz");
        loop {
            if client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!(
                    "the binary did not become ready: {}",
                    std::fs::read_to_string(root.path().join("host.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        RunningHost {
            child,
            pid,
            port,
            root,
            ready_after: started.elapsed(),
        }
    }

    /// SIGTERM, then wait for the exit.
    async fn stop(self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let mut child = self.child;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("host.log")).unwrap_or_default()
    }
}

/// Section 7: one host, `n` Palo Alto instances, each its own firewall.
async fn fleet(w: &World, warm_data: &Path, client: &reqwest::Client) {
    println!(
        "\n## 7. A fleet: 1,000 VM.ON notifications to N Palo Alto instances (the real binary)"
    );
    println!("| instances | batch window | requests per firewall | uid-messages per firewall | commits | all firewalls current after | VmRSS ready | VmRSS after | VmHWM |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let template = Arc::new(vm_on_template());
    let mut rss = Vec::new();
    // The default window sends what has arrived every 5 ms; a longer one
    // trades that latency for fewer, larger messages.
    for (n, window) in [(1usize, "5ms"), (4, "5ms"), (4, "250ms")] {
        let mut firewalls = Vec::new();
        for _ in 0..n {
            firewalls.push(setup::start_panos().await);
        }
        let root = tempfile::tempdir().unwrap();
        let (plugins, data) = (root.path().join("plugins"), root.path().join("data"));
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(data.join("cache")).unwrap();
        std::fs::copy(component("paloalto"), plugins.join("paloalto.wasm")).unwrap();
        for e in std::fs::read_dir(warm_data.join("cache"))
            .unwrap()
            .flatten()
        {
            std::fs::copy(e.path(), data.join("cache").join(e.file_name())).unwrap();
        }
        let (port, admin_port) = (free_port(), free_port());
        let host = firewalls.iter().enumerate().fold(
            HostConfig::new(&data)
                .instance("bench-fleet")
                .delivery(&format!("batch_window = {window:?}"))
                .dirs(&data, &plugins)
                .listen(format!("127.0.0.1:{port}"))
                .admin_listen(format!("127.0.0.1:{admin_port}")),
            |host, (i, fw)| host.paloalto_instance(&format!("fw-{i}"), fw),
        );
        let host = host.cluster(Cluster {
            webhook_password: Some(WEBHOOK_PASSWORD.into()),
            extra: vec![format!("webhook_user = {WEBHOOK_USER:?}")],
            ..Cluster::lab(&w.prism)
        });
        let running = RunningHost::spawn(root, &host.toml(), port, admin_port, client).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ready_rss = proc_status_kib(running.pid, "VmRSS:").unwrap();

        let url = format!("http://127.0.0.1:{port}/listener/callback/lab");
        let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
        let t = template.clone();
        let series = 9000 + n as u32;
        let started = Instant::now();
        let (accepted, other, sent_in) = burst(
            client,
            &url,
            &auth,
            1000,
            64,
            Arc::new(move |i| t.render(series, i)),
        )
        .await;
        let current = Instant::now();
        while current.elapsed() < Duration::from_secs(120)
            && firewalls
                .iter()
                .any(|fw| (fw.registered().len() as u64) < accepted)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let converged = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after_rss = proc_status_kib(running.pid, "VmRSS:").unwrap();
        let hwm = proc_status_kib(running.pid, "VmHWM:").unwrap();
        running.stop().await;

        let stats: Vec<_> = firewalls.iter().map(|fw| fw.stats()).collect();
        let spread = |f: &dyn Fn(&prismhook_sim::panos::PanosStats) -> u64| {
            let (lo, hi) = (
                stats.iter().map(f).min().unwrap(),
                stats.iter().map(f).max().unwrap(),
            );
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}–{hi}")
            }
        };
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let all_there = firewalls
            .iter()
            .all(|fw| fw.registered().len() as u64 >= accepted);
        println!(
            "| {n} | {window} | {} | {} | {} | {} | {} | {} | {} |",
            spread(&|s| s.requests),
            spread(&|s| s.uid_messages),
            stats.iter().map(|s| s.commits).sum::<u64>(),
            if all_there {
                format!("{:.2} s", converged.as_secs_f64())
            } else {
                "NOT within 120 s".into()
            },
            mib(ready_rss),
            mib(after_rss),
            mib(hwm),
        );
        println!(
            "({n} × {window}: 1,000 sent by 64 connections in {:.2} s, {accepted} answered 202, {other} other)",
            sent_in.as_secs_f64()
        );
        rss.push((ready_rss, after_rss));
        for fw in firewalls {
            fw.shutdown().await;
        }
    }
    let per = |a: u64, b: u64| (b as f64 - a as f64) / 3.0 / 1024.0;
    println!(
        "added host memory per instance (4 instances against 1, divided by 3): {:.1} MiB ready, {:.1} MiB after the burst",
        per(rss[0].0, rss[1].0),
        per(rss[0].1, rss[1].1)
    );
}

/// User plus system CPU time of a process so far (`/proc/<pid>/stat`).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_s)
}

/// Section 6, idle CPU: the binary with the four plugins, the watcher on,
/// and a fourth component whose `init` refuses (f5-bigip.wasm copied
/// without settings), measured over `PRISMHOOK_IDLE_SECS` (60) with no
/// traffic. The watcher used to feed on the host's own reads of plugin
/// files and reload (and fail) every file about every 200 ms forever.
async fn idle(w: &World, warm_data: &Path, client: &reqwest::Client) {
    let secs: u64 = env_number("PRISMHOOK_IDLE_SECS", 60);
    println!("\n## 6. Idle CPU of `prismhook run` with the watcher on, over {secs} s");
    let refused = std::fs::read(component("f5-bigip")).unwrap();
    let host = RunningHost::start(
        w,
        warm_data,
        client,
        true,
        &[("f5-unconfigured.wasm", refused)],
    )
    .await;
    // Let start-up work (Cranelift upgrades, registration) finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failed_loads = |log: &str| log.matches("plugin not loaded").count();
    let (cpu_before, loads_before) = (cpu_time(host.pid), failed_loads(&host.log()));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (cpu, wall) = (cpu_time(host.pid) - cpu_before, started.elapsed());
    let loads = failed_loads(&host.log()) - loads_before;
    host.stop().await;
    let share = cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
    println!(
        "| window | CPU time (user + system) | share of one core | failed loads logged | target |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {:.0} s idle, 4 plugins + 1 refusing its settings, watcher on | {} ms | {share:.2} % | {loads} | < 1 %: {} |",
        wall.as_secs_f64(),
        cpu.as_millis(),
        if share < 1.0 { "met" } else { "NOT met" }
    );
}

async fn memory(w: &World, warm_data: &Path, client: &reqwest::Client) {
    println!("\n## 5. Resident memory of `prismhook run` (target/release/prismhook) with the four plugins");
    let host = RunningHost::start(w, warm_data, client, false, &[]).await;
    let (pid, port) = (host.pid, host.port);
    println!(
        "binary: {}; ready (/readyz 200) {:.2} s after spawn (warm cache)",
        env!("CARGO_BIN_EXE_prismhook"),
        host.ready_after.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_rss = proc_status_kib(pid, "VmRSS:").unwrap();
    let idle_hwm = proc_status_kib(pid, "VmHWM:").unwrap();
    let idle_anon = proc_status_kib(pid, "RssAnon:").unwrap();

    // A sampler of VmRSS (and of its private part) every 100 ms while the
    // load runs.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = sampling.clone();
        async move {
            let (mut peak, mut peak_anon) = (0u64, 0u64);
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                if let Some(v) = proc_status_kib(pid, "VmRSS:") {
                    peak = peak.max(v);
                    samples.push(v as f64);
                }
                if let Some(v) = proc_status_kib(pid, "RssAnon:") {
                    peak_anon = peak_anon.max(v);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, peak_anon, samples)
        }
    });
    let template = Arc::new(vm_on_template());
    let url = format!("http://127.0.0.1:{port}/listener/callback/lab");
    let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
    let (before_fw, before_lb, before_siem) = (
        w.panos.stats().requests,
        w.bigip.stats().members_added,
        w.siem_events.load(Ordering::Relaxed),
    );
    let t = template.clone();
    let r = paced(
        client,
        &url,
        &auth,
        1000,
        Duration::from_secs(20),
        move |n| t.render(8000, n),
    )
    .await;
    // Let the plugins catch up (or say they did not).
    let caught_up = Instant::now();
    while caught_up.elapsed() < Duration::from_secs(60)
        && (w.bigip.stats().members_added - before_lb < r.accepted
            || w.siem_events.load(Ordering::Relaxed) - before_siem < r.accepted)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let catch_up = caught_up.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let (peak_sampled, peak_anon, samples) = sampler.await.unwrap();
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap();
    let end_rss = proc_status_kib(pid, "VmRSS:").unwrap();
    let end_anon = proc_status_kib(pid, "RssAnon:").unwrap();
    host.stop().await;

    let mib = |k: u64| k as f64 / 1024.0;
    // VmRSS also counts file pages mapped from the compiled components (code
    // and the plugins' memory images, shared with the page cache, counted
    // once per pool slot that maps them); RssAnon is the host's own memory.
    println!("| state | VmRSS | VmHWM (peak so far) | RssAnon (private) | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| idle, 4 plugins loaded, 5 s after ready | {:.1} MiB | {:.1} MiB | {:.1} MiB | < 100 MB: {} |",
        mib(idle_rss),
        mib(idle_hwm),
        mib(idle_anon),
        if idle_rss * 1024 < 100_000_000 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "| 1,000 notifications/s for 20 s (+ catch-up), sampled every 100 ms | median {:.1} MiB, peak sampled {:.1} MiB | {:.1} MiB | peak sampled {:.1} MiB | < 200 MB: {} |",
        mib(median(&samples) as u64),
        mib(peak_sampled),
        mib(hwm),
        mib(peak_anon),
        if hwm * 1024 < 200_000_000 { "met" } else { "NOT met" }
    );
    println!(
        "| after the load | {:.1} MiB | – | {:.1} MiB | – |",
        mib(end_rss),
        mib(end_anon)
    );
    println!(
        "load: {} sent, {} answered 202, {} other; p50 ack {}, p99 ack {}; applied after the load's end + {:.1} s: PAN-OS {} requests, \
         BIG-IP {} members added, SIEM {} events",
        r.sent,
        r.accepted,
        r.other,
        us(percentile(&r.latencies_us, 50.0)),
        us(percentile(&r.latencies_us, 99.0)),
        catch_up.as_secs_f64(),
        w.panos.stats().requests - before_fw,
        w.bigip.stats().members_added - before_lb,
        w.siem_events.load(Ordering::Relaxed) - before_siem
    );
}

/// Section 8: 1,000 VM.ON notifications to the real binary running the
/// four plugins; what each plugin asked of its system for them.
async fn burst_by_language(w: &World, warm_data: &Path, client: &reqwest::Client) {
    println!(
        "\n## 8. A 1,000-VM burst through the four languages (the real binary, default batching)"
    );
    let host = RunningHost::start(w, warm_data, client, false, &[]).await;
    let before = (
        w.panos.stats().requests,
        w.bigip.stats().requests,
        w.siem_posts.load(Ordering::Relaxed),
        w.fmc.stats().requests,
    );
    let fmc_before = w.fmc.stats();
    let base = (
        w.panos.registered().len(),
        w.bigip.stats().members_added,
        w.siem_events.load(Ordering::Relaxed),
        w.fmc.mappings().get("ntnx.managed").map_or(0, Vec::len),
    );
    let template = Arc::new(vm_on_template());
    let url = format!("http://127.0.0.1:{}/listener/callback/lab", host.port);
    let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
    let started = Instant::now();
    let (accepted, other, sent_in) = burst(
        client,
        &url,
        &auth,
        1000,
        64,
        Arc::new(move |i| template.render(8500, i)),
    )
    .await;
    // When each system first held every accepted VM.
    let mut done: [Option<Duration>; 4] = [None; 4];
    while started.elapsed() < Duration::from_secs(300) && done.iter().any(Option::is_none) {
        let held = [
            (w.panos.registered().len() - base.0) as u64,
            w.bigip.stats().members_added - base.1,
            w.siem_events.load(Ordering::Relaxed) - base.2,
            (w.fmc.mappings().get("ntnx.managed").map_or(0, Vec::len) - base.3) as u64,
        ];
        for (j, &n) in held.iter().enumerate() {
            if done[j].is_none() && n >= accepted {
                done[j] = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = host.log();
    host.stop().await;
    let requests = [
        w.panos.stats().requests - before.0,
        w.bigip.stats().requests - before.1,
        w.siem_posts.load(Ordering::Relaxed) - before.2,
        w.fmc.stats().requests - before.3,
    ];
    println!("| plugin | language | requests to its system | per VM | all {accepted} held after |");
    println!("|---|---|---|---|---|");
    for (j, (name, lang)) in LANGS.iter().enumerate() {
        println!(
            "| {name} | {lang} | {} | {:.3} | {} |",
            requests[j],
            requests[j] as f64 / accepted as f64,
            done[j].map_or("NOT within 300 s".into(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            ))
        );
    }
    println!(
        "(1,000 sent by 64 connections in {:.2} s, {accepted} answered 202, {other} other; FMC: {} sign-in, {} answered 429)",
        sent_in.as_secs_f64(),
        w.fmc.stats().logins - fmc_before.logins,
        w.fmc.stats().rate_limited - fmc_before.rate_limited
    );
    if done.iter().any(Option::is_none) {
        println!("host log:\n{log}");
    }
}

#[tokio::main]
async fn main() {
    init_tracing();
    println!("# prismhook bench: life cycle (reload, start-up), languages, memory");
    machine_note();
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let w = world().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    if want("reload") {
        reloads(&w, &client).await;
    }
    if want("startup") || want("compilers") {
        compilers();
        tier_speed(&w).await;
    }
    if want("startup") {
        let warm = startup(&w, &client).await;
        fill_cache(&warm.path().join("cache"));
    }
    // The compiled components, kept between runs under target/tmp.
    let warm = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-data");
    if want("languages") || want("memory") {
        fill_cache(&warm.join("cache"));
    }
    if want("languages") {
        languages(&w, &warm).await;
    }
    if want("memory") {
        memory(&w, &warm, &client).await;
    }
    if want("idle") {
        fill_cache(&warm.join("cache"));
        idle(&w, &warm, &client).await;
    }
    if want("burst") {
        fill_cache(&warm.join("cache"));
        burst_by_language(&w, &warm, &client).await;
    }
    if want("fleet") {
        fill_cache(&warm.join("cache"));
        fleet(&w, &warm, &client).await;
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("\nload average at end: {}", l.trim());
    }
}
