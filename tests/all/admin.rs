//! The admin listener end to end: a host started on the Prism simulator (and
//! the PAN-OS simulator where the firewall plugin is loaded), the admin API
//! served on its own loopback port, real notifications posted to the
//! listener, and the answers read over HTTP — by reqwest, by the CLI's
//! client, and by headless Chromium for the status page.

use crate::common::{self, Cluster, HostConfig};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use prismhook::admin::api::{DlqSelection, ReplayRequest};
use prismhook::admin::client::{self, AdminClient};
use prismhook::admin::AdminState;
use prismhook::app::App;
use prismhook::config::Config;
use prismhook::secret::Secret;
use prismhook_sim::panos::PanosSim;
use prismhook_sim::prism::PrismSim;
use serde_json::{json, Value};

const WEBHOOK_USER: &str = "prismhook";
use common::setup::WEBHOOK_PASSWORD;
const TOKEN: &str = "admin-token-for-tests";

struct World {
    prism: PrismSim,
    panos: PanosSim,
    dir: tempfile::TempDir,
}

/// What a test's host is made of, beyond the probe plugin and cluster `lab`.
#[derive(Default)]
struct Setup {
    token: bool,
    paloalto: bool,
    /// The clusters, or `None` for `lab` alone.
    clusters: Option<Vec<Cluster>>,
    /// The probe's `config` table, if not its defaults.
    probe_config: Option<&'static str>,
}

