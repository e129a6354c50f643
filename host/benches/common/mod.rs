//! What the benchmark programs share: fixture bodies made unique per
//! request, `wrk` driven with a Lua script, an open-loop paced load
//! generator, a trivial axum handler as the baseline, and figures.
//!
//! Benchmarks print figures; they never assert a time (DEVELOPERS.md).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use base64::Engine as _;

/// The tests' typed host configuration and simulator start-up, shared so
/// that benches and tests configure hosts the same way.
#[path = "../../../tests/all/common/setup.rs"]
pub mod setup;

// ---------------------------------------------------------------- fixtures

/// A number from the environment (a bench's size or length), else `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nutanix")
}

pub fn component(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the guest components first with `cargo xtask plugins`",
        path.display()
    );
    path
}

/// The VM notification fixtures (`vm_*.json`), sorted by name.
pub fn vm_fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("reading the Nutanix fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("vm_") && n.ends_with(".json")
        })
        .collect();
    v.sort();
    v
}

/// A fixture body that can be rendered for another VM: its entity uuid and
/// every `"ip": "…"` value are replaced, so that each request is a distinct
/// notification (the listener dedupes identical ones) about a distinct VM
/// with distinct addresses (the firewall plugin's records stay small).
#[derive(Clone)]
pub struct VmTemplate {
    pub name: String,
    pub event_type: String,
    /// Literal text, split where the uuid or an IP goes.
    parts: Vec<Part>,
}

#[derive(Clone)]
enum Part {
    Text(String),
    Uuid,
    /// The n-th distinct IP of the original body.
    Ip(usize),
}

impl VmTemplate {
    pub fn load(path: &Path) -> VmTemplate {
        let text = std::fs::read_to_string(path).expect("reading a fixture");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        VmTemplate::from_text(name, &text)
    }

    pub fn from_text(name: String, text: &str) -> VmTemplate {
        let json: serde_json::Value = serde_json::from_str(text).expect("fixture is JSON");
        let uuid = json["entity_reference"]["uuid"]
            .as_str()
            .expect("fixture has an entity uuid")
            .to_owned();
        let event_type = json["event_type"]
            .as_str()
            .unwrap_or("VM.UPDATE")
            .to_owned();
        let mut parts = Vec::new();
        let mut ips: Vec<String> = Vec::new();
        let mut rest = text;
        const IP_KEY: &str = "\"ip\": \"";
        loop {
            let u = rest.find(&uuid);
            let i = rest.find(IP_KEY);
            match (u, i) {
                (Some(u), i) if i.is_none_or(|i| u < i) => {
                    parts.push(Part::Text(rest[..u].to_owned()));
                    parts.push(Part::Uuid);
                    rest = &rest[u + uuid.len()..];
                }
                (_, Some(i)) => {
                    let start = i + IP_KEY.len();
                    let end = start + rest[start..].find('"').expect("closing quote");
                    let ip = &rest[start..end];
                    let n = ips.iter().position(|x| x == ip).unwrap_or_else(|| {
                        ips.push(ip.to_owned());
                        ips.len() - 1
                    });
                    parts.push(Part::Text(rest[..start].to_owned()));
                    parts.push(Part::Ip(n));
                    rest = &rest[end..];
                }
                _ => break,
            }
        }
        parts.push(Part::Text(rest.to_owned()));
        VmTemplate {
            name,
            event_type,
            parts,
        }
    }

    /// The body for VM number `n` of series `series`.
    pub fn render(&self, series: u32, n: u64) -> String {
        let mut out = String::with_capacity(8 << 10);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Uuid => out.push_str(&vm_uuid(series, n)),
                Part::Ip(k) => out.push_str(&vm_ip(series, n, *k)),
            }
        }
        out
    }

    /// With another event type.
    pub fn with_event_type(&self, event_type: &str) -> VmTemplate {
        let mut t = self.clone();
        for p in &mut t.parts {
            if let Part::Text(s) = p {
                *s = s.replace(
                    &format!("\"event_type\": \"{}\"", self.event_type),
                    &format!("\"event_type\": \"{event_type}\""),
                );
            }
        }
        t.event_type = event_type.to_owned();
        t
    }
}

