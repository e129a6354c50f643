//! The BIG-IP simulator, driven over real HTTP on loopback the way the
//! `f5-bigip` plugin and the end-to-end tests drive it.

use std::collections::BTreeMap;

use prismhook_sim::bigip::{BigipConfig, BigipSim, BigipStats, Faults, RequestRecord};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_with(pools: &[&str]) -> BigipSim {
    let config = BigipConfig {
        pools: pools.iter().map(|p| (*p).to_owned()).collect(),
        ..BigipConfig::default()
    };
    BigipSim::start(([127, 0, 0, 1], 0).into(), config)
        .await
        .expect("the simulator starts on a free loopback port")
}

async fn start() -> BigipSim {
    start_with(&["web"]).await
}

#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn call(
    sim: &BigipSim,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    auth: Option<(&str, &str)>,
) -> Answer {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", sim.base_url()));
    if let Some((user, password)) = auth {
        request = request.basic_auth(user, Some(password));
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the simulator answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("the answer has a body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).expect("the answer is JSON")
    };
    Answer {
        status,
        retry_after,
        body,
    }
}

const ADMIN: Option<(&str, &str)> = Some(("admin", "admin"));

async fn add(sim: &BigipSim, pool: &str, member: &str) -> Answer {
    let address = member
        .rsplit_once(if member.matches(':').count() > 1 {
            '.'
        } else {
            ':'
        })
        .map(|(a, _)| a)
        .unwrap_or(member);
    call(
        sim,
        reqwest::Method::POST,
        &format!("/mgmt/tm/ltm/pool/{pool}/members"),
        Some(json!({ "name": member, "address": address })),
        ADMIN,
    )
    .await
}

async fn remove(sim: &BigipSim, pool: &str, member: &str) -> Answer {
    call(
        sim,
        reqwest::Method::DELETE,
        &format!("/mgmt/tm/ltm/pool/{pool}/members/{member}"),
        None,
        ADMIN,
    )
    .await
}

async fn members(sim: &BigipSim, pool: &str) -> Answer {
    call(
        sim,
        reqwest::Method::GET,
        &format!("/mgmt/tm/ltm/pool/{pool}/members"),
        None,
        ADMIN,
    )
    .await
}

async fn read_member(sim: &BigipSim, pool: &str, member: &str) -> Answer {
    call(
        sim,
        reqwest::Method::GET,
        &format!("/mgmt/tm/ltm/pool/{pool}/members/{member}"),
        None,
        ADMIN,
    )
    .await
}

fn pools(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(pool, members)| {
            (
                (*pool).to_owned(),
                members.iter().map(|m| (*m).to_owned()).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn adding_a_member_puts_it_in_the_pool_and_answers_the_member() {
    let sim = start().await;

    let answer = add(&sim, "~Common~web", "10.0.0.1:80").await;

    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["name"], "10.0.0.1:80");
    assert_eq!(answer.body["address"], "10.0.0.1");
    assert_eq!(answer.body["fullPath"], "/Common/10.0.0.1:80");
    assert_eq!(sim.pools(), pools(&[("/Common/web", &["10.0.0.1:80"])]));
    assert_eq!(sim.stats().members_added, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_member_answers_409_with_the_icontrol_error_json() {
    let sim = start().await;
    add(&sim, "~Common~web", "10.0.0.1:80").await;

    let again = add(&sim, "~Common~web", "10.0.0.1:80").await;

    assert_eq!(again.status, 409);
    assert_eq!(again.body["code"], 409);
    assert!(
        again.body["message"]
            .as_str()
            .unwrap()
            .contains("already exists in pool /Common/web"),
        "{:?}",
        again.body
    );
    assert_eq!(again.body["errorStack"], json!([]));
    assert_eq!(sim.pools()["/Common/web"], ["10.0.0.1:80"]);
    let stats = sim.stats();
    assert_eq!(
        (stats.members_added, stats.conflicts, stats.members),
        (1, 1, 1)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_member_shows_the_description_it_was_created_with_and_a_duplicate_keeps_it() {
    let sim = start().await;
    sim.add_member_directly("web", "10.0.0.2:80");
    let post = |member: &'static str, description: &'static str| {
        call(
            &sim,
            reqwest::Method::POST,
            "/mgmt/tm/ltm/pool/~Common~web/members",
            Some(json!({ "name": member, "description": description })),
            ADMIN,
        )
    };

    let created = post("10.0.0.1:80", "ours").await;
    let again = post("10.0.0.1:80", "someone else's").await;
    let read = read_member(&sim, "~Common~web", "~Common~10.0.0.1:80").await;
    let listed = members(&sim, "~Common~web").await;

    assert_eq!((created.status, again.status), (200, 409));
    assert_eq!(created.body["description"], "ours");
    assert_eq!(read.body["description"], "ours");
    let items = listed.body["items"].as_array().unwrap();
    assert_eq!(items[0]["description"], "ours");
    assert_eq!(items[1]["name"], "10.0.0.2:80");
    assert!(items[1].get("description").is_none(), "{:?}", items[1]);
    sim.shutdown().await;
}

#[tokio::test]
async fn adding_to_a_missing_pool_answers_404_and_creates_nothing() {
    let sim = start().await;

    let answer = add(&sim, "~Common~nosuch", "10.0.0.1:80").await;

    assert_eq!(answer.status, 404);
    assert!(
        answer.body["message"]
            .as_str()
            .unwrap()
            .contains("/Common/nosuch"),
        "{:?}",
        answer.body
    );
    assert_eq!(sim.pools(), pools(&[("/Common/web", &[])]));
    sim.shutdown().await;
}

#[tokio::test]
async fn deleting_a_member_removes_it_and_deleting_it_again_answers_404() {
    let sim = start().await;
    add(&sim, "~Common~web", "10.0.0.1:80").await;
    add(&sim, "~Common~web", "10.0.0.2:80").await;

    let first = remove(&sim, "~Common~web", "~Common~10.0.0.1:80").await;
    let second = remove(&sim, "~Common~web", "~Common~10.0.0.1:80").await;

    assert_eq!(first.status, 200);
    assert_eq!(second.status, 404);
    assert_eq!(second.body["code"], 404);
    assert_eq!(sim.pools()["/Common/web"], ["10.0.0.2:80"]);
    let stats = sim.stats();
    assert_eq!((stats.members_removed, stats.not_found), (1, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bare_pool_name_means_the_common_partition() {
    let sim = start().await;

    add(&sim, "web", "10.0.0.1:80").await;
    let listed = members(&sim, "~Common~web").await;
    let removed = remove(&sim, "web", "10.0.0.1:80").await;

    assert_eq!(listed.body["items"][0]["name"], "10.0.0.1:80");
    assert_eq!(removed.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn pools_in_other_partitions_keep_their_members_there() {
    let sim = start_with(&["/Tenant1/app"]).await;

    let added = add(&sim, "~Tenant1~app", "10.0.0.1:8080").await;
    let wrong_partition = remove(&sim, "~Tenant1~app", "~Common~10.0.0.1:8080").await;
    let listed = members(&sim, "~Tenant1~app").await;

    assert_eq!(added.body["fullPath"], "/Tenant1/10.0.0.1:8080");
    assert_eq!(wrong_partition.status, 404);
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(sim.pools(), pools(&[("/Tenant1/app", &["10.0.0.1:8080"])]));
    sim.shutdown().await;
}

#[tokio::test]
async fn ipv6_members_are_named_address_dot_port_and_stored_canonically() {
    let sim = start().await;

    let answer = add(&sim, "~Common~web", "2001:DB8::1.443").await;
    let removed = remove(&sim, "~Common~web", "~Common~2001:db8::1.443").await;

    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["name"], "2001:db8::1.443");
    assert_eq!(removed.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_malformed_member_or_body_answers_400() {
    let sim = start().await;

    let no_port = add(&sim, "~Common~web", "10.0.0.1").await;
    let not_an_ip = add(&sim, "~Common~web", "web-01:80").await;
    let mismatch = call(
        &sim,
        reqwest::Method::POST,
        "/mgmt/tm/ltm/pool/~Common~web/members",
        Some(json!({ "name": "10.0.0.1:80", "address": "10.0.0.2" })),
        ADMIN,
    )
    .await;
    let garbage = reqwest::Client::new()
        .post(format!(
            "{}/mgmt/tm/ltm/pool/~Common~web/members",
            sim.base_url()
        ))
        .basic_auth("admin", Some("admin"))
        .body("{nope")
        .send()
        .await
        .expect("answers");

    for answer in [&no_port, &not_an_ip, &mismatch] {
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["code"], 400);
    }
    assert_eq!(garbage.status(), 400);
    assert_eq!(sim.stats().members, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn mgmt_requires_basic_auth_with_the_configured_credentials() {
    let sim = start().await;

    let none = call(&sim, reqwest::Method::GET, "/mgmt/tm/ltm/pool", None, None).await;
    let wrong = call(
        &sim,
        reqwest::Method::GET,
        "/mgmt/tm/ltm/pool",
        None,
        Some(("admin", "nope")),
    )
    .await;
    let right = call(&sim, reqwest::Method::GET, "/mgmt/tm/ltm/pool", None, ADMIN).await;
    let sneaky = add_without_auth(&sim).await;

    assert_eq!(
        (none.status, wrong.status, right.status, sneaky),
        (401, 401, 200, 401)
    );
    assert_eq!(none.body["code"], 401);
    assert!(sim.pools()["/Common/web"].is_empty());
    assert_eq!(sim.stats().unauthorized, 3);
    sim.shutdown().await;
}

async fn add_without_auth(sim: &BigipSim) -> u16 {
    reqwest::Client::new()
        .post(format!(
            "{}/mgmt/tm/ltm/pool/~Common~web/members",
            sim.base_url()
        ))
        .json(&json!({ "name": "10.0.0.1:80" }))
        .send()
        .await
        .expect("answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn pools_list_and_read_back_like_icontrol() {
    let sim = start_with(&["web", "/Tenant1/app"]).await;
    add(&sim, "~Common~web", "10.0.0.1:80").await;

    let list = call(&sim, reqwest::Method::GET, "/mgmt/tm/ltm/pool", None, ADMIN).await;
    let one = call(
        &sim,
        reqwest::Method::GET,
        "/mgmt/tm/ltm/pool/~Common~web",
        None,
        ADMIN,
    )
    .await;
    let member = read_member(&sim, "~Common~web", "~Common~10.0.0.1:80").await;
    let unknown = call(
        &sim,
        reqwest::Method::GET,
        "/mgmt/tm/ltm/virtual",
        None,
        ADMIN,
    )
    .await;

    let paths: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["fullPath"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/Common/web", "/Tenant1/app"]);
    assert_eq!(one.body["name"], "web");
    assert_eq!(one.body["partition"], "Common");
    assert_eq!(member.body["address"], "10.0.0.1");
    assert_eq!(unknown.status, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_create_list_and_delete_pools() {
    let sim = start_with(&[]).await;
    let client = reqwest::Client::new();

    let created = client
        .post(format!("{}/_sim/pools/web", sim.base_url()))
        .send()
        .await
        .expect("answers");
    let again = client
        .post(format!("{}/_sim/pools/web", sim.base_url()))
        .send()
        .await
        .expect("answers");
    let tenant = client
        .post(format!("{}/_sim/pools/~Tenant1~app", sim.base_url()))
        .send()
        .await
        .expect("answers");
    let bad = client
        .post(format!("{}/_sim/pools/a%20b", sim.base_url()))
        .send()
        .await
        .expect("answers");
    add(&sim, "~Common~web", "10.0.0.1:80").await;
    let listed: BTreeMap<String, Vec<String>> =
        reqwest::get(format!("{}/_sim/pools", sim.base_url()))
            .await
            .expect("answers")
            .json()
            .await
            .expect("json");
    let deleted = client
        .delete(format!("{}/_sim/pools/~Tenant1~app", sim.base_url()))
        .send()
        .await
        .expect("answers");

    let statuses = [
        created.status(),
        again.status(),
        tenant.status(),
        bad.status(),
    ]
    .map(|s| s.as_u16());
    assert_eq!(statuses, [201, 200, 201, 400]);
    assert_eq!(
        listed,
        pools(&[("/Common/web", &["10.0.0.1:80"]), ("/Tenant1/app", &[])])
    );
    assert_eq!(deleted.status(), 204);
    assert_eq!(sim.pools(), pools(&[("/Common/web", &["10.0.0.1:80"])]));
    sim.shutdown().await;
}

#[tokio::test]
async fn members_are_listed_sorted_and_stats_count_them() {
    let sim = start().await;
    sim.create_pool("api");
    for member in ["10.0.0.2:80", "10.0.0.10:80", "10.0.0.1:80"] {
        add(&sim, "~Common~web", member).await;
    }
    sim.add_member_directly("api", "10.0.0.9:8080");

    let stats: BigipStats = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");

    assert_eq!(
        sim.pools()["/Common/web"],
        ["10.0.0.10:80", "10.0.0.1:80", "10.0.0.2:80"]
    );
    assert_eq!(sim.pools()["/Common/api"], ["10.0.0.9:8080"]);
    assert_eq!(
        (stats.requests, stats.members_added, stats.members),
        (3, 3, 4)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_next_answers_the_status_with_retry_after_then_recovers() {
    let sim = start().await;
    let faults = Faults {
        fail_status: Some(503),
        fail_next: 2,
        retry_after_secs: Some(7),
        ..Faults::default()
    };
    let set = reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&faults)
        .send()
        .await
        .expect("answers");
    assert_eq!(set.status(), 204);

    let first = add(&sim, "~Common~web", "10.0.0.1:80").await;
    let second = add(&sim, "~Common~web", "10.0.0.1:80").await;
    assert!(
        sim.pools()["/Common/web"].is_empty(),
        "a failed request changes nothing"
    );
    let third = add(&sim, "~Common~web", "10.0.0.1:80").await;

    assert_eq!([first.status, second.status, third.status], [503, 503, 200]);
    assert_eq!(first.retry_after.as_deref(), Some("7"));
    assert_eq!(first.body["code"], 503);
    let stats = sim.stats();
    assert_eq!(
        (stats.requests, stats.errors, stats.members_added),
        (3, 2, 1)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_status_alone_fails_every_request_until_cleared() {
    let sim = start().await;
    sim.set_faults(Faults {
        fail_status: Some(500),
        ..Faults::default()
    });

    let failing = [
        members(&sim, "~Common~web").await.status,
        members(&sim, "~Common~web").await.status,
    ];
    sim.set_faults(Faults::default());
    let recovered = members(&sim, "~Common~web").await;

    assert_eq!(failing, [500, 500]);
    assert_eq!(recovered.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn dropped_connections_give_the_client_a_connection_error_without_any_answer() {
    let sim = start().await;
    sim.set_faults(Faults {
        drop_connections: true,
        ..Faults::default()
    });

    let through_reqwest = reqwest::Client::new()
        .get(format!("{}/mgmt/tm/ltm/pool", sim.base_url()))
        .basic_auth("admin", Some("admin"))
        .send()
        .await;
    let mut raw = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("connects");
    raw.write_all(b"GET /mgmt/tm/ltm/pool HTTP/1.1\r\nHost: bigip\r\n\r\n")
        .await
        .expect("writes");
    let mut received = Vec::new();
    let read = raw.read_to_end(&mut received).await;

    let error = through_reqwest.expect_err("no answer arrives");
    assert!(!error.is_timeout(), "{error}");
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );
    // Either an orderly EOF or a reset, depending on unread bytes: both close.
    drop(read);

    sim.set_faults(Faults::default());
    assert_eq!(members(&sim, "~Common~web").await.status, 200);
    let log = sim.requests(3);
    assert_eq!(
        log.iter().map(|r| r.status_code).collect::<Vec<_>>(),
        [None, None, Some(200)]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_request_log_shows_method_path_and_body_but_no_credentials() {
    let sim = start().await;
    add(&sim, "~Common~web", "10.0.0.1:80").await;
    remove(&sim, "~Common~web", "~Common~10.0.0.1:80").await;

    let log: Vec<RequestRecord> = reqwest::get(format!("{}/_sim/requests?n=10", sim.base_url()))
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");

    assert_eq!(log.len(), 2);
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].path, "/mgmt/tm/ltm/pool/~Common~web/members");
    assert_eq!(
        log[0].body,
        Some(json!({ "name": "10.0.0.1:80", "address": "10.0.0.1" }))
    );
    assert_eq!(log[1].method, "DELETE");
    assert_eq!(log[1].status_code, Some(200));
    let raw = serde_json::to_string(&log).expect("serialises");
    assert!(!raw.contains("YWRtaW46YWRtaW4"), "{raw}");
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_restores_the_configured_pools_empty_and_clears_stats_faults_and_log() {
    let sim = start().await;
    sim.create_pool("extra");
    add(&sim, "~Common~web", "10.0.0.1:80").await;
    sim.set_faults(Faults {
        latency_ms: 1,
        ..Faults::default()
    });

    let reset = reqwest::Client::new()
        .post(format!("{}/_sim/reset", sim.base_url()))
        .send()
        .await
        .expect("answers");

    assert_eq!(reset.status(), 204);
    assert_eq!(sim.pools(), pools(&[("/Common/web", &[])]));
    assert_eq!(sim.stats(), BigipStats::default());
    assert!(sim.requests(10).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bad_configured_pool_fails_start_with_its_name() {
    let config = BigipConfig {
        pools: vec!["a b".to_owned()],
        ..BigipConfig::default()
    };

    let error = BigipSim::start(([127, 0, 0, 1], 0).into(), config)
        .await
        .err()
        .expect("refused");

    assert!(error.to_string().contains("a b"), "{error}");
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let sim = start().await;
    let addr = sim.addr();
    assert_eq!(sim.base_url(), format!("http://127.0.0.1:{}", addr.port()));

    sim.shutdown().await;

    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_login_token_serves_until_it_expires_and_basic_can_be_switched_off() {
    let sim = BigipSim::start(
        ([127, 0, 0, 1], 0).into(),
        BigipConfig {
            basic_auth: false,
            pools: vec!["web".into()],
            ..BigipConfig::default()
        },
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let login = |password: &'static str| {
        http.post(format!("{base}/mgmt/shared/authn/login"))
            .json(&json!({"username": "admin", "password": password, "loginProviderName": "tmos"}))
            .send()
    };
    assert_eq!(login("wrong").await.unwrap().status(), 401);
    let answer: Value = login("admin").await.unwrap().json().await.unwrap();
    let token = answer["token"]["token"].as_str().unwrap().to_owned();
    assert_eq!(answer["token"]["timeout"], 1200);
    assert!(
        sim.requests(10).iter().all(|r| r.body.is_none()),
        "a login's password stays out of the request log"
    );

    let pools = |token: Option<&str>| {
        let mut req = http
            .get(format!("{base}/mgmt/tm/ltm/pool"))
            .basic_auth("admin", Some("admin"));
        if let Some(token) = token {
            req = req.header("X-F5-Auth-Token", token);
        }
        req.send()
    };
    assert_eq!(pools(None).await.unwrap().status(), 401, "Basic is off");
    assert_eq!(pools(Some(&token)).await.unwrap().status(), 200);
    sim.expire_tokens();
    let expired = pools(Some(&token)).await.unwrap();
    assert_eq!(expired.status(), 401);
    let body: Value = expired.json().await.unwrap();
    assert_eq!(body["message"], "X-F5-Auth-Token does not exist.");
    let stats = sim.stats();
    assert_eq!((stats.logins, stats.expired_tokens), (1, 1));
    assert_eq!(sim.issued_tokens(), [token]);
    sim.shutdown().await;
}

/// `$select` answers only the properties it names, as BIG-IP does: a pool of
/// thousands of members is listed in a fraction of the bytes.
#[tokio::test]
async fn a_member_listing_with_select_carries_only_the_properties_named() {
    let sim = start().await;
    assert_eq!(add(&sim, "~Common~web", "10.0.0.1:80").await.status, 200);
    let listed = |path: &'static str| call(&sim, reqwest::Method::GET, path, None, ADMIN);
    let full = listed("/mgmt/tm/ltm/pool/~Common~web/members").await;
    assert!(
        full.body["items"][0].get("address").is_some(),
        "{:?}",
        full.body
    );
    let selected = listed("/mgmt/tm/ltm/pool/~Common~web/members?$select=name,description").await;
    assert_eq!(selected.status, 200);
    assert_eq!(selected.body["items"], json!([{ "name": "10.0.0.1:80" }]));
    sim.shutdown().await;
}
