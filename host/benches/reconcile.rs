//! Issue 16's reconcile at scale: the release binary started against a Prism
//! simulator that already holds N VMs and a PAN-OS simulator that already
//! holds N registrations, some wrong, with the Palo Alto plugin between them.
//! The host reconciles once at start; the bench times it from the host's
//! start until `GET /api/clusters` reports it done, then checks the
//! firewall against the VMs' truth.
//!
//! Per size: the time (and, from the host's log, how much of it was listing
//! the inventory), firewall requests, the host's peak RSS (`VmHWM` of the
//! process) and the plugin's peak linear memory
//! (`prismhook_plugin_memory_peak_bytes`), and whether the firewall ended
//! equal to the truth.
//!
//! The simulators run in this process, the host in its own, so its memory
//! is its own. Sizes: `RECONCILE_SIZES` (comma-separated; 1,000, 10,000,
//! 50,000 and 200,000 by default). A size the host cannot reconcile is
//! reported with the reason its status gives, and the larger sizes still
//! run. `RECONCILE_HOSTS` (`label=binary[:paloalto.wasm],…`) compares host
//! binaries (and the plugin each runs) side by side, each size on each in
//! turn; by default, this build's with `target/plugins/paloalto.wasm`.
//!
//! `RECONCILE_PLUGIN=f5-bigip` runs the F5 plugin against a BIG-IP
//! simulator instead: every 100th VM serves in pool `/Common/web`, the pool
//! starts empty, and "off the truth" counts members against those VMs.
//! `RECONCILE_PLUGIN=cisco-fmc` runs the Go plugin against an FMC
//! simulator whose dynamic objects hold the same state as the PAN-OS
//! simulator's registrations (the same tags as object names, the same
//! stale, missing and foreign IPs), with its rate limit off unless
//! `RECONCILE_FMC_RATE_LIMIT` gives one (requests a minute; FMC's is 120):
//! with it, reading N/1,000 pages of mappings per object is most of the
//! time.
//!
//! `cargo bench -p prismhook --bench reconcile` (the guests from `cargo
//! xtask plugins`).

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::setup::{self, Cluster, HostConfig};
use prismhook_sim::bigip::{BigipConfig, BigipSim};
use prismhook_sim::fmc::{FmcConfig, FmcSim};
use prismhook_sim::prism::{NewVm, PrismSim};

const TIERS: [&str; 3] = ["Web", "App", "Db"];
/// No size takes longer than this; past it the host is stopped and the
/// size reported as not converged.
const LIMIT: Duration = Duration::from_secs(600);