pub fn vm_uuid(series: u32, n: u64) -> String {
    format!("{series:08x}-0000-4000-8000-{n:012x}")
}

/// Distinct for every (series, n < 2^24, nic < 4).
pub fn vm_ip(series: u32, n: u64, nic: usize) -> String {
    format!(
        "{}.{}.{}.{}",
        10 + (series % 50) * 4 + nic as u32 % 4,
        (n >> 16) & 255,
        (n >> 8) & 255,
        n & 255
    )
}

pub fn basic_auth(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

// ---------------------------------------------------------------- figures

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(&v, 50.0)
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// Microseconds, printed with a unit that keeps 3 significant figures.
pub fn us(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} µs")
    } else if v >= 10.0 {
        format!("{v:.1} µs")
    } else {
        format!("{v:.2} µs")
    }
}

pub fn rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k/s", v / 1000.0)
    } else {
        format!("{v:.0}/s")
    }
}

pub fn machine_note() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cores} cores, shared with other work and with the load generator in this process/wrk; \
         figures drift between runs, compare the ratios; durable figures follow the flush probe below"
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average now: {}", l.trim());
    }
    // On the 2-core machine of BENCHMARKS.md, writing a page into the page
    // cache costs 25–30× as much once some 3.5 GiB is cached: what is cached
    // already decides when a growing ledger file meets that.
    if let Some(kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("Cached:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
    }) {
        println!("page cache now: {} MiB", kib >> 10);
    }
    let (p50, p99) = fsync_probe();
    println!("flush probe (5 KB append + fdatasync in the temp dir, 200×): p50 {}, p99 {} (reference machine: ~40 µs)", us(p50), us(p99));
}

/// What a flush costs on this machine right now: durable figures follow it.
pub fn fsync_probe() -> (f64, f64) {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("prismhook-fsync-probe-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let block = vec![b'x'; 5000];
    let mut t = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        t.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    let t = sorted(t);
    (percentile(&t, 50.0), percentile(&t, 99.0))
}

// ---------------------------------------------------------------- baseline

/// The reference's trivial axum 0.8 POST handler: reads the body, answers 202.
pub async fn start_trivial() -> SocketAddr {
    let app = Router::new().route(
        "/listener/callback/{cluster}",
        post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body.len());
            StatusCode::ACCEPTED
        }),
    );
    serve(app).await
}

pub async fn serve(app: Router) -> SocketAddr {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
    addr
}

// ---------------------------------------------------------------- wrk

/// wrk's Lua: every request POSTs one of the fixtures (in turn) with the
/// entity uuid and the IPs replaced by values unique to (round, thread,
/// request), with the Basic auth header.
const WRK_LUA: &str = r#"
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

local templates = {}
local n = 0
local auth, round

local function tokenize(body)
  local uuid = string.match(body, '"entity_reference"%s*:%s*{[^}]*"uuid"%s*:%s*"([^"]+)"')
  local toks, pos = {}, 1
  while true do
    local us, ue = string.find(body, uuid, pos, true)
    local is, ie = string.find(body, '"ip": "[^"]*"', pos)
    local s, e, kind
    if us and (not is or us < is) then s, e, kind = us, ue, "U"
    elseif is then s, e, kind = is, ie, "I"
    else break end
    table.insert(toks, string.sub(body, pos, s - 1))
    table.insert(toks, kind)
    pos = e + 1
  end
  table.insert(toks, string.sub(body, pos))
  return toks
end

function init(args)
  auth = args[1]
  round = tonumber(args[2])
  for i = 3, #args do
    local f = assert(io.open(args[i], "rb"))
    table.insert(templates, tokenize(f:read("*a")))
    f:close()
  end
end