async fn world() -> World {
    common::init_tracing();
    World {
        prism: common::setup::start_prism().await,
        panos: common::setup::start_panos().await,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl World {
    fn config(&self, setup: &Setup) -> Config {
        let mut host = HostConfig::new(self.dir.path()).fast_retries();
        let mut components = vec!["probe"];
        if setup.paloalto {
            components.push("paloalto");
            host = host.paloalto(&self.panos);
        }
        common::setup::install(host.plugins_dir(), &components);
        if let Some(config) = setup.probe_config {
            host = host.plugin("probe", &[format!("config = {config}")]);
        }
        if setup.token {
            host = host.admin_token(TOKEN);
        }
        let clusters = setup
            .clusters
            .clone()
            .unwrap_or_else(|| vec![Cluster::lab(&self.prism)]);
        clusters
            .into_iter()
            .fold(host, HostConfig::cluster)
            .config()
    }

    async fn start(&self, setup: Setup) -> Host {
        let app = App::start(self.config(&setup)).await.unwrap();
        Host::serve(app).await
    }
}

/// A started host and the admin API it serves on a loopback port.
struct Host {
    app: App,
    admin: AdminState,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Host {
    async fn serve(app: App) -> Host {
        Host {
            admin: app.admin.clone(),
            addr: app.admin_addr,
            app,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn client(&self, token: Option<&str>) -> AdminClient {
        AdminClient::new(self.addr, token.map(Secret::new)).unwrap()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn metrics(&self, token: Option<&str>) -> String {
        let resp = self.get("/metrics", token).await;
        assert_eq!(resp.status(), 200);
        let kind = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        resp.text().await.unwrap()
    }

    /// Posts a notification to cluster `lab` as Prism would; returns the
    /// listener's status.
    async fn notify(&self, body: &Value, password: &str) -> u16 {
        self.http
            .post(format!(
                "http://{}/listener/callback/lab",
                self.app.listener_addr
            ))
            .basic_auth(WEBHOOK_USER, Some(password))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// A probe event: its type picks what the probe does (see its docs).
    async fn probe_event(&self, event_type: &str, entity: &str, extra: Value) -> u16 {
        let mut body = json!({
            "event_type": event_type,
            "entity_reference": {"kind": "test", "uuid": entity},
            "version": "1.0",
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let status = self.notify(&body, WEBHOOK_PASSWORD).await;
        assert_eq!(status, 202, "{event_type} for {entity}");
        status
    }

    async fn registered(&self) {
        common::registered_and_reconciled(&self.app).await;
    }

    /// Drops this clone of the admin state first: it holds the reloader,
    /// which the host's shutdown waits to see dropped.
    async fn shutdown(self) {
        let Host { app, admin, .. } = self;
        drop(admin);
        app.shutdown(false, Duration::from_secs(5)).await.unwrap();
    }
}

async fn wait(ready: impl FnMut() -> bool, what: &str) {
    common::wait_until(what, Duration::from_secs(30), ready).await
}

fn counter(host: &Host, plugin: &str, f: impl Fn(&prismhook::dispatch::Counters) -> u64) -> u64 {
    host.app.dispatcher.counters().get(plugin).map_or(0, f)
}

/// The value of one sample, by its exact name and labels.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

#[track_caller]
fn assert_sample(text: &str, series: &str, expected: f64) {
    assert_eq!(sample(text, series), Some(expected), "{series} in:\n{text}");
}

#[tokio::test]
async fn every_admin_route_but_healthz_needs_the_token() {
    let w = world().await;
    let host = w
        .start(Setup {
            token: true,
            clusters: Some(Vec::new()),
            ..Default::default()
        })
        .await;

    let health = host.get("/healthz", None).await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap().trim(), "ok");

    for path in [
        "/metrics",
        "/readyz",
        "/api/plugins",
        "/api/clusters",
        "/api/hosts",
        "/api/dlq",
        "/",
    ] {
        let none = host.get(path, None).await;
        assert_eq!(none.status(), 401, "{path} without a token");
        assert_eq!(
            none.headers()["www-authenticate"],
            "Bearer realm=\"prismhook admin\"",
            "{path}"
        );
        let body: Value = none.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
        assert_eq!(
            host.get(path, Some("admin-token-for-testz")).await.status(),
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            host.get(path, Some(TOKEN)).await.status(),
            200,
            "{path} with the token"
        );
    }
    let replay = host
        .http
        .post(host.url("/api/dlq/replay"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 401, "actions need the token too");

    // The browser opens the page with the token in the query; only the page
    // takes it from there.
    let page = host.get(&format!("/?token={TOKEN}"), None).await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<title>prismhook status</title>"));
    assert_eq!(
        host.get(&format!("/api/plugins?token={TOKEN}"), None)
            .await
            .status(),
        401
    );

    // The CLI's client says what to fix.
    let e = host
        .client(Some("wrong"))
        .plugins()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("(401)") && e.contains("admin.token"), "{e}");
    let plugins = host.client(Some(TOKEN)).plugins().await.unwrap();
    assert_eq!(
        plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["probe"]
    );
    host.shutdown().await;
}

#[tokio::test]
async fn metrics_after_a_scripted_run_count_notifications_backlog_and_outcomes() {
    let w = world().await;
    let host = w
        .start(Setup {
            paloalto: true,
            ..Default::default()
        })
        .await;
    host.registered().await;

    host.probe_event("TEST.NOTE", "e-1", json!({})).await;
    host.probe_event("TEST.NOTE", "e-2", json!({})).await;
    host.probe_event("TEST.REJECT", "e-3", json!({})).await;
    // Retried much later: stays in the backlog while the test reads it.
    host.probe_event("TEST.RETRY", "e-4", json!({"delay_ms": 600_000}))
        .await;
    assert_eq!(
        host.notify(
            &common::fixture_json("nutanix/vm_on.json"),
            WEBHOOK_PASSWORD
        )
        .await,
        202
    );
    assert_eq!(
        host.notify(&json!({"event_type": "TEST.NOTE"}), "wrong")
            .await,
        401
    );
    assert_eq!(
        host.notify(&json!({"version": "1.0"}), WEBHOOK_PASSWORD)
            .await,
        400
    );

    wait(
        || {
            counter(&host, "probe", |c| c.delivered) == 3
                && counter(&host, "probe", |c| c.rejected) == 1
                && counter(&host, "probe", |c| c.retried) == 1
                && counter(&host, "paloalto", |c| c.delivered) == 1
        },
        "every delivery to be handled once",
    )
    .await;
    // The outcome is counted just before it is committed.
    wait(
        || {
            host.app
                .ledger
                .backlog()
                .unwrap()
                .iter()
                .all(|b| b.in_flight == 0)
        },
        "outcomes to be committed",
    )
    .await;
    assert_eq!(
        w.panos.registered()["1.2.3.4"],
        vec!["ntnx.managed"],
        "the VM reached the firewall"
    );

    // Both plugins loaded with Winch's code (nothing cached): wait for the
    // swaps to Cranelift's, which the metrics count.
    wait(
        || {
            host.app.registry.snapshot().values().all(|e| {
                e.plugin
                    .as_ref()
                    .is_some_and(|p| p.tier() == prismhook::runtime::Tier::Optimized)
            })
        },
        "Cranelift's code to serve",
    )
    .await;
    // Neither plugin's init calls the host: each is snapshotted after init
    // once Cranelift's code serves, which the plugin list reports.
    wait(
        || {
            host.app
                .registry
                .snapshot()
                .values()
                .all(|e| e.plugin.as_ref().is_some_and(|p| p.pre_initialised()))
        },
        "the snapshots after init to serve",
    )
    .await;
    let plugins = host.client(None).plugins().await.unwrap();
    assert!(
        plugins.iter().all(|p| p.pre_initialised == Some(true)),
        "{:?}",
        plugins
            .iter()
            .map(|p| (&p.name, p.pre_initialised))
            .collect::<Vec<_>>()
    );

    let text = host.metrics(None).await;
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with EOF");
    let notes =
        r#"prismhook_notifications_total{cluster="lab",event_type="TEST.NOTE",status="202"}"#;
    assert_sample(&text, notes, 2.0);
    assert_sample(
        &text,
        r#"prismhook_notifications_total{cluster="lab",event_type="TEST.REJECT",status="202"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_notifications_total{cluster="lab",event_type="VM.ON",status="202"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_notifications_total{cluster="lab",event_type="-",status="401"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_notifications_total{cluster="lab",event_type="-",status="400"}"#,
        1.0,
    );

    assert_sample(
        &text,
        r#"prismhook_deliveries_total{plugin="probe",outcome="done"}"#,
        3.0,
    );
    assert_sample(
        &text,
        r#"prismhook_deliveries_total{plugin="probe",outcome="reject"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_deliveries_total{plugin="probe",outcome="retry"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_deliveries_total{plugin="paloalto",outcome="done"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_calls_total{plugin="paloalto",result="failed"}"#,
        0.0,
    );
    assert!(
        sample(
            &text,
            r#"prismhook_plugin_handle_seconds_total{plugin="probe"}"#
        )
        .unwrap()
            > 0.0,
        "{text}"
    );

    assert_sample(
        &text,
        r#"prismhook_ledger_pending_deliveries{plugin="probe"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_ledger_retrying_deliveries{plugin="probe"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_ledger_pending_deliveries{plugin="paloalto"}"#,
        0.0,
    );
    assert_sample(
        &text,
        r#"prismhook_ledger_dead_letters{plugin="probe"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_ledger_delivered_total{plugin="probe"}"#,
        3.0,
    );
    assert_sample(&text, "prismhook_ledger_backlog", 1.0);
    let age = sample(
        &text,
        r#"prismhook_ledger_oldest_pending_age_seconds{plugin="probe"}"#,
    )
    .unwrap();
    assert!(age > 0.0 && age < 60.0, "the retrying event's age: {age}");
    assert_sample(
        &text,
        r#"prismhook_ledger_oldest_pending_age_seconds{plugin="paloalto"}"#,
        0.0,
    );
    assert!(
        sample(&text, "prismhook_ledger_commits_total").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "prismhook_ledger_file_bytes").unwrap() > 0.0,
        "{text}"
    );

    assert_sample(
        &text,
        r#"prismhook_plugin_state{plugin="probe",state="active"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_state{plugin="probe",state="quarantined"}"#,
        0.0,
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_quarantines_total{plugin="paloalto"}"#,
        0.0,
    );
    let memory = sample(
        &text,
        r#"prismhook_plugin_memory_peak_bytes{plugin="probe"}"#,
    )
    .unwrap();
    assert!(
        memory > 0.0 && memory <= (64 << 20) as f64,
        "the probe's peak memory: {memory}"
    );
    // What the probe recorded of the events, keys and values.
    let kv = host.app.runtime.kv().dump("probe").unwrap();
    let stored: usize = kv.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(stored > 0);
    assert_sample(
        &text,
        r#"prismhook_plugin_kv_bytes{plugin="probe"}"#,
        stored as f64,
    );
    assert_sample(
        &text,
        r#"prismhook_cluster_webhook_registered{cluster="lab"}"#,
        1.0,
    );
    assert_sample(&text, "prismhook_ready", 1.0);

    // The dispatcher times every handle call into the histogram.
    let calls = counter(&host, "probe", |c| c.calls) as f64;
    assert!(calls >= 1.0, "the probe was called");
    assert_sample(
        &text,
        r#"prismhook_plugin_handle_duration_seconds_count{plugin="probe"}"#,
        calls,
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_handle_duration_seconds_bucket{le="+Inf",plugin="probe"}"#,
        calls,
    );

    // The firewall plugin's request, by origin and status.
    let origin = w.panos.base_url().trim_end_matches('/').to_owned();
    let series = format!(
        r#"prismhook_plugin_outbound_requests_total{{plugin="paloalto",origin="{origin}",result="200"}}"#
    );
    assert!(
        sample(&text, &series).is_some_and(|n| n >= 1.0),
        "{series} in:\n{text}"
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_reloads_total{result="loaded"}"#,
        2.0,
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_reloads_total{result="optimized"}"#,
        2.0,
    );
    assert_sample(
        &text,
        r#"prismhook_plugin_reloads_total{result="failed"}"#,
        0.0,
    );
    // Cranelift's code of both, cached.
    assert!(
        sample(&text, "prismhook_compiled_cache_bytes").is_some_and(|n| n > 0.0),
        "{text}"
    );

    // Two hosts in one process keep their own numbers.
    let other = World::start(
        &world().await,
        Setup {
            clusters: Some(Vec::new()),
            ..Default::default()
        },
    )
    .await;
    let fresh = other.metrics(None).await;
    assert_eq!(sample(&fresh, notes), None, "{fresh}");
    other.shutdown().await;
    host.shutdown().await;
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_and_dropped_through_the_api() {
    let w = world().await;
    let host = w.start(Setup::default()).await;
    host.probe_event("TEST.REJECT", "r-1", json!({})).await;
    host.probe_event("TEST.REJECT", "r-2", json!({})).await;
    host.probe_event("TEST.NOTE", "n-1", json!({})).await;
    let dead = |n: u64| {
        let ledger = host.app.ledger.clone();
        move || {
            ledger
                .backlog()
                .unwrap()
                .iter()
                .find(|b| b.plugin == "probe")
                .is_some_and(|b| b.dead == n && b.pending == 0)
        }
    };
    wait(dead(2), "two dead letters").await;

    let api = host.client(None);
    let dlq = api.dead_letters(Some("probe"), 10).await.unwrap();
    assert_eq!(dlq.total, 2);
    let ids: Vec<u64> = dlq.dead_letters.iter().map(|d| d.event.id).collect();
    assert_eq!(ids.len(), 2);
    for d in &dlq.dead_letters {
        assert_eq!(
            (d.plugin.as_str(), d.event.event_type.as_str(), d.attempts),
            ("probe", "TEST.REJECT", 1)
        );
        assert_eq!(d.reason, "rejected: probe asked to reject");
    }
    let table = client::render_dead_letters(&dlq, prismhook::clock::now_ms());
    assert!(table.starts_with("PLUGIN  EVENT  TYPE"), "{table}");
    assert!(table.contains("r-1") && table.contains("r-2"), "{table}");
    assert_eq!(api.dead_letters(Some("nobody"), 10).await.unwrap().total, 0);
    assert_eq!(
        api.dead_letters(None, 1).await.unwrap().dead_letters.len(),
        1,
        "the limit holds"
    );

    // Replayed: the probe sees it again, rejects it again.
    let replayed = api
        .replay_dead(&DlqSelection {
            ids: Some(vec![ids[0]]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    wait(
        || counter(&host, "probe", |c| c.rejected) == 3,
        "the replayed event to be handled",
    )
    .await;
    wait(dead(2), "the replayed event to die again").await;

    // A misspelt field is refused, not read as a wider selection.
    let misspelt = host
        .http
        .post(host.url("/api/dlq/drop"))
        .json(&json!({ "plugin": "probe", "id": [ids[0]] }))
        .send()
        .await
        .unwrap();
    assert_eq!(misspelt.status(), 422);
    let why = misspelt.text().await.unwrap();
    assert!(why.contains("unknown field `id`"), "{why}");
    assert_eq!(api.dead_letters(None, 10).await.unwrap().total, 2);

    // Dropping is explicit and final.
    let e = api
        .drop_dead(&DlqSelection::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("400") && e.contains("all: true"), "{e}");
    assert_eq!(
        api.drop_dead(&DlqSelection {
            ids: Some(vec![ids[0]]),
            ..Default::default()
        })
        .await
        .unwrap(),
        1
    );
    assert_eq!(api.dead_letters(None, 10).await.unwrap().total, 1);
    assert_eq!(
        api.drop_dead(&DlqSelection {
            plugin: Some("probe".into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        1
    );
    assert!(api
        .dead_letters(None, 10)
        .await
        .unwrap()
        .dead_letters
        .is_empty());
    assert_sample(
        &host.metrics(None).await,
        r#"prismhook_ledger_dead_letters{plugin="probe"}"#,
        0.0,
    );

    // Replay since a time redelivers what was delivered.
    let request = ReplayRequest {
        plugin: "probe".into(),
        since_ms: 0,
        event_types: Some(vec!["TEST.NOTE".into()]),
    };
    assert_eq!(api.replay(&request).await.unwrap(), 1);
    wait(
        || counter(&host, "probe", |c| c.delivered) == 2,
        "the replayed note",
    )
    .await;
    let unknown = ReplayRequest {
        plugin: "nobody".into(),
        since_ms: 0,
        event_types: None,
    };
    let e = api.replay(&unknown).await.unwrap_err().to_string();
    assert!(
        e.contains("404") && e.contains("plugin `nobody` is not loaded"),
        "{e}"
    );
    host.shutdown().await;
}

#[tokio::test]
async fn plugins_clusters_reconcile_and_reload_answer_through_the_cli_client() {
    let w = world().await;
    let host = w.start(Setup::default()).await;
    host.registered().await;
    let api = host.client(None);

    let plugins = api.plugins().await.unwrap();
    assert_eq!(plugins.len(), 1);
    assert_eq!(
        (plugins[0].name.as_str(), plugins[0].state.as_str()),
        ("probe", "active")
    );
    assert_eq!(plugins[0].subscriptions, ["*"]);
    let table = client::render_plugins(&plugins, prismhook::clock::now_ms());
    assert!(
        table.lines().nth(1).unwrap().starts_with("probe "),
        "{table}"
    );

    let clusters = api.clusters().await.unwrap();
    assert_eq!(clusters.len(), 1);
    assert!(
        clusters[0].registered && clusters[0].webhook_uuid.is_some(),
        "{clusters:?}"
    );
    assert!(client::render_clusters(&clusters, prismhook::clock::now_ms()).contains("lab"));

    let results = api.reconcile(None).await.unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].cluster, "lab");
    assert_eq!(results[0].error, None);
    assert_eq!(results[0].plugins, ["probe: 0 vms"]);
    assert_eq!(client::render_reconcile(&results), "lab:\n  probe: 0 vms\n");
    let e = api
        .reconcile(Some("elsewhere"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("404") && e.contains("no cluster endpoint named `elsewhere` is configured"),
        "{e}"
    );

    let reports = api.reload().await.unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["result"], "unchanged");
    assert!(client::render_reload(&reports).contains("unchanged  probe"));
    host.shutdown().await;
}

#[tokio::test]
async fn readiness_needs_a_registered_cluster_and_ends_when_shutdown_begins() {
    let w = world().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let down = vec![Cluster::new("down", &format!("http://{dead}"))];
    let host = w
        .start(Setup {
            clusters: Some(down),
            ..Default::default()
        })
        .await;
    wait(
        || host.app.cluster_status()[0].last_error.is_some(),
        "the first failed registration",
    )
    .await;
    let resp = host.get("/readyz", None).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["ready"], false);
    let reason = body["reasons"][0].as_str().unwrap();
    assert!(
        reason.starts_with("cluster `down`: webhook not registered"),
        "{reason}"
    );
    host.shutdown().await;

    let host = w.start(Setup::default()).await;
    host.registered().await;
    let resp = host.get("/readyz", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"ready": true, "reasons": []})
    );
    host.admin.set_ready(false);
    let resp = host.get("/readyz", None).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap()
            .contains("not accepting"),
        "{body}"
    );
    assert_eq!(
        host.get("/healthz", None).await.status(),
        200,
        "alive all the same"
    );
    host.shutdown().await;

    let host = w
        .start(Setup {
            clusters: Some(Vec::new()),
            ..Default::default()
        })
        .await;
    assert_eq!(
        host.get("/readyz", None).await.status(),
        200,
        "no cluster configured: nothing to wait for"
    );
    host.shutdown().await;
}

/// Runs Debian's chromium headless on `url` with `extra` flags; its stdout.
async fn chromium(profile: &Path, url: &str, extra: &[&str]) -> Vec<u8> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("/usr/bin/chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1200,900",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 2 minutes")
    .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether the browser is there to run a test in. Without it the test says
/// so and stops, unless `PRISMHOOK_REQUIRE_CHROMIUM` is set (scripts/test.sh,
/// CI): then it fails. Decided when the test runs, not when it is built, so
/// that the demo's build of the host serves the tests too.
fn chromium_present() -> bool {
    const CHROMIUM: &str = "/usr/bin/chromium";
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    assert!(
        std::env::var_os("PRISMHOOK_REQUIRE_CHROMIUM").is_none(),
        "PRISMHOOK_REQUIRE_CHROMIUM is set but {CHROMIUM} is missing (scripts/test.sh installs it)"
    );
    eprintln!("not run: {CHROMIUM} is missing (`apt-get install -y chromium` to test the status page in a browser)");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_clusters_plugins_and_dead_letters_in_headless_chromium() {
    if !chromium_present() {
        return;
    }
    let w = world().await;
    // Its `init` calls the host, so it cannot be snapshotted: the page
    // says so once the snapshot has been tried.
    let host = w
        .start(Setup {
            token: true,
            probe_config: Some("{ count_inits = true }"),
            ..Default::default()
        })
        .await;
    host.registered().await;
    wait(
        || {
            host.app.registry.status()["probe"]
                .init_every_call
                .is_some()
        },
        "the snapshot after init to be tried",
    )
    .await;
    host.probe_event("TEST.REJECT", "page-entity", json!({}))
        .await;
    host.probe_event("TEST.NOTE", "page-entity-2", json!({}))
        .await;
    wait(
        || counter(&host, "probe", |c| c.rejected + c.delivered) == 2,
        "both events to be handled",
    )
    .await;
    wait(
        || {
            host.app
                .ledger
                .backlog()
                .unwrap()
                .iter()
                .all(|b| b.in_flight == 0)
        },
        "outcomes to be committed",
    )
    .await;

    let url = host.url(&format!("/?token={TOKEN}"));
    let profile = tempfile::tempdir().unwrap();
    let dom = String::from_utf8(chromium(profile.path(), &url, &["--dump-dom"]).await).unwrap();
    assert!(
        dom.contains(r#"<div id="banner" style="display: none;"></div>"#),
        "the page read the API:\n{dom}"
    );
    // Only the script writes these: the page shipped has empty tables.
    for expected in [
        "<strong>lab</strong>",
        "<strong>probe</strong>",
        ">registered<",
        ">TEST.REJECT<",
        ">page-entity<",
        "rejected: probe asked to reject",
        "runs init in every call: its `init` calls the host's kv, http or inventory",
        r#"<span id="ready" class="badge ok">ready</span>"#,
    ] {
        assert!(
            dom.contains(expected),
            "the rendered page shows `{expected}`:\n{dom}"
        );
    }

    let shot = profile.path().join("status.png");
    let profile2 = tempfile::tempdir().unwrap();
    chromium(
        profile2.path(),
        &url,
        &[&format!("--screenshot={}", shot.display())],
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let (width, height) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((width, height), (1200, 900));
    // A blank or error page compresses to a few KB; tables of text do not.
    assert!(
        png.len() > 20_000,
        "the screenshot has content: {} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("PRISMHOOK_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("status-page.png")).unwrap();
    }
    host.shutdown().await;
}

/// A page on another site, opened in a real browser on the operator's
/// machine, tries to make the tokenless admin API reconcile. The browser
/// sends the request (no-cors POSTs are sent; only the answer is hidden),
/// so the API itself must refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_another_site_cannot_make_the_admin_api_act() {
    if !chromium_present() {
        return;
    }
    let w = world().await;
    let host = w.start(Setup::default()).await;
    host.registered().await;
    let has_record = |host: &Host| {
        host.app
            .runtime
            .kv()
            .dump("probe")
            .unwrap()
            .contains_key("reconcile/lab")
    };
    wait(|| has_record(&host), "the start-up reconcile").await;
    // A VM the start-up reconcile did not see: only a new reconcile puts
    // its uuid into the probe's `reconcile/lab` record.
    let vm = w
        .prism
        .create_vm(prismhook_sim::prism::NewVm::named("late").powered_on())
        .await
        .unwrap()
        .uuid;
    let reconciled = |host: &Host| {
        host.app
            .runtime
            .kv()
            .dump("probe")
            .unwrap()
            .get("reconcile/lab")
            .is_some_and(|v| String::from_utf8_lossy(v).contains(&vm))
    };
    assert!(!reconciled(&host));

    // The attacker's page, on another loopback address (another site).
    let target = host.url("/api/reconcile");
    let page = format!(
        r#"<html><body><script>
        fetch("{target}", {{ method: "POST", mode: "no-cors" }})
          .catch(() => {{}})
          .finally(() => {{ document.body.setAttribute("data-sent", "yes"); }});
        </script></body></html>"#
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let evil = format!("http://{}/", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
    let profile = tempfile::tempdir().unwrap();
    let dom = String::from_utf8(chromium(profile.path(), &evil, &["--dump-dom"]).await).unwrap();
    assert!(
        dom.contains(r#"data-sent="yes""#),
        "the page sent its request:\n{dom}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !reconciled(&host),
        "the cross-site POST made the host reconcile"
    );

    // The same request from the operator's CLI goes through, so the check
    // above could have seen a reconcile.
    AdminClient::new(host.addr, None)
        .unwrap()
        .reconcile(None)
        .await
        .unwrap();
    assert!(reconciled(&host));
    host.shutdown().await;
}

/// Beyond loopback the token would cross the network in the clear. With
/// `admin.tls` the API answers over TLS only, and the CLI's client, built
/// from the same configuration, trusts exactly that certificate: one made
/// for another name passes, and another certificate for the right address
/// does not.
#[tokio::test]
async fn with_admin_tls_the_api_answers_over_tls_only_and_the_cli_trusts_exactly_its_certificate() {
    let w = world().await;
    let write_cert = |name: &str, cert: &rcgen::CertifiedKey| {
        let (c, k) = (
            w.dir.path().join(format!("{name}.pem")),
            w.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
        (c, k)
    };
    let served = rcgen::generate_simple_self_signed(vec!["admin.example".into()]).unwrap();
    let (cert, key) = write_cert("admin", &served);
    let mut config = w.config(&Setup {
        token: true,
        ..Default::default()
    });
    config.admin.tls = Some(prismhook::config::TlsFiles { cert, key });
    let app = App::start(config.clone()).await.unwrap();
    let addr = app.admin_addr;
    config.admin.listen = addr;
    let cli = AdminClient::from_config(&config).unwrap();
    let plugins = cli.plugins().await.unwrap();
    assert_eq!(plugins[0].name, "probe");
    assert!(cli
        .dead_letters(None, 10)
        .await
        .unwrap()
        .dead_letters
        .is_empty());

    // Plain HTTP gets no answer, and the token sent with it reaches no handler.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/api/plugins"))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // A client that pins another certificate, even one for this very
    // address, refuses the host's.
    let stranger = rcgen::generate_simple_self_signed(vec![addr.ip().to_string()]).unwrap();
    let (other, _) = write_cert("stranger", &stranger);
    let e = AdminClient::over_tls(addr, Some(Secret::new(TOKEN)), &other)
        .unwrap()
        .plugins()
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("not the pinned one"), "{e:#}");
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}
