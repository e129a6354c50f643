//! The Prism simulator over loopback HTTP, driven the way prismhook and its
//! tests drive it.
//!
//! Run with: `cargo test -p prismhook-sim --test prism`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use base64::Engine as _;
use prismhook_sim::prism::{NewNic, NewVm, PrismConfig, PrismFaults, PrismSim};
use serde_json::{json, Value};

const USER: &str = "admin";
const PASSWORD: &str = "nutanix/4u";

async fn sim() -> PrismSim {
    PrismSim::start(any_port(), PrismConfig::default())
        .await
        .expect("simulator starts")
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn v3(sim: &PrismSim, path: &str) -> String {
    format!("{}/api/nutanix/v3{path}", sim.base_url())
}

fn control(sim: &PrismSim, path: &str) -> String {
    format!("{}/_sim{path}", sim.base_url())
}

async fn v3_post(sim: &PrismSim, path: &str, body: Value) -> (StatusCode, Value) {
    let resp = http()
        .post(v3(sim, path))
        .basic_auth(USER, Some(PASSWORD))
        .json(&body)
        .send()
        .await
        .unwrap();
    answer(resp).await
}

async fn v3_get(sim: &PrismSim, path: &str) -> (StatusCode, Value) {
    let resp = http()
        .get(v3(sim, path))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    answer(resp).await
}

async fn answer(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

fn webhook_body(name: &str, post_url: &str, events: &[&str]) -> Value {
    json!({
        "api_version": "3.1",
        "metadata": { "kind": "webhook" },
        "spec": {
            "name": name,
            "description": "test hook",
            "resources": {
                "post_url": post_url,
                "events_filter_list": events,
                "credentials": { "username": "hook-user", "password": "hook-secret" },
            },
        },
    })
}

async fn create_webhook(sim: &PrismSim, name: &str, post_url: &str, events: &[&str]) -> String {
    let (status, body) = v3_post(sim, "/webhooks", webhook_body(name, post_url, events)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["metadata"]["uuid"].as_str().unwrap().to_owned()
}

/// What a webhook receiver saw: path, Authorization header, JSON body.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// A listener standing in for prismhook: records every POST, answers 200.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(record)
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    fn event_types(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|r| r.body["event_type"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn record(State(seen): State<Arc<Mutex<Vec<Received>>>>, req: Request) -> StatusCode {
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap();
    seen.lock().unwrap().push(Received {
        path,
        authorization,
        body,
    });
    StatusCode::OK
}

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn notification(event_type: &str, uuid: &str) -> Value {
    json!({
        "entity_reference": { "kind": "vm", "uuid": uuid },
        "data": { "metadata": {} },
        "version": "1.0",
        "event_type": event_type,
    })
}

async fn wait_for_state(sim: &PrismSim, uuid: &str, want: &str) -> Value {
    for _ in 0..100 {
        let (status, body) = v3_get(sim, &format!("/webhooks/{uuid}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["status"]["state"] == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("webhook {uuid} never reached {want}");
}

#[tokio::test]
async fn the_v3_api_rejects_wrong_or_missing_credentials_with_a_non_json_401() {
    let sim = sim().await;
    let requests = [
        http().get(v3(&sim, "/users/me")),
        http()
            .get(v3(&sim, "/users/me"))
            .basic_auth(USER, Some("wrong")),
        http()
            .post(v3(&sim, "/webhooks/list"))
            .basic_auth("nobody", Some(PASSWORD))
            .json(&json!({ "kind": "webhook" })),
    ];
    for request in requests {
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key("www-authenticate"));
        let body = resp.text().await.unwrap();
        assert!(
            serde_json::from_str::<Value>(&body).is_err(),
            "401 body must not be JSON: {body}"
        );
    }
    let (status, me) = v3_get(&sim, "/users/me").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["status"]["name"], USER);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_created_webhook_is_pending_then_complete_and_never_shows_its_password() {
    let sim = sim().await;
    let (status, created) = v3_post(
        &sim,
        "/webhooks",
        webhook_body("hook", "http://127.0.0.1:1/cb", &["VM.ON"]),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(created["status"]["state"], "PENDING");
    assert_eq!(created["metadata"]["spec_version"], 0);
    assert!(created["status"]["execution_context"]["task_uuid"].is_string());
    let uuid = created["metadata"]["uuid"].as_str().unwrap();

    let (_, first) = v3_get(&sim, &format!("/webhooks/{uuid}")).await;
    assert_eq!(first["status"]["state"], "PENDING");
    let done = wait_for_state(&sim, uuid, "COMPLETE").await;
    assert_eq!(
        done["spec"]["resources"]["post_url"],
        "http://127.0.0.1:1/cb"
    );
    assert_eq!(
        done["status"]["resources"]["events_filter_list"],
        json!(["VM.ON"])
    );
    assert_eq!(
        done["spec"]["resources"]["credentials"]["username"],
        "hook-user"
    );
    for answer in [created.to_string(), done.to_string()] {
        assert!(!answer.contains("hook-secret"), "password leaked: {answer}");
    }

    let hooks = sim.webhooks();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].state, "COMPLETE");
    let creds = hooks[0].credentials.as_ref().unwrap();
    assert_eq!(
        (creds.username.as_str(), creds.password.as_str()),
        ("hook-user", "hook-secret")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn creating_the_same_webhook_twice_makes_two_webhooks() {
    let sim = sim().await;
    let a = create_webhook(&sim, "same", "http://127.0.0.1:1/cb", &["VM.ON"]).await;
    let b = create_webhook(&sim, "same", "http://127.0.0.1:1/cb", &["VM.ON"]).await;
    assert_ne!(a, b);
    let uuids: Vec<String> = sim.webhooks().into_iter().map(|h| h.uuid).collect();
    assert_eq!(uuids, [a, b]);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_invalid_create_is_rejected_with_the_json_error_shape() {
    let sim = sim().await;
    let mut no_events = webhook_body("hook", "http://127.0.0.1:1/cb", &[]);
    let mut wrong_kind = webhook_body("hook", "http://127.0.0.1:1/cb", &["VM.ON"]);
    wrong_kind["metadata"]["kind"] = json!("vm");
    let mut no_url = webhook_body("hook", "http://127.0.0.1:1/cb", &["VM.ON"]);
    no_url["spec"]["resources"]
        .as_object_mut()
        .unwrap()
        .remove("post_url");
    no_events["spec"]["name"] = json!("still named");
    for (body, field) in [
        (no_events, "events_filter_list"),
        (wrong_kind, "metadata.kind"),
        (no_url, "post_url"),
        (
            webhook_body("", "http://127.0.0.1:1/cb", &["VM.ON"]),
            "spec.name",
        ),
    ] {
        let (status, error) = v3_post(&sim, "/webhooks", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error["state"], "ERROR");
        assert_eq!(error["code"], 400);
        let message = error["message_list"][0]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message} should name {field}");
    }
    assert!(sim.webhooks().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn an_update_needs_the_current_spec_version_and_turns_pending_again() {
    let sim = sim().await;
    let uuid = create_webhook(&sim, "hook", "http://127.0.0.1:1/cb", &["VM.ON"]).await;
    wait_for_state(&sim, &uuid, "COMPLETE").await;

    let mut update = webhook_body("hook", "http://127.0.0.1:1/cb", &["VM.ON", "VM.OFF"]);
    update["metadata"] = json!({ "kind": "webhook", "uuid": uuid, "spec_version": 0 });
    let put = |body: Value| {
        http()
            .put(v3(&sim, &format!("/webhooks/{uuid}")))
            .basic_auth(USER, Some(PASSWORD))
            .json(&body)
            .send()
    };
    let (status, accepted) = answer(put(update.clone()).await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["metadata"]["spec_version"], 1);
    assert_eq!(accepted["status"]["state"], "PENDING");

    let (status, conflict) = answer(put(update).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(conflict["state"], "ERROR");
    let message = conflict["message_list"][0]["message"].as_str().unwrap();
    assert!(message.contains("spec_version"), "{message}");

    let done = wait_for_state(&sim, &uuid, "COMPLETE").await;
    assert_eq!(done["metadata"]["spec_version"], 1);
    assert_eq!(
        done["spec"]["resources"]["events_filter_list"],
        json!(["VM.ON", "VM.OFF"])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_webhook_list_pages_with_offset_and_length() {
    let sim = sim().await;
    for i in 0..5 {
        create_webhook(
            &sim,
            &format!("hook-{i}"),
            "http://127.0.0.1:1/cb",
            &["VM.ON"],
        )
        .await;
    }
    let mut names = Vec::new();
    for offset in [0, 2, 4] {
        let (status, page) = v3_post(
            &sim,
            "/webhooks/list",
            json!({ "kind": "webhook", "offset": offset, "length": 2 }),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["metadata"]["total_matches"], 5);
        assert_eq!(page["metadata"]["offset"], offset);
        let entities = page["entities"].as_array().unwrap();
        assert_eq!(page["metadata"]["length"], entities.len());
        names.extend(
            entities
                .iter()
                .map(|e| e["spec"]["name"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(names, ["hook-0", "hook-1", "hook-2", "hook-3", "hook-4"]);

    let (_, filtered) = v3_post(
        &sim,
        "/webhooks/list",
        json!({ "kind": "webhook", "filter": "name==hook-3" }),
    )
    .await;
    assert_eq!(filtered["metadata"]["total_matches"], 1);
    assert_eq!(filtered["entities"][0]["spec"]["name"], "hook-3");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_deleted_webhook_is_gone_and_unknown_ones_are_a_json_404() {
    let sim = sim().await;
    let uuid = create_webhook(&sim, "hook", "http://127.0.0.1:1/cb", &["VM.ON"]).await;
    let resp = http()
        .delete(v3(&sim, &format!("/webhooks/{uuid}")))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(resp).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"]["state"], "DELETE_PENDING");

    let (status, missing) = v3_get(&sim, &format!("/webhooks/{uuid}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["message_list"][0]["reason"], "ENTITY_NOT_FOUND");
    assert!(sim.webhooks().is_empty());
    assert_eq!(sim.notify(notification("VM.ON", "x")).await, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn notify_delivers_with_each_webhooks_credentials_only_where_the_filter_matches() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    create_webhook(&sim, "on-off", &receiver.url("/a"), &["VM.ON", "VM.OFF"]).await;
    create_webhook(&sim, "create", &receiver.url("/b"), &["VM.CREATE"]).await;

    let body = notification("VM.ON", "vm-1");
    assert_eq!(sim.notify(body.clone()).await, 1);
    let answer: Value = http()
        .post(control(&sim, "/notify"))
        .json(&notification("VM.CREATE", "vm-2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["delivered"], 1);
    assert_eq!(sim.notify(notification("VM.DELETE", "vm-3")).await, 0);

    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/a");
    assert_eq!(seen[0].body, body);
    assert_eq!(seen[1].path, "/b");
    for r in &seen {
        assert_eq!(
            r.authorization.as_deref(),
            Some(basic("hook-user", "hook-secret").as_str())
        );
    }
    let log = sim.deliveries();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|d| d.status == Some(200) && d.attempt == 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_vm_lifecycle_emits_its_events_in_order_with_rising_versions() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    let all = [
        "VM.CREATE",
        "VM.DELETE",
        "VM.ON",
        "VM.OFF",
        "VM.UPDATE",
        "VM.MIGRATE",
        "VM.NIC_PLUG",
        "VM.NIC_UNPLUG",
    ];
    create_webhook(&sim, "all", &receiver.url("/cb"), &all).await;

    // Created through the HTTP control API, changed through the Rust one.
    let created: Value = http()
        .post(control(&sim, "/vms"))
        .json(&json!({
            "name": "web-01",
            "power_state": "ON",
            "categories": { "AppTier": "Web" },
            "nics": [{ "ips": ["10.0.0.5"], "subnet": "vlan10" }],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["events"], json!(["VM.CREATE", "VM.ON"]));
    assert_eq!(created["delivered"], 2);
    let uuid = created["uuid"].as_str().unwrap().to_owned();

    let categories = BTreeMap::from([("AppTier".to_owned(), "Db".to_owned())]);
    sim.set_categories(&uuid, categories).await.unwrap();
    let plugged = sim
        .plug_nic(&uuid, NewNic::with_ips(["10.0.1.7"]))
        .await
        .unwrap();
    let nic = plugged.nic_uuid.unwrap();
    sim.unplug_nic(&uuid, &nic).await.unwrap();
    sim.migrate(&uuid, "host-2").await.unwrap();
    sim.set_power(&uuid, false).await.unwrap();
    let unchanged = sim.set_power(&uuid, false).await.unwrap();
    assert!(unchanged.events.is_empty());
    let vms: Value = http()
        .get(control(&sim, "/vms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(vms[0]["categories"]["AppTier"], "Db");
    assert_eq!(vms[0]["host_name"], "host-2");
    sim.delete_vm(&uuid).await.unwrap();
    assert!(sim.vms().is_empty());

    assert_eq!(
        receiver.event_types(),
        [
            "VM.CREATE",
            "VM.ON",
            "VM.UPDATE",
            "VM.NIC_PLUG",
            "VM.NIC_UNPLUG",
            "VM.MIGRATE",
            "VM.OFF",
            "VM.DELETE",
        ]
    );
    let seen = receiver.seen();
    let versions: Vec<u64> = seen
        .iter()
        .map(|r| {
            let v = &r.body["data"]["metadata"]["metadata"]["entity_version"];
            v.as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    // The delivery log names the change each delivery carried.
    let logged: Vec<u64> = sim
        .deliveries()
        .iter()
        .map(|d| d.entity_version.unwrap())
        .collect();
    assert_eq!(logged, versions);
    let on = &seen[1].body;
    assert_eq!(
        on["entity_reference"],
        json!({ "kind": "vm", "uuid": uuid })
    );
    let intent = &on["data"]["metadata"];
    assert_eq!(intent["spec"]["name"], "web-01");
    assert_eq!(intent["status"]["resources"]["power_state"], "ON");
    let nic0 = &intent["status"]["resources"]["nic_list"][0];
    assert_eq!(
        nic0["ip_endpoint_list"][0],
        json!({ "ip": "10.0.0.5", "type": "ASSIGNED" })
    );
    assert_eq!(nic0["subnet_reference"]["name"], "vlan10");
    assert_eq!(
        intent["status"]["resources"]["host_reference"]["name"],
        "sim-host-1"
    );
    assert_eq!(
        seen[3].body["data"]["metadata"]["status"]["resources"]["nic_list"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(seen[7].body["data"]["metadata"]["spec"]["name"], "web-01");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_delete_can_carry_empty_metadata() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    create_webhook(&sim, "del", &receiver.url("/cb"), &["VM.DELETE"]).await;
    let a = sim.create_vm(NewVm::named("a")).await.unwrap().uuid;
    let b = sim.create_vm(NewVm::named("b")).await.unwrap().uuid;
    sim.set_faults(PrismFaults {
        empty_delete_metadata: true,
        ..PrismFaults::default()
    });
    sim.delete_vm(&a).await.unwrap();
    let resp = http()
        .delete(control(&sim, &format!("/vms/{b}?metadata=full")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let seen = receiver.seen();
    assert_eq!(seen[0].body["data"]["metadata"], json!({}));
    assert_eq!(seen[0].body["entity_reference"]["uuid"], a);
    assert_eq!(seen[1].body["data"]["metadata"]["spec"]["name"], "b");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_vm_inventory_pages_like_the_webhook_list() {
    let sim = sim().await;
    for i in 0..7 {
        sim.create_vm(NewVm::named(format!("vm-{i}")).nic(["10.1.0.1"]))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let (status, page) = v3_post(
            &sim,
            "/vms/list",
            json!({ "kind": "vm", "offset": offset, "length": 3 }),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["metadata"]["total_matches"], 7);
        let entities = page["entities"].as_array().unwrap();
        if entities.is_empty() {
            break;
        }
        for e in entities {
            assert_eq!(e["metadata"]["kind"], "vm");
            assert_eq!(e["status"]["state"], "COMPLETE");
            assert!(e["metadata"]["entity_version"].is_string());
            names.push(e["status"]["name"].as_str().unwrap().to_owned());
        }
        offset += entities.len();
    }
    let want: Vec<String> = (0..7).map(|i| format!("vm-{i}")).collect();
    assert_eq!(names, want);
    sim.shutdown().await;
}

/// Runs one seeded scenario and returns what the receiver got.
async fn seeded_run(seed: u64) -> (Vec<String>, Vec<(bool, bool)>) {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    create_webhook(&sim, "hook", &receiver.url("/cb"), &["VM.ON"]).await;
    sim.set_faults(PrismFaults {
        drop_rate: 0.3,
        duplicate_rate: 0.3,
        seed,
        ..PrismFaults::default()
    });
    for i in 0..40 {
        sim.notify(notification("VM.ON", &format!("vm-{i}"))).await;
    }
    let got = receiver
        .seen()
        .iter()
        .map(|r| {
            r.body["entity_reference"]["uuid"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let log = sim
        .deliveries()
        .iter()
        .map(|d| (d.dropped, d.duplicate))
        .collect();
    sim.shutdown().await;
    (got, log)
}

#[tokio::test]
async fn drops_and_duplicates_repeat_exactly_with_the_same_seed() {
    let (first, first_log) = seeded_run(42).await;
    let (again, again_log) = seeded_run(42).await;
    let (other, _) = seeded_run(7).await;
    assert_eq!(first, again);
    assert_eq!(first_log, again_log);
    assert_ne!(first, other);
    let dropped = first_log.iter().filter(|(d, _)| *d).count();
    let duplicated = first_log.iter().filter(|(_, d)| *d).count();
    assert!(
        dropped > 0 && duplicated > 0,
        "{dropped} dropped, {duplicated} duplicated"
    );
    assert_eq!(first.len(), 40 - dropped + duplicated);
}

#[tokio::test]
async fn reordered_deliveries_wait_for_a_flush_and_arrive_shuffled() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    create_webhook(&sim, "hook", &receiver.url("/cb"), &["VM.ON"]).await;
    sim.set_faults(PrismFaults {
        reorder: true,
        seed: 3,
        ..PrismFaults::default()
    });
    let sent: Vec<String> = (0..10).map(|i| format!("vm-{i}")).collect();
    for uuid in &sent {
        assert_eq!(sim.notify(notification("VM.ON", uuid)).await, 0);
    }
    assert!(receiver.seen().is_empty());
    assert_eq!(sim.flush().await, 10);
    let got: Vec<String> = receiver
        .seen()
        .iter()
        .map(|r| {
            r.body["entity_reference"]["uuid"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_ne!(got, sent);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, sent);
    sim.shutdown().await;
}

#[tokio::test]
async fn legacy_payloads_take_the_older_aos_shape() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    create_webhook(&sim, "hook", &receiver.url("/cb"), &["VM.ON"]).await;
    let faults = PrismFaults {
        legacy_payloads: true,
        ..PrismFaults::default()
    };
    let resp = http()
        .post(control(&sim, "/faults"))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    sim.create_vm(NewVm::named("old").powered_on().nic(["10.2.0.9"]))
        .await
        .unwrap();

    let intent = receiver.seen()[0].body["data"]["metadata"].clone();
    assert_eq!(intent["spec"], json!({}));
    assert_eq!(intent["status"]["state"], "kComplete");
    assert_eq!(intent["status"]["name"], "old");
    let resources = &intent["status"]["resources"];
    assert_eq!(resources["power_state"], "POWERED_ON");
    assert_eq!(resources["memory_size_mb"], 1024);
    assert!(resources.get("memory_size_mib").is_none());
    assert!(intent["metadata"]["entity_version"].is_u64());
    assert_eq!(
        sim.deliveries()[0].entity_version,
        intent["metadata"]["entity_version"].as_u64()
    );
    assert!(intent["metadata"]["owner_reference"].is_null());

    let (_, page) = v3_post(&sim, "/vms/list", json!({ "kind": "vm" })).await;
    assert_eq!(page["entities"][0]["status"]["state"], "kComplete");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unavailable_cluster_answers_503_but_still_notifies() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    create_webhook(&sim, "hook", &receiver.url("/cb"), &["VM.CREATE"]).await;
    sim.set_faults(PrismFaults {
        unavailable: true,
        ..PrismFaults::default()
    });
    let (status, _) = v3_get(&sim, "/users/me").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let change = sim.create_vm(NewVm::named("x")).await.unwrap();
    assert_eq!(change.delivered, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_control_api_shows_webhooks_with_credentials_and_the_delivery_log() {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    let uuid = create_webhook(&sim, "hook", &receiver.url("/cb"), &["VM.ON"]).await;
    sim.notify(notification("VM.ON", "vm-9")).await;

    let hooks: Value = http()
        .get(control(&sim, "/webhooks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hooks[0]["uuid"], uuid.as_str());
    assert_eq!(hooks[0]["credentials"]["password"], "hook-secret");
    assert_eq!(hooks[0]["spec_version"], 0);

    let log: Value = http()
        .get(control(&sim, "/deliveries"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log[0]["event_type"], "VM.ON");
    assert_eq!(log[0]["entity_uuid"], "vm-9");
    assert_eq!(log[0]["webhook_uuid"], uuid.as_str());
    assert_eq!(log[0]["status"], 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_failing_listener_is_not_retried_unless_asked() {
    let sim = sim().await;
    // Nothing listens on the port of a listener that was just dropped.
    let dead = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let url = format!("http://{}/cb", dead.local_addr().unwrap());
    drop(dead);
    create_webhook(&sim, "hook", &url, &["VM.ON"]).await;

    sim.notify(notification("VM.ON", "a")).await;
    assert_eq!(sim.deliveries().len(), 1);
    assert!(sim.deliveries()[0].status.is_none());
    assert!(sim.deliveries()[0].error.is_some());

    sim.set_faults(PrismFaults {
        retries: 2,
        ..PrismFaults::default()
    });
    sim.notify(notification("VM.ON", "b")).await;
    let attempts: Vec<u32> = sim.deliveries()[1..].iter().map(|d| d.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    sim.shutdown().await;
}