function request()
  n = n + 1
  local toks = templates[(n % #templates) + 1]
  local uuid = string.format("%08x-%04x-4000-8000-%012x", round, tid, n)
  local ip = string.format("%d.%d.%d.%d", 10 + (round % 20) * 8 + tid % 8,
    math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  local out = {}
  for i = 1, #toks do
    local t = toks[i]
    if i % 2 == 0 then
      if t == "U" then out[i] = uuid else out[i] = '"ip": "' .. ip .. '"' end
    else
      out[i] = t
    end
  end
  return wrk.format("POST", nil, {["Authorization"] = auth, ["Content-Type"] = "application/json"}, table.concat(out))
end
"#;

pub fn wrk_script() -> PathBuf {
    let path = std::env::temp_dir().join(format!("prismhook-bench-{}.lua", std::process::id()));
    std::fs::write(&path, WRK_LUA).unwrap();
    path
}

#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub seconds: f64,
    /// Answers in 2xx per second (202 for every handler measured here).
    pub ok_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

fn parse_duration_us(s: &str) -> f64 {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000_000.0)
    } else {
        (s, 1.0)
    };
    num.trim().parse::<f64>().unwrap_or(f64::NAN) * mul
}

/// A server a bench compares, by the name its rows carry.
pub struct Target {
    pub name: &'static str,
    pub url: String,
}

/// `wrk -t2 -c64` for `secs` against `url`, posting the VM fixtures made
/// unique by `round`.
pub async fn wrk(url: &str, secs: u64, script: &Path, auth: &str, round: u32) -> WrkResult {
    wrk_with(url, 2, 64, secs, script, auth, round).await
}

/// [`run_wrk`] off the async threads.
pub async fn wrk_with(
    url: &str,
    threads: u32,
    conns: u32,
    secs: u64,
    script: &Path,
    auth: &str,
    round: u32,
) -> WrkResult {
    let (url, script, auth) = (url.to_owned(), script.to_owned(), auth.to_owned());
    let fixtures = vm_fixtures();
    tokio::task::spawn_blocking(move || {
        run_wrk(
            &url,
            threads,
            conns,
            Duration::from_secs(secs),
            &script,
            &auth,
            round,
            &fixtures,
        )
    })
    .await
    .unwrap()
}

/// Saturates the targets with [`wrk`], 1 s of warm-up each, then `rounds`
/// rounds of 5 s rotating A B C, B C A, …; prints a row per run. `before`
/// is called ahead of each run and `after` with its result, for the
/// `extra` columns a bench adds (`" | a | b"`). Results by target.
#[allow(clippy::too_many_arguments)]
pub async fn saturate<S>(
    targets: &[Target],
    rounds: usize,
    script: &Path,
    auth: &str,
    round_id: &mut u32,
    extra: &[&str],
    mut before: impl FnMut(usize) -> S,
    mut after: impl FnMut(usize, S, &WrkResult) -> String,
) -> Vec<Vec<WrkResult>> {
    for t in targets {
        wrk(&t.url, 1, script, auth, *round_id).await;
        *round_id += 1;
    }
    let header: String = extra.iter().map(|c| format!(" {c} |")).collect();
    println!("| round | target | 202/s | p50 | p90 | p99 | non-2xx |{header}");
    println!(
        "|---|---|---|---|---|---|---|{}",
        "---|".repeat(extra.len())
    );
    let mut sat: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let state = before(i);
            let r = wrk(&targets[i].url, 5, script, auth, *round_id).await;
            *round_id += 1;
            let columns = after(i, state, &r);
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |{columns}",
                round + 1,
                targets[i].name,
                rate(r.ok_per_s),
                us(r.p50_us),
                us(r.p90_us),
                us(r.p99_us),
                r.non_2xx
            );
            sat[i].push(r);
        }
    }
    sat
}

/// Ack latencies at a fixed 1,000 notifications/s ([`paced`]), `rounds`
/// rounds of 5 s per target rotating; prints a row per run. Returns each
/// target's latencies pooled, and its answers other than 202.
pub async fn paced_rounds(
    targets: &[Target],
    rounds: usize,
    auth: &str,
    series_base: u32,
    round_id: &mut u32,
) -> (Vec<Vec<f64>>, Vec<u64>) {
    let templates: Vec<VmTemplate> = vm_fixtures().iter().map(|p| VmTemplate::load(p)).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let mut latencies: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    let mut bad = vec![0u64; targets.len()];
    println!("| round | target | sent | 202 | other | p50 | p99 | p99.9 | max |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let series = series_base + *round_id;
            *round_id += 1;
            let ts = templates.clone();
            let r = paced(
                &client,
                &targets[i].url,
                auth,
                1000,
                Duration::from_secs(5),
                move |n| ts[n as usize % ts.len()].render(series, n),
            )
            .await;
            let l = &r.latencies_us;
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                round + 1,
                targets[i].name,
                r.sent,
                r.accepted,
                r.other,
                us(percentile(l, 50.0)),
                us(percentile(l, 99.0)),
                us(percentile(l, 99.9)),
                us(*l.last().unwrap_or(&f64::NAN))
            );
            latencies[i].extend_from_slice(l);
            bad[i] += r.other;
        }
    }
    (latencies, bad)
}

