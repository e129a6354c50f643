//! The Nutanix side end to end over real sockets: the Prism simulator posts
//! to the host's listener, the Palo Alto plugin drives the PAN-OS simulator.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use prismhook::app::App;
use prismhook::config::Config;
use prismhook_sim::panos::{PanosConfig, PanosSim};
use prismhook_sim::prism::{NewNic, NewVm, PrismConfig, PrismFaults, PrismSim};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

struct World {
    prism: PrismSim,
    panos: PanosSim,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(common::component("paloalto"), plugins.join("paloalto.wasm")).unwrap();
    World {
        prism: PrismSim::start("127.0.0.1:0".parse().unwrap(), PrismConfig::default())
            .await
            .unwrap(),
        panos: PanosSim::start("127.0.0.1:0".parse().unwrap(), PanosConfig::default())
            .await
            .unwrap(),
        dir,
    }
}

impl World {
    fn config(&self, extra_clusters: &str) -> Config {
        let fw = self.panos.base_url();
        let text = format!(
            r#"
instance = "test"
[listener]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
data_dir = "{data}"
[delivery]
retry_initial = "50ms"
retry_max = "200ms"
[plugins]
dir = "{plugins}"
watch = false
[plugin.paloalto]
config = {{ firewall = "{fw}" }}
allow = ["{fw}"]
inject = [{{ origin = "{fw}", header = "X-PAN-KEY", value = "{key}" }}]
[[cluster]]
name = "lab"
prism_url = "{prism}"
username = "admin"
password = {{ value = "nutanix/4u" }}
reconcile_interval = "0s"
{extra_clusters}
"#,
            data = self.dir.path().join("data").display(),
            plugins = self.dir.path().join("plugins").display(),
            key = PanosConfig::default().api_key,
            prism = self.prism.base_url(),
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    async fn start(&self) -> App {
        let app = App::start(self.config("")).await.unwrap();
        wait(
            || app.cluster_status().iter().all(|c| c.registered),
            "registration",
        )
        .await;
        app
    }
}

async fn wait(ready: impl FnMut() -> bool, what: &str) {
    common::wait_until(what, Duration::from_secs(30), ready).await
}

#[tokio::test]
async fn the_host_registers_one_webhook_with_credentials_it_then_requires() {
    let w = world().await;
    let app = w.start().await;
    let hooks = w.prism.webhooks();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook.name, "test-lab");
    assert_eq!(
        hook.post_url,
        format!("http://{}/listener/callback/lab", app.listener_addr)
    );
    assert!(hook.events_filter_list.contains(&"VM.ON".to_owned()));
    assert!(
        !hook
            .events_filter_list
            .iter()
            .any(|e| e.starts_with("SUBNET")),
        "paloalto does not subscribe to subnets"
    );
    let creds = hook.credentials.clone().unwrap();

    let client = reqwest::Client::new();
    let body = common::fixture_json("nutanix/vm_on.json").to_string();
    let url = &hook.post_url;
    let post = |user: &str, pass: &str, body: String| {
        client
            .post(url)
            .basic_auth(user, Some(pass))
            .body(body)
            .send()
    };
    assert_eq!(
        post(&creds.username, "wrong", body.clone())
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client
            .post(url)
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let bad = post(&creds.username, &creds.password, "{\"event_type\": ".into())
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("not JSON"));
    let missing = post(
        &creds.username,
        &creds.password,
        "{\"version\":\"1.0\"}".into(),
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 400);
    let huge = post(&creds.username, &creds.password, "x".repeat(2 << 20))
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    // None of those was stored.
    assert!(app
        .ledger
        .backlog()
        .unwrap()
        .iter()
        .all(|b| b.pending + b.delivered + b.in_flight == 0));
    assert_eq!(
        post(&creds.username, &creds.password, body)
            .await
            .unwrap()
            .status(),
        202
    );
    common::drained(&app).await;
    assert_eq!(w.panos.registered()["1.2.3.4"], vec!["ntnx.managed"]);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn every_fixture_notification_flows_from_prism_to_the_firewall() {
    let w = world().await;
    let app = w.start().await;
    let order = [
        "vm_create.json",
        "vm_on.json",
        "vm_update_nic_ip.json",
        "vm_nic_plug.json",
        "vm_migrate.json",
        "vm_off.json",
        "vm_delete_full.json",
        "subnet_create.json",
    ];
    for name in order {
        let body: Value = common::fixture_json(&format!("nutanix/{name}"));
        let is_vm = body["entity_reference"]["kind"] == "vm";
        let delivered = w.prism.notify(body).await;
        assert_eq!(
            delivered,
            usize::from(is_vm),
            "{name}: only subscribed types reach the listener"
        );
    }
    common::drained(&app).await;
    assert!(
        w.prism.deliveries().iter().all(|d| d.status == Some(202)),
        "{:?}",
        w.prism.deliveries()
    );
    // web-01 was created, changed, switched off and deleted; `example` is on.
    assert_eq!(
        w.panos.registered(),
        BTreeMap::from([("1.2.3.4".to_owned(), vec!["ntnx.managed".to_owned()])])
    );
    assert_eq!(app.dispatcher.counters()["paloalto"].delivered, 7);
    assert_eq!(w.panos.stats().commits, 0);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn older_and_newer_payload_variants_are_both_understood() {
    let w = world().await;
    let app = w.start().await;
    for legacy in [true, false] {
        w.prism.set_faults(PrismFaults {
            legacy_payloads: legacy,
            empty_delete_metadata: legacy,
            ..Default::default()
        });
        let vm = w
            .prism
            .create_vm(
                NewVm::named("v")
                    .powered_on()
                    .category("Env", "Dev")
                    .nic(["10.5.0.1"]),
            )
            .await
            .unwrap()
            .uuid;
        common::drained(&app).await;
        assert_eq!(
            w.panos.registered(),
            common::firewall_truth(&w.prism.vms()),
            "legacy={legacy}"
        );
        w.prism
            .plug_nic(&vm, NewNic::with_ips(["10.5.0.2"]))
            .await
            .unwrap();
        common::drained(&app).await;
        assert_eq!(w.panos.registered().len(), 2, "legacy={legacy}");
        w.prism.delete_vm(&vm).await.unwrap();
        common::drained(&app).await;
        assert!(w.panos.registered().is_empty(), "legacy={legacy}");
    }
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn ten_restarts_leave_exactly_one_webhook() {
    let w = world().await;
    for _ in 0..10 {
        let app = w.start().await;
        app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    }
    assert_eq!(w.prism.webhooks().len(), 1);
    let app = w.start().await;
    app.shutdown(true, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        w.prism.webhooks().len(),
        0,
        "--deregister-on-exit removes it"
    );
}

#[tokio::test]
async fn duplicates_of_our_webhook_are_removed_and_foreign_ones_left_alone() {
    let w = world().await;
    let app = w.start().await;
    let ours = w.prism.webhooks()[0].clone();
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    // Someone else's webhook, and a stray copy of ours (same name).
    let client = reqwest::Client::new();
    for (name, url) in [
        ("someone-else", "http://10.0.0.1/hook"),
        (ours.name.as_str(), "http://10.0.0.2/old"),
    ] {
        let r = client
            .post(format!("{}/api/nutanix/v3/webhooks", w.prism.base_url()))
            .basic_auth("admin", Some("nutanix/4u"))
            .json(&json!({"api_version": "3.1", "metadata": {"kind": "webhook"},
                "spec": {"name": name, "resources": {"post_url": url, "events_filter_list": ["VM.ON"]}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let app = w.start().await;
    let names: Vec<String> = w.prism.webhooks().iter().map(|h| h.name.clone()).collect();
    assert_eq!(
        names.iter().filter(|n| *n == &ours.name).count(),
        1,
        "{names:?}"
    );
    assert!(names.contains(&"someone-else".to_owned()));
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_cluster_that_is_down_does_not_hold_up_another() {
    let w = world().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let config = w.config(&format!(
        "[[cluster]]\nname = \"down\"\nprism_url = \"http://{dead}\"\nusername = \"admin\"\npassword = {{ value = \"x\" }}\n"
    ));
    let app = App::start(config).await.unwrap();
    wait(
        || {
            app.cluster_status()
                .iter()
                .any(|c| c.name == "lab" && c.registered)
        },
        "lab to register",
    )
    .await;
    wait(
        || {
            app.cluster_status()
                .iter()
                .any(|c| c.name == "down" && c.last_error.is_some())
        },
        "down to report",
    )
    .await;
    let down = app
        .cluster_status()
        .into_iter()
        .find(|c| c.name == "down")
        .unwrap();
    assert!(
        down.last_error.unwrap().contains("down"),
        "the error names the cluster"
    );
    w.prism
        .create_vm(NewVm::named("v").powered_on().nic(["10.6.0.1"]))
        .await
        .unwrap();
    common::drained(&app).await;
    assert_eq!(w.panos.registered().len(), 1);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// 200 VMs through a random lifecycle while Prism drops, duplicates and
/// reorders deliveries: after one reconcile the firewall equals the truth.
#[tokio::test]
async fn the_firewall_converges_after_lost_duplicated_and_reordered_webhooks() {
    let w = world().await;
    let app = w.start().await;
    w.prism.set_faults(PrismFaults {
        drop_rate: 0.2,
        duplicate_rate: 0.2,
        reorder: true,
        seed: 7,
        ..Default::default()
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut uuids = Vec::new();
    let mut next_ip = 0u32;
    let mut ip = || {
        next_ip += 1;
        format!(
            "10.{}.{}.{}",
            100 + next_ip / 65536,
            (next_ip / 256) % 256,
            next_ip % 256
        )
    };
    for i in 0..200 {
        let mut vm = NewVm::named(format!("vm-{i}")).nic([ip()]);
        if rng.random_bool(0.5) {
            vm = vm.powered_on();
        }
        if rng.random_bool(0.5) {
            vm = vm.category("AppTier", ["Web", "App", "Db"][rng.random_range(0..3)]);
        }
        uuids.push(w.prism.create_vm(vm).await.unwrap().uuid);
    }
    for _ in 0..300 {
        let uuid = uuids[rng.random_range(0..uuids.len())].clone();
        match rng.random_range(0..5) {
            0 => drop(w.prism.set_power(&uuid, true).await),
            1 => drop(w.prism.set_power(&uuid, false).await),
            2 => {
                let cats = BTreeMap::from([(
                    "Env".to_owned(),
                    ["Prod", "Dev"][rng.random_range(0..2)].to_owned(),
                )]);
                drop(w.prism.set_categories(&uuid, cats).await)
            }
            3 => drop(w.prism.plug_nic(&uuid, NewNic::with_ips([ip()])).await),
            _ => {
                if rng.random_bool(0.3) {
                    drop(w.prism.delete_vm(&uuid).await);
                    uuids.retain(|u| u != &uuid);
                }
            }
        }
    }
    w.prism.flush().await;
    common::drained(&app).await;
    let expected = common::firewall_truth(&w.prism.vms());
    assert_ne!(
        w.panos.registered(),
        expected,
        "with 20% of the webhooks lost the firewall should be off"
    );
    let lines = app.registrars[0].reconcile().await.unwrap();
    assert!(lines.iter().all(|l| !l.contains("failed")), "{lines:?}");
    assert_eq!(w.panos.registered(), expected);
    assert_eq!(w.panos.stats().commits, 0);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn the_listener_serves_https_when_configured_and_prism_posts_over_it() {
    let w = world().await;
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_path, key_path) = (w.dir.path().join("cert.pem"), w.dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut config = w.config("");
    config.listener.tls = Some(prismhook::config::TlsFiles {
        cert: cert_path,
        key: key_path,
    });
    let app = App::start(config).await.unwrap();
    wait(
        || app.cluster_status().iter().all(|c| c.registered),
        "registration",
    )
    .await;
    let hook = w.prism.webhooks()[0].clone();
    assert!(hook.post_url.starts_with("https://"), "{}", hook.post_url);
    w.prism
        .create_vm(NewVm::named("tls").powered_on().nic(["10.7.0.1"]))
        .await
        .unwrap();
    common::drained(&app).await;
    assert_eq!(w.panos.registered().len(), 1, "{:?}", w.prism.deliveries());
    // Plain HTTP to the TLS port gets nowhere.
    let plain = hook.post_url.replacen("https://", "http://", 1);
    let answer = reqwest::Client::new().post(plain).body("{}").send().await;
    assert!(
        !matches!(&answer, Ok(r) if r.status().is_success()),
        "{answer:?}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn operators_can_sync_list_and_remove_the_webhook_from_the_command_line() {
    let w = world().await;
    let fw = w.panos.base_url();
    let config = w.dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "instance = \"test\"\n[listener]\nlisten = \"127.0.0.1:18080\"\n[storage]\ndata_dir = \"{}\"\n\
             [plugins]\ndir = \"{}\"\n[plugin.paloalto]\nconfig = {{ firewall = \"{fw}\" }}\n\
             [[cluster]]\nname = \"lab\"\nprism_url = \"{}\"\nusername = \"admin\"\npassword = {{ value = \"nutanix/4u\" }}\n",
            w.dir.path().join("data").display(),
            w.dir.path().join("plugins").display(),
            w.prism.base_url()
        ),
    )
    .unwrap();
    let run = |action: &'static str| {
        let config = config.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_prismhook"))
                .args(["webhooks", action, "--config"])
                .arg(&config)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{action}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    for _ in 0..2 {
        let out = run("sync").await;
        assert!(out.contains("in sync (8 events)"), "{out}");
    }
    assert_eq!(
        w.prism.webhooks().len(),
        1,
        "syncing twice leaves one webhook"
    );
    assert_eq!(
        w.prism.webhooks()[0].post_url,
        "http://127.0.0.1:18080/listener/callback/lab"
    );
    let out = run("list").await;
    assert!(
        out.contains("[this host]") && out.contains("test-lab"),
        "{out}"
    );
    let out = run("remove").await;
    assert!(out.contains("removed 1 webhook"), "{out}");
    assert!(w.prism.webhooks().is_empty());
}