fn vm_ip(i: usize) -> String {
    format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// Sorted, as the simulator lists them.
fn tags(i: usize) -> Vec<String> {
    vec![
        format!("ntnx.AppTier.{}", TIERS[i % TIERS.len()]),
        "ntnx.managed".to_owned(),
    ]
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kB` line of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A sample of the host's `/metrics`.
async fn metric(client: &reqwest::Client, admin: &str, name: &str) -> Option<f64> {
    let text = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The last reconcile's lines, once there was one.
async fn reconciled(client: &reqwest::Client, admin: &str) -> Option<Vec<String>> {
    let clusters: serde_json::Value = client
        .get(format!("{admin}/api/clusters"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let lab = clusters.as_array()?.first()?;
    lab.get("last_reconcile_ms")?.as_u64()?;
    Some(
        lab.get("last_reconcile")?
            .as_array()?
            .iter()
            .filter_map(|l| Some(l.as_str()?.to_owned()))
            .collect(),
    )
}

/// Seconds between the host's first log line and its first line holding
/// `needle`, from the timestamps `tracing` writes.
fn log_offset(log: &Path, needle: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let stamp = |line: &str| -> Option<f64> {
        // `2026-12-04T07:13:45.962521Z`, perhaps in colour: the seconds of
        // the day are enough here.
        let t = line.split_whitespace().next()?;
        let t = t.strip_prefix("\u{1b}[2m").unwrap_or(t);
        let time = t.split('T').nth(1)?.split('Z').next()?;
        let mut parts = time.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let first = text.lines().find_map(stamp)?;
    let at = text.lines().find(|l| l.contains(needle)).and_then(stamp)?;
    Some(at - first)
}

struct Figures {
    host: String,
    vms: usize,
    outcome: String,
    took: Duration,
    listing: Option<f64>,
    requests: u64,
    host_peak: Option<u64>,
    plugin_peak: Option<f64>,
    off_truth: usize,
}

/// Which plugin reconciles, against which simulator.
#[derive(Clone, Copy, PartialEq)]
enum Vendor {
    PaloAlto,
    F5,
    Fmc,
}

impl Vendor {
    fn plugin(self) -> &'static str {
        match self {
            Vendor::PaloAlto => "paloalto",
            Vendor::F5 => "f5-bigip",
            Vendor::Fmc => "cisco-fmc",
        }
    }
}

/// The F5 plugin's pool and member port, and which VMs serve in it.
const POOL: &str = "/Common/web";
const MEMBER_PORT: u16 = 8080;
fn in_pool(i: usize) -> bool {
    i.is_multiple_of(100)
}

async fn one_size(
    vendor: Vendor,
    label: &str,
    (binary, plugin): &(PathBuf, PathBuf),
    n: usize,
) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let prism = setup::start_prism().await;
    let panos = setup::start_panos().await;
    let bigip = BigipSim::start(
        "127.0.0.1:0".parse().unwrap(),
        BigipConfig {
            pools: vec![POOL.to_owned()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let fmc = FmcSim::start(
        "127.0.0.1:0".parse().unwrap(),
        FmcConfig {
            rate_limit_per_minute: common::env_number("RECONCILE_FMC_RATE_LIMIT", 0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    match vendor {
        Vendor::PaloAlto => prepare(&prism, |ip, tags| panos.register_directly(ip, tags), n).await,
        Vendor::F5 => prepare_f5(&prism, n).await,
        Vendor::Fmc => {
            for name in ["ntnx.managed", "ntnx.AppTier.Old"].into_iter().chain(
                TIERS
                    .map(|t| format!("ntnx.AppTier.{t}"))
                    .iter()
                    .map(String::as_str),
            ) {
                fmc.create_object_directly(name);
            }
            let map = |ip: &str, tags: &[&str]| {
                for tag in tags {
                    fmc.add_mapping_directly(tag, ip);
                }
            };
            prepare(&prism, map, n).await
        }
    }
    let truth: BTreeMap<String, Vec<String>> = (0..n).map(|i| (vm_ip(i), tags(i))).collect();
    let requests = || panos.stats().requests + bigip.stats().requests + fmc.stats().requests;
    let before = requests();

    let admin = format!("127.0.0.1:{}", free_port());
    let host = HostConfig::new(dir.path())
        .instance("bench")
        .admin_listen(&admin);
    let host = match vendor {
        Vendor::PaloAlto => host.paloalto(&panos),
        Vendor::Fmc => host.cisco_fmc(&fmc, ""),
        Vendor::F5 => {
            let lb = bigip.base_url();
            host.plugin(
                "f5-bigip",
                &[
                    format!(r#"config = {{ bigip = "{lb}", port = {MEMBER_PORT}, category = "F5Pool" }}"#),
                    format!(r#"allow = ["{lb}"]"#),
                    format!(r#"inject = [{{ origin = "{lb}", header = "Authorization", value = "Basic YWRtaW46YWRtaW4=" }}]"#),
                ],
            )
        }
    };
    std::fs::create_dir_all(host.plugins_dir()).unwrap();
    let file = format!("{}.wasm", vendor.plugin());
    std::fs::copy(plugin, host.plugins_dir().join(file)).unwrap();
    let config_file = dir.path().join("prismhook.toml");
    std::fs::write(&config_file, host.cluster(Cluster::lab(&prism)).toml()).unwrap();
    let log = dir.path().join("host.log");

    let started = Instant::now();
    let mut child = spawn(binary, &config_file, &log);
    let pid = child.id();
    let admin = format!("http://{admin}");
    let client = reqwest::Client::new();
    let mut peak = None;
    let outcome = loop {
        peak = status_bytes(pid, "VmHWM").or(peak);
        if let Some(lines) = reconciled(&client, &admin).await {
            break lines.join("; ");
        }
        if let Ok(Some(status)) = child.try_wait() {
            break format!("the host exited: {status}");
        }
        if started.elapsed() > LIMIT {
            break format!("not reconciled within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    let plugin_peak = metric(
        &client,
        &admin,
        &format!(
            "prismhook_plugin_memory_peak_bytes{{plugin=\"{}\"}}",
            vendor.plugin()
        ),
    )
    .await;
    peak = status_bytes(pid, "VmHWM").or(peak);
    let _ = child.kill();
    let _ = child.wait();

    let off_truth = match vendor {
        Vendor::PaloAlto | Vendor::Fmc => {
            // What each IP is registered with or mapped in, sorted as
            // `tags` is (objects come in name order).
            let registered = if vendor == Vendor::Fmc {
                let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (object, ips) in fmc.mappings() {
                    for ip in ips {
                        by_ip.entry(ip).or_default().push(object.clone());
                    }
                }
                by_ip
            } else {
                panos.registered()
            };
            truth
                .iter()
                .filter(|(ip, want)| registered.get(*ip) != Some(*want))
                .count()
                + registered
                    .keys()
                    .filter(|ip| !truth.contains_key(*ip))
                    .count()
        }
        Vendor::F5 => {
            let want: std::collections::BTreeSet<String> = (0..n)
                .filter(|i| in_pool(*i))
                .map(|i| format!("{}:{MEMBER_PORT}", vm_ip(i)))
                .collect();
            let members = bigip.pools().remove(POOL).unwrap_or_default();
            want.iter().filter(|m| !members.contains(m)).count()
                + members.iter().filter(|m| !want.contains(*m)).count()
        }
    };
    Figures {
        host: label.to_owned(),
        vms: n,
        outcome,
        took,
        // A host that feeds the plugin each page as it is read logs the
        // listing's end; one before that logged "reconciling" after it.
        listing: log_offset(&log, "inventory listed").or_else(|| log_offset(&log, "reconciling")),
        requests: requests() - before,
        host_peak: peak,
        plugin_peak,
        off_truth,
    }
}

/// N VMs powered on, one IP and one `AppTier` each; on the firewall (`hold`
/// registers an IP with tags, or maps it in objects of those names), most
/// right, every 20th with a stale tier, every 20th missing, and N/20 IPs no
/// VM has.
async fn prepare(prism: &PrismSim, hold: impl Fn(&str, &[&str]), n: usize) {
    for i in 0..n {
        let vm = NewVm::named(format!("vm-{i}"))
            .powered_on()
            .category("AppTier", TIERS[i % TIERS.len()])
            .nic([vm_ip(i)]);
        prism.create_vm(vm).await.unwrap();
        match i % 20 {
            0 => hold(&vm_ip(i), &["ntnx.managed", "ntnx.AppTier.Old"]),
            1 => {}
            _ => {
                let t = tags(i);
                hold(&vm_ip(i), &[&t[0], &t[1]]);
            }
        }
    }
    for i in 0..n / 20 {
        hold(
            &format!("172.16.{}.{}", i / 250, i % 250 + 1),
            &["ntnx.managed"],
        );
    }
}

/// N VMs powered on, one IP each; every 100th in the F5 pool.
async fn prepare_f5(prism: &PrismSim, n: usize) {
    for i in 0..n {
        let mut vm = NewVm::named(format!("vm-{i}")).powered_on().nic([vm_ip(i)]);
        if in_pool(i) {
            vm = vm.category("F5Pool", "web");
        }
        prism.create_vm(vm).await.unwrap();
    }
}

fn spawn(binary: &Path, config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("PRISMHOOK_LOG", "info,wasmtime=warn,cranelift=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting the prismhook binary")
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / f64::from(1 << 20))
}

#[tokio::main]
async fn main() {
    println!("# prismhook bench: reconcile at scale (issue 16)");
    common::machine_note();
    let sizes: Vec<usize> = std::env::var("RECONCILE_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 50_000, 200_000]);
    let vendor = match std::env::var("RECONCILE_PLUGIN").as_deref() {
        Ok("f5-bigip") => Vendor::F5,
        Ok("cisco-fmc") => Vendor::Fmc,
        Ok("paloalto") | Err(_) => Vendor::PaloAlto,
        Ok(other) => {
            panic!("RECONCILE_PLUGIN: no plugin `{other}` (paloalto, f5-bigip, cisco-fmc)")
        }
    };
    let ours = common::component(vendor.plugin());
    let hosts: Vec<(String, (PathBuf, PathBuf))> = match std::env::var("RECONCILE_HOSTS") {
        Ok(list) => list
            .split(',')
            .filter_map(|h| h.split_once('='))
            .map(|(label, paths)| {
                let (binary, plugin) = match paths.split_once(':') {
                    Some((binary, plugin)) => (binary.into(), plugin.into()),
                    None => (paths.into(), ours.clone()),
                };
                (label.to_owned(), (binary, plugin))
            })
            .collect(),
        Err(_) => vec![(
            "this build".into(),
            (env!("CARGO_BIN_EXE_prismhook").into(), ours),
        )],
    };
    match vendor {
        Vendor::PaloAlto => println!(
            "the release binary, the Palo Alto plugin, its default limits (64 MiB, 5 s a call); \
             Prism simulator paging by 500; PAN-OS simulator with every 20th IP stale, every 20th \
             missing and N/20 foreign IPs; time from the host's start until its status reports the \
             reconcile\n"
        ),
        Vendor::F5 => println!(
            "the release binary, the F5 plugin, its default limits; Prism simulator paging by 500, \
             every 100th VM in pool {POOL}; BIG-IP simulator with the pool empty; time from the \
             host's start until its status reports the reconcile\n"
        ),
        Vendor::Fmc => println!(
            "the release binary, the Cisco FMC plugin (Go), its default limits (64 MiB, 5 s a \
             call); Prism simulator paging by 500; FMC simulator without its rate limit, its \
             dynamic objects with every 20th IP in a stale tier, every 20th missing and N/20 \
             foreign IPs; time from the host's start until its status reports the reconcile\n"
        ),
    }
    println!("| VMs | host | result | time | of which listing | firewall requests | host peak RSS | plugin peak memory | IPs off the truth after |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        for (label, host) in &hosts {
            print_row(one_size(vendor, label, host, n).await);
        }
    }
}

fn print_row(f: Figures) {
    println!(
        "| {} | {} | {} | {:.1} s | {} | {} | {} | {} | {} |",
        f.vms,
        f.host,
        f.outcome,
        f.took.as_secs_f64(),
        f.listing.map_or("–".into(), |s| format!("{s:.1} s")),
        f.requests,
        f.host_peak.map_or("–".into(), |b| mib(b as f64)),
        f.plugin_peak.map_or("–".into(), mib),
        f.off_truth,
    );
}