/// A registry with paloalto.wasm loaded and subscribed, as the listener
/// consults it (its kv in `dir`; its firewall never asked).
pub async fn paloalto_registry(dir: &Path) -> prismhook::registry::Registry {
    use prismhook::registry::{Entry, PluginState, Registry};
    use prismhook::runtime::policy::{OriginRule, OutboundPolicy};
    use prismhook::runtime::{PluginSettings, Runtime, RuntimeOptions};

    let runtime = Runtime::new(RuntimeOptions::new(dir.join("kv.redb"))).unwrap();
    let fw = "http://127.0.0.1:9";
    let settings = PluginSettings {
        config: serde_json::json!({ "firewall": fw }),
        policy: OutboundPolicy::new(vec![OriginRule::parse(fw).unwrap()], vec![]),
        ..Default::default()
    };
    let plugin = runtime
        .load(&component("paloalto"), settings)
        .await
        .unwrap();
    let registry = Registry::default();
    registry.update(|m| {
        m.insert(
            "paloalto".into(),
            Entry {
                plugin: Some(plugin),
                state: PluginState::Active,
                coalesce: false,
                load_error: None,
            },
        );
    });
    registry
}

/// The listener's own router (the Nutanix source's routes for cluster
/// `lab`, on a Prism that is never asked) storing into `ledger`: every
/// accept stores the event and one pending delivery to paloalto.
pub fn listener_router(
    ledger: prismhook::ledger::SharedLedger,
    registry: prismhook::registry::Registry,
    dir: &Path,
) -> Router {
    use prismhook::source::EventSource as _;

    let config = setup::HostConfig::new(dir)
        .cluster(setup::Cluster {
            webhook_password: Some(WEBHOOK_PASSWORD.into()),
            extra: vec![format!("webhook_user = {WEBHOOK_USER:?}")],
            ..setup::Cluster::new("lab", "http://127.0.0.1:9")
        })
        .config();
    let source = prismhook::nutanix::NutanixSource::new(Arc::new(config)).unwrap();
    prismhook::listener::router(source.routes(prismhook::listener::Ingest::new(
        ledger,
        registry,
        1 << 20,
        Duration::from_secs(30),
        Arc::new(std::sync::atomic::AtomicBool::new(true)),
        Arc::new(prismhook::telemetry::ListenerStats::default()),
    )))
}

/// Runs wrk (blocking: call from `spawn_blocking`) against `url`.
// The arguments are wrk's own knobs and the Lua script's, one each.
#[allow(clippy::too_many_arguments)]
pub fn run_wrk(
    url: &str,
    threads: u32,
    conns: u32,
    duration: Duration,
    script: &Path,
    auth: &str,
    round: u32,
    fixtures: &[PathBuf],
) -> WrkResult {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{}s", duration.as_secs()))
        .arg("--latency")
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(script)
        .arg(url)
        .arg("--")
        .arg(auth)
        .arg(round.to_string());
    for f in fixtures {
        cmd.arg(f);
    }
    let out = cmd.output().expect("running wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "wrk failed: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r = WrkResult::default();
    let mut in_dist = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut it = l.split_whitespace();
            match (it.next(), it.next()) {
                (Some("50%"), Some(v)) => r.p50_us = parse_duration_us(v),
                (Some("90%"), Some(v)) => r.p90_us = parse_duration_us(v),
                (Some("99%"), Some(v)) => {
                    r.p99_us = parse_duration_us(v);
                    in_dist = false;
                }
                _ => {}
            }
        }
        if l.contains(" requests in ") {
            // "123456 requests in 5.00s, 10.00MB read"
            let mut it = l.split_whitespace();
            r.requests = it.next().unwrap().parse().unwrap_or(0);
            let secs = l
                .split(" requests in ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            r.seconds = parse_duration_us(secs) / 1e6;
        }
        if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|p| {
                    p.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .sum();
        }
    }
    if r.seconds > 0.0 {
        r.ok_per_s = r.requests.saturating_sub(r.non_2xx) as f64 / r.seconds;
    }
    r
}

