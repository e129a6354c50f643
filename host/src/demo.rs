//! `prismhook demo`: the whole path on loopback, in one command.
//!
//! Starts the Prism and PAN-OS simulators and a host with the Palo Alto
//! plugin, lets the host register its webhook, drives a VM through its
//! lifecycle in the Prism simulator, and prints the firewall's IP→tag table
//! after each step.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prismhook_sim::panos::{PanosConfig, PanosSim};
use prismhook_sim::prism::{NewNic, NewVm, PrismConfig, PrismSim};

use crate::app::App;
use crate::config::Config;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(plugins: Option<PathBuf>) -> anyhow::Result<()> {
    let source = plugins
        .unwrap_or_else(|| PathBuf::from("target/plugins"))
        .join("paloalto.wasm");
    if !source.is_file() {
        bail!(
            "{} not found: build it with `cargo xtask plugins` (the README's demo command does)",
            source.display()
        );
    }
    let work = tempdir()?;
    let plugins_dir = work.join("plugins");
    std::fs::create_dir_all(&plugins_dir)?;
    std::fs::copy(&source, plugins_dir.join("paloalto.wasm")).context("copying paloalto.wasm")?;

    let panos_cfg = PanosConfig::default();
    let api_key = panos_cfg.api_key.clone();
    let panos = PanosSim::start("127.0.0.1:0".parse()?, panos_cfg).await?;
    let prism_cfg = PrismConfig::default();
    let prism_password = prism_cfg.password.clone();
    let prism = PrismSim::start("127.0.0.1:0".parse()?, prism_cfg).await?;
    println!("Prism simulator   {}", prism.base_url());
    println!("PAN-OS simulator  {}", panos.base_url());

    let toml = format!(
        r#"
instance = "prismhook-demo"
[listener]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
data_dir = "{data}"
[plugins]
dir = "{plugins}"
watch = false
[plugin.paloalto]
config = {{ firewall = "{fw}", vsys = "vsys1" }}
allow = ["{fw}"]
inject = [{{ origin = "{fw}", header = "X-PAN-KEY", value = "{key}" }}]
[[cluster]]
name = "demo"
prism_url = "{prism}"
username = "admin"
password = {{ value = "{prism_password}" }}
reconcile_interval = "0s"
"#,
        data = work.join("data").display(),
        plugins = plugins_dir.display(),
        fw = panos.base_url(),
        key = api_key,
        prism = prism.base_url(),
    );
    let config = Config::parse(&toml, &work.join("demo.toml"))?;
    let started = Instant::now();
    let app = App::start(config).await?;
    for r in &app.loaded {
        println!("plugin            {}", serde_json::to_string(r)?);
    }
    println!("listener          http://{}", app.listener_addr);

    wait_for(
        || app.cluster_status().iter().all(|c| c.registered),
        "the webhook to be registered",
    )
    .await?;
    let hooks = prism.webhooks();
    println!(
        "webhook           {} registered in Prism for {} event types\n",
        hooks.len(),
        hooks.first().map_or(0, |h| h.events_filter_list.len())
    );

    let vm = prism
        .create_vm(NewVm::named("web-01").nic(["10.23.129.96"]))
        .await?
        .uuid;
    step(&app, &panos, "VM.CREATE   web-01 created, powered off").await?;
    prism.set_power(&vm, true).await?;
    step(&app, &panos, "VM.ON       web-01 powered on").await?;
    prism
        .plug_nic(&vm, NewNic::with_ips(["192.168.50.23"]))
        .await?;
    step(&app, &panos, "VM.NIC_PLUG a second NIC with 192.168.50.23").await?;
    let categories = [("AppTier", "Web"), ("Environment", "Production")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    prism.set_categories(&vm, categories).await?;
    step(
        &app,
        &panos,
        "VM.UPDATE   categories AppTier=Web, Environment=Production",
    )
    .await?;
    prism.migrate(&vm, "ahv-host-2").await?;
    step(
        &app,
        &panos,
        "VM.MIGRATE  moved to ahv-host-2 (tags unchanged)",
    )
    .await?;
    prism.set_power(&vm, false).await?;
    step(&app, &panos, "VM.OFF      web-01 powered off").await?;
    prism.delete_vm(&vm).await?;
    step(&app, &panos, "VM.DELETE   web-01 deleted").await?;

    let stats = panos.stats();
    let counters = app.dispatcher.counters();
    let delivered = counters.get("paloalto").map_or(0, |c| c.delivered);
    println!("summary");
    println!("  events delivered to the plugin   {delivered}");
    println!("  firewall requests                {}", stats.requests);
    println!("  User-ID messages                 {}", stats.uid_messages);
    println!("  commits                          {}", stats.commits);
    println!(
        "  the 2017 framework would have made ~{} firewall calls and {} commits for the same events",
        delivered * 7,
        delivered
    );
    println!(
        "  elapsed                          {:.2}s",
        started.elapsed().as_secs_f64()
    );
    app.shutdown(true, Duration::from_secs(5)).await?;
    println!(
        "  webhooks left in Prism after shutdown: {}",
        prism.webhooks().len()
    );
    panos.shutdown().await;
    prism.shutdown().await;
    let _ = std::fs::remove_dir_all(&work);
    if stats.commits != 0 {
        bail!("the plugin committed; it never should");
    }
    Ok(())
}

async fn step(app: &App, panos: &PanosSim, title: &str) -> anyhow::Result<()> {
    drain(app).await?;
    println!("{title}");
    let table = panos.registered();
    if table.is_empty() {
        println!("    (no registrations)");
    }
    for (ip, tags) in table {
        println!("    {ip:<16} {}", tags.join(", "));
    }
    println!();
    Ok(())
}

/// Waits until every stored event has been delivered.
async fn drain(app: &App) -> anyhow::Result<()> {
    wait_for(
        || {
            app.ledger
                .backlog()
                .map(|b| b.iter().all(|p| p.pending + p.in_flight + p.retrying == 0))
                .unwrap_or(false)
        },
        "the plugin to handle the events",
    )
    .await
}

async fn wait_for(mut ready: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let until = Instant::now() + DRAIN_TIMEOUT;
    // A short pause first: the simulator's delivery and the listener's
    // answer race with the first look.
    tokio::time::sleep(Duration::from_millis(50)).await;
    while !ready() {
        if Instant::now() > until {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("prismhook-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