// ---------------------------------------------------------------- paced load

#[derive(Debug, Clone, Default)]
pub struct PacedResult {
    pub sent: u64,
    pub accepted: u64,
    pub other: u64,
    /// From the request's scheduled send time to its whole answer, in µs
    /// (so a stall is charged to every request it delays: no coordinated
    /// omission).
    pub latencies_us: Vec<f64>,
    pub seconds: f64,
}

/// Open-loop load: request i is sent at `start + i / rate`, whatever the
/// answers before it are doing, over a pool of keep-alive connections.
pub async fn paced(
    client: &reqwest::Client,
    url: &str,
    auth: &str,
    per_s: u64,
    duration: Duration,
    body: impl Fn(u64) -> String,
) -> PacedResult {
    let total = per_s * duration.as_secs();
    let interval = Duration::from_nanos(1_000_000_000 / per_s);
    let accepted = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    for i in 0..total {
        let at = start + interval * i as u32;
        let req = client
            .post(url)
            .header("Authorization", auth)
            .header("Content-Type", "application/json")
            .body(body(i));
        tokio::time::sleep_until(at).await;
        let (accepted, other) = (accepted.clone(), other.clone());
        tasks.spawn(async move {
            let ok = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let _ = resp.bytes().await;
                    status == StatusCode::ACCEPTED
                }
                Err(_) => false,
            };
            if ok { &accepted } else { &other }.fetch_add(1, Ordering::Relaxed);
            at.elapsed().as_secs_f64() * 1e6
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    while let Some(r) = tasks.join_next().await {
        latencies.push(r.unwrap());
    }
    PacedResult {
        sent: total,
        accepted: accepted.load(Ordering::Relaxed),
        other: other.load(Ordering::Relaxed),
        latencies_us: sorted(latencies),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// `n` POSTs from `concurrency` keep-alive workers, as fast as answered.
/// Returns (accepted, other, elapsed).
pub async fn burst(
    client: &reqwest::Client,
    url: &str,
    auth: &str,
    n: u64,
    concurrency: usize,
    body: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> (u64, u64, Duration) {
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, auth, next, accepted, other, body) = (
            client.clone(),
            url.to_owned(),
            auth.to_owned(),
            next.clone(),
            accepted.clone(),
            other.clone(),
            body.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let resp = client
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .body(body(i))
                    .send()
                    .await;
                let ok = match resp {
                    Ok(r) => {
                        let s = r.status();
                        let _ = r.bytes().await;
                        s == StatusCode::ACCEPTED
                    }
                    Err(_) => false,
                };
                if ok { &accepted } else { &other }.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (
        accepted.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
        started.elapsed(),
    )
}

/// How a round's notifications reach the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Every notification to every URL, as Prism posts to every webhook.
    All,
    /// Each notification to one URL in turn, as a load balancer spreads them.
    RoundRobin,
}

/// One end-to-end round: what [`applied_round`] measured.
pub struct Applied {
    /// 202 answers, over every URL.
    pub accepted: u64,
    /// Until the last POST was answered.
    pub posting: Duration,
    /// Until the firewall held what the round wanted; None past the limit.
    pub applied: Option<Duration>,
    /// PAN-OS API requests and commits the round caused.
    pub requests: u64,
    pub commits: u64,
}

/// Posts notifications `body(0..n)` to `urls` as `spread` says, 64
/// keep-alive posters per URL, and times until the PAN-OS simulator holds
/// `want` registered entries (at most `limit`).
#[allow(clippy::too_many_arguments)]
pub async fn applied_round(
    client: &reqwest::Client,
    urls: &[String],
    spread: Spread,
    auth: &str,
    n: u64,
    body: Arc<dyn Fn(u64) -> String + Send + Sync>,
    panos: &prismhook_sim::panos::PanosSim,
    want: u64,
    limit: Duration,
) -> Applied {
    let before = panos.stats();
    let started = Instant::now();
    let ways = urls.len() as u64;
    let posters: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(k, url)| {
            let (client, url, auth, body) =
                (client.clone(), url.clone(), auth.to_owned(), body.clone());
            let (count, body): (u64, Arc<dyn Fn(u64) -> String + Send + Sync>) = match spread {
                Spread::All => (n, body),
                // The k-th URL gets notifications k, k + ways, k + 2·ways, …
                Spread::RoundRobin => (
                    (n + ways - 1 - k as u64) / ways,
                    Arc::new(move |i| body(i * ways + k as u64)),
                ),
            };
            tokio::spawn(async move { burst(&client, &url, &auth, count, 64, body).await })
        })
        .collect();
    let mut applied = None;
    while started.elapsed() < limit {
        if panos.stats().registered_entries == want && posters.iter().all(|p| p.is_finished()) {
            applied = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (mut accepted, mut posting) = (0, Duration::ZERO);
    for p in posters {
        let (a, _other, took) = p.await.unwrap();
        accepted += a;
        posting = posting.max(took);
    }
    let after = panos.stats();
    Applied {
        accepted,
        posting,
        applied,
        requests: after.requests - before.requests,
        commits: after.commits - before.commits,
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

// ---------------------------------------------------------------- the host

pub const WEBHOOK_USER: &str = "prismhook";
pub const WEBHOOK_PASSWORD: &str = "bench-webhook-password";

/// The whole host as `prismhook run` assembles it (like tests/nutanix.rs):
/// ledger, runtime with paloalto.wasm, dispatcher, listener, registrar
/// against a Prism simulator, and a PAN-OS simulator as the firewall.
pub struct HostRig {
    pub app: prismhook::app::App,
    pub panos: prismhook_sim::panos::PanosSim,
    pub prism: prismhook_sim::prism::PrismSim,
    /// The callback URL for cluster `lab`.
    pub url: String,
    pub auth: String,
    pub dir: tempfile::TempDir,
}

pub async fn start_host() -> HostRig {
    use setup::{Cluster, HostConfig};
    let dir = tempfile::tempdir().unwrap();
    let prism = setup::start_prism().await;
    let panos = setup::start_panos().await;
    let host = HostConfig::new(dir.path())
        .instance("bench")
        .paloalto(&panos);
    setup::install(host.plugins_dir(), &["paloalto"]);
    let config = host
        .cluster(Cluster {
            webhook_password: Some(WEBHOOK_PASSWORD.into()),
            extra: vec![format!("webhook_user = {WEBHOOK_USER:?}")],
            ..Cluster::lab(&prism)
        })
        .config();
    let app = prismhook::app::App::start(config).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !app.cluster_status().iter().all(|c| c.registered) {
        assert!(
            Instant::now() < until,
            "webhook registration did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Measure Cranelift's code, not the Winch code a cold start serves with.
    wait_for_cranelift(&app).await;
    let url = format!("http://{}/listener/callback/lab", app.listener_addr);
    HostRig {
        app,
        panos,
        prism,
        url,
        auth: basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD),
        dir,
    }
}

/// Waits until every loaded plugin runs Cranelift's code.
pub async fn wait_for_cranelift(app: &prismhook::app::App) {
    let until = Instant::now() + Duration::from_secs(300);
    let optimized = || {
        app.registry.snapshot().values().all(|e| {
            e.plugin
                .as_ref()
                .is_none_or(|p| p.tier() == prismhook::runtime::Tier::Optimized)
        })
    };
    while !optimized() {
        assert!(
            Instant::now() < until,
            "plugins still on Winch's code after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Deliveries still to make (pending, in flight or retrying), all plugins.
pub fn undelivered(ledger: &prismhook::ledger::SharedLedger) -> u64 {
    ledger
        .backlog()
        .unwrap()
        .iter()
        .map(|b| b.pending + b.in_flight)
        .sum()
}

/// Waits until every delivery is made; how long that took, or None.
pub async fn drain(ledger: &prismhook::ledger::SharedLedger, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while undelivered(ledger) > 0 {
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Some(started.elapsed())
}
