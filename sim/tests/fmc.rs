//! The FMC simulator, driven over real HTTP on loopback the way the
//! `cisco-fmc` plugin and the end-to-end tests drive it.

use std::collections::BTreeMap;
use std::time::Duration;

use prismhook_sim::fmc::{
    Faults, FmcConfig, FmcSim, FmcStats, RequestRecord, GLOBAL_DOMAIN, MAX_PAYLOAD,
};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OBJECTS: &str =
    "/api/fmc_config/v1/domain/e276abec-e0f2-11e3-8169-6d9ed49b625f/object/dynamicobjects";
const BULK_MAPPINGS: &str =
    "/api/fmc_config/v1/domain/e276abec-e0f2-11e3-8169-6d9ed49b625f/object/dynamicobjectmappings";
const LOGIN: &str = "/api/fmc_platform/v1/auth/generatetoken";
const REFRESH: &str = "/api/fmc_platform/v1/auth/refreshtoken";
const CHILD_DOMAIN: &str = "61e913a3-4bd6-7bde-54b6-000000000000";

async fn start_with(config: FmcConfig) -> FmcSim {
    FmcSim::start(([127, 0, 0, 1], 0).into(), config)
        .await
        .expect("the simulator starts on a free loopback port")
}

async fn start() -> FmcSim {
    start_with(FmcConfig {
        // The limit has its own tests; the others should not depend on pace.
        rate_limit_per_minute: 0,
        ..FmcConfig::default()
    })
    .await
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn description(&self) -> &str {
        self.body["error"]["messages"][0]["description"]
            .as_str()
            .unwrap_or_default()
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the simulator answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("the answer has a body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).expect("the answer is JSON")
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// Logs in as admin: (access token, refresh token).
async fn login(sim: &FmcSim) -> (String, String) {
    let answer = send(
        reqwest::Client::new()
            .post(format!("{}{LOGIN}", sim.base_url()))
            .basic_auth("admin", Some("admin")),
    )
    .await;
    assert_eq!(answer.status, 204, "{answer:?}");
    (
        answer.header("x-auth-access-token").unwrap().to_owned(),
        answer.header("x-auth-refresh-token").unwrap().to_owned(),
    )
}

/// `url` is a path on the simulator or an absolute URL.
async fn call(sim: &FmcSim, method: Method, url: &str, token: &str, body: Option<Value>) -> Answer {
    let url = if url.starts_with("http") {
        url.to_owned()
    } else {
        format!("{}{url}", sim.base_url())
    };
    let mut request = reqwest::Client::new()
        .request(method, url)
        .header("X-auth-access-token", token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request).await
}

async fn create(sim: &FmcSim, token: &str, name: &str) -> Answer {
    call(
        sim,
        Method::POST,
        OBJECTS,
        token,
        Some(json!({ "name": name, "type": "DynamicObject", "objectType": "IP" })),
    )
    .await
}

fn names(list: &Answer) -> Vec<String> {
    list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["name"].as_str().unwrap().to_owned())
        .collect()
}

fn view(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(name, ips)| {
            (
                (*name).to_owned(),
                ips.iter().map(|ip| (*ip).to_owned()).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn logging_in_answers_204_with_tokens_and_domains_in_headers() {
    let sim = start_with(FmcConfig {
        domains: vec![
            ("Global".into(), GLOBAL_DOMAIN.into()),
            ("Global/Devel".into(), CHILD_DOMAIN.into()),
        ],
        ..FmcConfig::default()
    })
    .await;

    let answer = send(
        reqwest::Client::new()
            .post(format!("{}{LOGIN}", sim.base_url()))
            .basic_auth("admin", Some("admin")),
    )
    .await;

    assert_eq!(answer.status, 204);
    assert_eq!(answer.body, Value::Null, "no body, as go-fmc requires");
    let access = answer.header("X-auth-access-token").unwrap();
    assert_eq!(access.len(), 36, "{access}");
    assert_ne!(answer.header("X-auth-refresh-token"), Some(access));
    assert_eq!(answer.header("DOMAIN_UUID"), Some(GLOBAL_DOMAIN));
    assert_eq!(answer.header("global"), Some(GLOBAL_DOMAIN));
    let domains: Value = serde_json::from_str(answer.header("DOMAINS").unwrap()).unwrap();
    assert_eq!(
        domains,
        json!([
            { "name": "Global", "uuid": GLOBAL_DOMAIN },
            { "name": "Global/Devel", "uuid": CHILD_DOMAIN },
        ])
    );
    assert_eq!(sim.issued_tokens(), [access]);
    assert_eq!(sim.stats().logins, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_credentials_answer_401_user_authentication_failed() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let url = format!("{}{LOGIN}", sim.base_url());

    let wrong = send(client.post(&url).basic_auth("admin", Some("nope"))).await;
    let missing = send(client.post(&url)).await;
    let get = send(client.get(&url).basic_auth("admin", Some("admin"))).await;

    for answer in [&wrong, &missing] {
        assert_eq!(answer.status, 401, "{answer:?}");
        assert_eq!(answer.description(), "User authentication failed");
        assert_eq!(answer.body["error"]["severity"], "ERROR");
        assert!(answer.header("x-auth-access-token").is_none());
    }
    assert_eq!(get.status, 405);
    let stats = sim.stats();
    assert_eq!((stats.logins, stats.unauthorized), (0, 2));
    assert!(sim.issued_tokens().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_live_access_token_answer_401_access_token_invalid() {
    let sim = start_with(FmcConfig {
        rate_limit_per_minute: 0,
        token_lifetime: Duration::from_secs(1),
        ..FmcConfig::default()
    })
    .await;
    let (token, _) = login(&sim).await;
    let (other, _) = login(&sim).await;

    let live = call(&sim, Method::GET, OBJECTS, &token, None).await;
    let unknown = call(&sim, Method::GET, OBJECTS, "not-a-token", None).await;
    let missing = send(reqwest::Client::new().get(format!("{}{OBJECTS}", sim.base_url()))).await;
    sim.expire_tokens();
    let expired = call(&sim, Method::GET, OBJECTS, &token, None).await;
    let (fresh, _) = login(&sim).await;
    let after_expiry = call(&sim, Method::GET, OBJECTS, &fresh, None).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let timed_out = call(&sim, Method::GET, OBJECTS, &fresh, None).await;

    assert_eq!(live.status, 200);
    for answer in [&unknown, &missing, &expired, &timed_out] {
        assert_eq!(answer.status, 401, "{answer:?}");
        assert_eq!(
            answer.body,
            json!({"error": {"category": "FRAMEWORK", "messages": [{"description": "Access token invalid."}], "severity": "ERROR"}})
        );
    }
    assert_eq!(after_expiry.status, 200, "a new login serves");
    let stats = sim.stats();
    assert_eq!((stats.unauthorized, stats.expired_tokens), (4, 3));
    assert_eq!(sim.issued_tokens(), [token, other, fresh]);
    sim.shutdown().await;
}

#[tokio::test]
async fn tokens_refresh_three_times_then_the_refresh_token_is_refused() {
    let sim = start().await;
    let (mut access, mut refresh) = login(&sim).await;
    let first = access.clone();
    let client = reqwest::Client::new();
    let refresh_with = |access: String, refresh: String| {
        send(
            client
                .post(format!("{}{REFRESH}", sim.base_url()))
                .header("X-auth-access-token", access)
                .header("X-auth-refresh-token", refresh),
        )
    };

    // An expired access token is what refreshing is for.
    sim.expire_tokens();
    for round in 1..=3 {
        let answer = refresh_with(access.clone(), refresh.clone()).await;
        assert_eq!(answer.status, 204, "refresh {round}: {answer:?}");
        assert_eq!(answer.header("DOMAIN_UUID"), Some(GLOBAL_DOMAIN));
        let old = access.clone();
        access = answer.header("x-auth-access-token").unwrap().to_owned();
        refresh = answer.header("x-auth-refresh-token").unwrap().to_owned();
        assert_ne!(access, old);
        assert_eq!(
            call(&sim, Method::GET, OBJECTS, &access, None).await.status,
            200
        );
        assert_eq!(
            call(&sim, Method::GET, OBJECTS, &old, None).await.status,
            401
        );
    }
    let fourth = refresh_with(access.clone(), refresh.clone()).await;
    let mismatched = refresh_with(first, refresh.clone()).await;

    assert_eq!(fourth.status, 401);
    assert_eq!(fourth.description(), "Invalid refresh token");
    assert_eq!(mismatched.status, 401);
    assert_eq!(
        call(&sim, Method::GET, OBJECTS, &access, None).await.status,
        200,
        "a refused refresh leaves the current token serving"
    );
    let stats = sim.stats();
    assert_eq!((stats.logins, stats.refreshes), (1, 3));
    assert_eq!(sim.issued_tokens().len(), 4);
    assert_eq!(sim.issued_refresh_tokens().len(), 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn server_version_and_domains_answer_like_fmc() {
    let sim = start_with(FmcConfig {
        rate_limit_per_minute: 0,
        domains: vec![
            ("Global".into(), GLOBAL_DOMAIN.into()),
            ("Global/Devel".into(), CHILD_DOMAIN.into()),
        ],
        ..FmcConfig::default()
    })
    .await;
    let (token, _) = login(&sim).await;

    let version = call(
        &sim,
        Method::GET,
        "/api/fmc_platform/v1/info/serverversion",
        &token,
        None,
    )
    .await;
    let domains = call(
        &sim,
        Method::GET,
        "/api/fmc_platform/v1/info/domain",
        &token,
        None,
    )
    .await;
    let unauthenticated = call(
        &sim,
        Method::GET,
        "/api/fmc_platform/v1/info/domain",
        "x",
        None,
    )
    .await;

    assert_eq!(version.status, 200);
    assert_eq!(
        version.body["items"][0]["serverVersion"],
        "7.4.2 (build 172)"
    );
    assert_eq!(
        domains.body["items"],
        json!([
            { "uuid": GLOBAL_DOMAIN, "name": "Global", "type": "Domain" },
            { "uuid": CHILD_DOMAIN, "name": "Global/Devel", "type": "Domain" },
        ])
    );
    assert_eq!(domains.body["paging"]["count"], 2);
    assert_eq!(unauthenticated.status, 401);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_full_rate_window_answers_429_with_retry_after_and_the_envelope() {
    let sim = start_with(FmcConfig {
        rate_limit_per_minute: 3,
        ..FmcConfig::default()
    })
    .await;
    let (token, _) = login(&sim).await;

    let admitted = [
        call(&sim, Method::GET, OBJECTS, &token, None).await.status,
        call(&sim, Method::GET, OBJECTS, &token, None).await.status,
    ];
    let limited = call(&sim, Method::GET, OBJECTS, &token, None).await;
    let control = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
        .await
        .expect("answers");

    assert_eq!(admitted, [200, 200], "the login took the first of three");
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["severity"], "ERROR");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(control.status(), 200, "/_sim/ is never rate-limited");
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.rate_limited), (4, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_next_refuses_that_many_requests_with_the_given_retry_after() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    sim.rate_limit_next(1, 7);
    let set = reqwest::Client::new()
        .post(format!("{}/_sim/ratelimit", sim.base_url()))
        .json(&json!({ "next": 1, "retry_after_secs": 9 }))
        .send()
        .await
        .expect("answers");
    assert_eq!(set.status(), 204);
    // The control route replaced the pending one: one 429, with its value.

    let first = call(&sim, Method::GET, OBJECTS, &token, None).await;
    let second = call(&sim, Method::GET, OBJECTS, &token, None).await;

    assert_eq!(first.status, 429);
    assert_eq!(first.header("retry-after"), Some("9"));
    assert_eq!(second.status, 200);
    sim.rate_limit_next(2, 3);
    let statuses = [
        call(&sim, Method::GET, OBJECTS, &token, None).await.status,
        call(&sim, Method::POST, LOGIN, "", None).await.status,
        call(&sim, Method::GET, OBJECTS, &token, None).await.status,
    ];
    assert_eq!(statuses, [429, 429, 200]);
    assert_eq!(sim.stats().rate_limited, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn creating_an_object_answers_201_with_the_full_object() {
    let sim = start().await;
    let (token, _) = login(&sim).await;

    let answer = call(
        &sim,
        Method::POST,
        OBJECTS,
        &token,
        Some(json!({ "name": "web", "type": "DynamicObject", "objectType": "IP", "description": "Web VMs" })),
    )
    .await;

    assert_eq!(answer.status, 201, "{answer:?}");
    let id = answer.body["id"].as_str().unwrap();
    assert_eq!(
        id.len(),
        "005056AB-931D-0ed3-0000-004294967338".len(),
        "{id}"
    );
    assert!(id.starts_with("005056AB-931D-0ed3-0000-"), "{id}");
    assert_eq!(answer.body["name"], "web");
    assert_eq!(answer.body["type"], "DynamicObject");
    assert_eq!(answer.body["objectType"], "IP");
    assert_eq!(answer.body["description"], "Web VMs");
    assert_eq!(
        answer.body["links"]["self"],
        format!("{}{OBJECTS}/{id}", sim.base_url())
    );
    assert_eq!(
        answer.body["metadata"]["domain"],
        json!({ "id": GLOBAL_DOMAIN, "name": "Global", "type": "Domain" })
    );
    assert_eq!(
        sim.objects(),
        BTreeMap::from([("web".to_owned(), id.to_owned())])
    );
    assert_eq!(sim.mappings(), view(&[("web", &[])]));
    assert_eq!(sim.stats().objects_created, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_objects_answer_400_and_bodies_that_are_not_json_or_too_big_422() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    let post = |body: Value| call(&sim, Method::POST, OBJECTS, &token, Some(body));

    let invalid = [
        post(json!({ "name": "a b", "type": "DynamicObject", "objectType": "IP" })).await,
        post(json!({ "name": "x".repeat(129), "type": "DynamicObject", "objectType": "IP" })).await,
        post(json!({ "type": "DynamicObject", "objectType": "IP" })).await,
        post(json!({ "name": "web", "type": "Host", "objectType": "IP" })).await,
        post(json!({ "name": "web", "type": "DynamicObject", "objectType": "SGT" })).await,
        post(json!([{ "name": "web", "type": "DynamicObject", "objectType": "IP" }])).await,
    ];
    let not_json = send(
        reqwest::Client::new()
            .post(format!("{}{OBJECTS}", sim.base_url()))
            .header("X-auth-access-token", &token)
            .body("{nope"),
    )
    .await;
    let too_big = call(
        &sim,
        Method::POST,
        OBJECTS,
        &token,
        Some(json!({ "name": "web", "description": "x".repeat(MAX_PAYLOAD) })),
    )
    .await;

    for answer in &invalid {
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["error"]["category"], "VALIDATION");
    }
    assert!(invalid[0].description().contains("a b"), "{:?}", invalid[0]);
    assert_eq!(not_json.status, 422);
    assert_eq!(too_big.status, 422);
    assert!(too_big.description().contains("2048000"), "{too_big:?}");
    assert!(sim.objects().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_name_answers_400_duplicate_name() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    create(&sim, &token, "web").await;

    let again = create(&sim, &token, "web").await;

    assert_eq!(again.status, 400);
    assert_eq!(again.description(), "Duplicate Name: web");
    assert_eq!(sim.stats().objects_created, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn lists_page_by_25_and_following_next_reaches_every_object() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    for n in 0..30 {
        sim.create_object_directly(&format!("vm-{n:02}"));
    }

    let first = call(
        &sim,
        Method::GET,
        &format!("{OBJECTS}?expanded=true"),
        &token,
        None,
    )
    .await;
    let next = first.body["paging"]["next"]
        .as_array()
        .expect("a next page")
        .clone();
    let second = call(&sim, Method::GET, next[0].as_str().unwrap(), &token, None).await;
    let brief = call(
        &sim,
        Method::GET,
        &format!("{OBJECTS}?offset=10&limit=5000"),
        &token,
        None,
    )
    .await;

    assert_eq!(
        first.body["paging"],
        json!({
            "offset": 0, "limit": 25, "count": 30, "pages": 2,
            "next": [format!("{}{OBJECTS}?expanded=true&offset=25&limit=25", sim.base_url())],
        })
    );
    assert_eq!(
        first.body["links"]["self"],
        format!("{}{OBJECTS}?expanded=true", sim.base_url())
    );
    let mut all = names(&first);
    all.extend(names(&second));
    assert_eq!(
        all,
        (0..30).map(|n| format!("vm-{n:02}")).collect::<Vec<_>>()
    );
    assert!(second.body["paging"].get("next").is_none(), "{second:?}");
    assert_eq!(
        second.body["items"][0]["objectType"], "IP",
        "next keeps expanded"
    );
    assert_eq!(brief.body["paging"]["limit"], 1000);
    assert_eq!(names(&brief).len(), 20);
    let mut keys: Vec<&str> = brief.body["items"][0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["id", "links", "name", "type"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn name_selects_exactly_and_filters_select_by_prefix_or_ids() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    for name in ["web", "web-2", "db", "Web"] {
        sim.create_object_directly(name);
    }
    let db = sim.objects()["db"].clone();
    let web = sim.objects()["web"].clone();
    let list = |query: String| {
        let token = token.clone();
        let sim = &sim;
        async move {
            call(
                sim,
                Method::GET,
                &format!("{OBJECTS}?{query}"),
                &token,
                None,
            )
            .await
        }
    };

    let exact = list("name=web".into()).await;
    let prefix = list("filter=nameStartsWith:web".into()).await;
    let ids = list(format!("filter=ids:{db},{web}")).await;
    let none = list("name=nosuch".into()).await;
    let bad = list("filter=color:red".into()).await;

    assert_eq!(names(&exact), ["web"]);
    assert_eq!(names(&prefix), ["web", "web-2"]);
    assert_eq!(names(&ids), ["web", "db"]);
    assert_eq!(none.body["items"], json!([]));
    assert_eq!(none.body["paging"]["count"], 0);
    assert_eq!(bad.status, 400);
    sim.shutdown().await;
}

#[tokio::test]
async fn objects_are_read_updated_and_deleted_by_id_or_by_name() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    let id = create(&sim, &token, "web").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.add_mapping_directly("web", "10.0.0.1");

    let by_name = call(&sim, Method::GET, &format!("{OBJECTS}/web"), &token, None).await;
    let by_id = call(&sim, Method::GET, &format!("{OBJECTS}/{id}"), &token, None).await;
    let updated = call(
        &sim,
        Method::PUT,
        &format!("{OBJECTS}/{id}"),
        &token,
        Some(json!({ "id": id, "name": "web-tier", "type": "DynamicObject", "objectType": "IP", "description": "tier" })),
    )
    .await;
    let deleted = call(
        &sim,
        Method::DELETE,
        &format!("{OBJECTS}/web-tier"),
        &token,
        None,
    )
    .await;
    let again = call(
        &sim,
        Method::DELETE,
        &format!("{OBJECTS}/{id}"),
        &token,
        None,
    )
    .await;
    let gone = call(&sim, Method::GET, &format!("{OBJECTS}/{id}"), &token, None).await;

    assert_eq!(by_name.status, 200);
    assert_eq!(by_name.body, by_id.body);
    assert_eq!(updated.status, 200);
    assert_eq!(updated.body["name"], "web-tier");
    assert_eq!(
        deleted.status, 200,
        "deleting an object with mappings is allowed"
    );
    assert_eq!(deleted.body["id"], id.as_str());
    assert_eq!(deleted.body["description"], "tier");
    assert_eq!((again.status, gone.status), (404, 404));
    assert!(gone.description().contains(&id), "{gone:?}");
    assert!(sim.mappings().is_empty());
    assert_eq!(sim.stats().objects_deleted, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn bulk_create_answers_201_with_items_and_creates_all_or_nothing() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    let object = |name: &str| json!({ "name": name, "type": "DynamicObject", "objectType": "IP" });
    let bulk = format!("{OBJECTS}?bulk=true");

    let created = call(
        &sim,
        Method::POST,
        &bulk,
        &token,
        Some(json!([object("a"), object("b")])),
    )
    .await;
    let clash = call(
        &sim,
        Method::POST,
        &bulk,
        &token,
        Some(json!([object("c"), object("a")])),
    )
    .await;

    assert_eq!(created.status, 201);
    assert_eq!(names(&created), ["a", "b"]);
    assert!(created.body["items"][0]["id"].is_string());
    assert_eq!(clash.status, 400);
    assert_eq!(clash.description(), "Duplicate Name: a");
    assert_eq!(sim.mappings(), view(&[("a", &[]), ("b", &[])]));
    sim.shutdown().await;
}

#[tokio::test]
async fn bulk_mappings_add_and_remove_by_id_or_name_and_echo_the_body() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    let web = sim.create_object_directly("web");
    sim.create_object_directly("db");
    sim.add_mapping_directly("db", "10.0.1.9");
    let body = json!({
        "add": [
            { "mappings": ["10.0.0.1", "2001:DB8::1", "10.0.0.1", "10.9.0.0/16"], "dynamicObject": { "id": web } },
            { "mappings": ["10.0.1.1"], "dynamicObject": { "name": "db", "type": "DynamicObject" } },
        ],
        "remove": [
            { "mappings": ["10.0.1.9", "10.0.1.200"], "dynamicObject": { "name": "db" } },
        ],
    });

    let answer = call(
        &sim,
        Method::POST,
        BULK_MAPPINGS,
        &token,
        Some(body.clone()),
    )
    .await;

    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.body, body);
    assert_eq!(
        sim.mappings(),
        view(&[
            ("db", &["10.0.1.1"]),
            ("web", &["10.0.0.1", "10.9.0.0/16", "2001:db8::1"]),
        ])
    );
    let stats = sim.stats();
    assert_eq!(
        (
            stats.bulk_mapping_posts,
            stats.mappings_added,
            stats.mappings_removed,
            stats.mappings
        ),
        (1, 4, 1, 4)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bulk_mapping_with_an_invalid_ip_or_unknown_object_applies_nothing() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    sim.create_object_directly("web");
    sim.add_mapping_directly("web", "10.0.0.9");
    let post = |body: Value| call(&sim, Method::POST, BULK_MAPPINGS, &token, Some(body));

    let bad_ip = post(json!({
        "add": [{ "mappings": ["10.0.0.1", "10.0.0.300"], "dynamicObject": { "name": "web" } }],
        "remove": [{ "mappings": ["10.0.0.9"], "dynamicObject": { "name": "web" } }],
    }))
    .await;
    let unknown = post(json!({
        "add": [{ "mappings": ["10.0.0.1"], "dynamicObject": { "name": "web" } }],
        "remove": [{ "mappings": ["10.0.0.9"], "dynamicObject": { "name": "nosuch" } }],
    }))
    .await;

    assert_eq!(bad_ip.status, 400);
    assert!(bad_ip.description().contains("10.0.0.300"), "{bad_ip:?}");
    assert_eq!(unknown.status, 400);
    assert!(unknown.description().contains("nosuch"), "{unknown:?}");
    assert_eq!(sim.mappings(), view(&[("web", &["10.0.0.9"])]));
    let stats = sim.stats();
    assert_eq!(
        (
            stats.bulk_mapping_posts,
            stats.mappings_added,
            stats.mappings_removed
        ),
        (2, 0, 0)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn put_mappings_adds_removes_and_removes_all() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    let id = sim.create_object_directly("web");
    let (sim_ref, token_ref, id_ref) = (&sim, token.as_str(), id.as_str());
    let put = move |action: &str, mappings: Option<Value>| {
        let mut body = json!({ "type": "DynamicObjectMappings", "id": id_ref });
        if let Some(mappings) = mappings {
            body["mappings"] = mappings;
        }
        let url = format!("{OBJECTS}/{id_ref}/mappings?action={action}");
        async move { call(sim_ref, Method::PUT, &url, token_ref, Some(body)).await }
    };

    let added = put("add", Some(json!(["10.0.0.1", "10.0.0.2", "10.0.0.3"]))).await;
    let removed = put("remove", Some(json!(["10.0.0.2", "10.0.0.99"]))).await;
    let after_remove = sim.mappings();
    let cleared = put("remove_all", None).await;
    let bad = put("replace", Some(json!([]))).await;

    assert_eq!(added.status, 200);
    assert_eq!(
        added.body["mappings"],
        json!(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    );
    assert_eq!(removed.status, 200);
    assert_eq!(after_remove, view(&[("web", &["10.0.0.1", "10.0.0.3"])]));
    assert_eq!(cleared.status, 200);
    assert_eq!(sim.mappings(), view(&[("web", &[])]));
    assert_eq!(bad.status, 400);
    let stats = sim.stats();
    assert_eq!((stats.mappings_added, stats.mappings_removed), (3, 3));
    sim.shutdown().await;
}

#[tokio::test]
async fn an_objects_mappings_list_in_pages_of_mapping_items() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    sim.create_object_directly("web");
    for n in 1..=30 {
        sim.add_mapping_directly("web", &format!("10.0.0.{n}"));
    }

    let first = call(
        &sim,
        Method::GET,
        &format!("{OBJECTS}/web/mappings"),
        &token,
        None,
    )
    .await;
    let next = first.body["paging"]["next"][0].as_str().unwrap().to_owned();
    let second = call(&sim, Method::GET, &next, &token, None).await;
    let missing = call(
        &sim,
        Method::GET,
        &format!("{OBJECTS}/nosuch/mappings"),
        &token,
        None,
    )
    .await;

    assert_eq!(first.status, 200);
    assert_eq!(first.body["items"][0], json!({ "mapping": "10.0.0.1" }));
    assert_eq!(first.body["items"].as_array().unwrap().len(), 25);
    assert_eq!(first.body["paging"]["count"], 30);
    assert_eq!(second.body["items"].as_array().unwrap().len(), 5);
    assert!(second.body["paging"].get("next").is_none());
    assert_eq!(missing.status, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_domains_and_routes_answer_404_and_wrong_methods_405() {
    let sim = start().await;
    let (token, _) = login(&sim).await;

    let domain = call(
        &sim,
        Method::GET,
        "/api/fmc_config/v1/domain/00000000-0000-0000-0000-000000000000/object/dynamicobjects",
        &token,
        None,
    )
    .await;
    let route = call(&sim, Method::GET, "/api/fmc_config/v1/nosuch", &token, None).await;
    let method = call(&sim, Method::PATCH, OBJECTS, &token, None).await;

    assert_eq!(domain.status, 404);
    assert!(domain.description().contains("00000000-0000"), "{domain:?}");
    assert_eq!(route.status, 404);
    assert_eq!(route.body["error"]["severity"], "ERROR");
    assert_eq!(method.status, 405);
    sim.shutdown().await;
}

#[tokio::test]
async fn child_domains_keep_their_own_objects_shown_with_the_domain_name() {
    let sim = start_with(FmcConfig {
        rate_limit_per_minute: 0,
        domains: vec![
            ("Global".into(), GLOBAL_DOMAIN.into()),
            ("Global/Devel".into(), CHILD_DOMAIN.into()),
        ],
        ..FmcConfig::default()
    })
    .await;
    let (token, _) = login(&sim).await;
    let child = format!("/api/fmc_config/v1/domain/{CHILD_DOMAIN}/object");
    sim.create_object_directly("web");

    let created = call(
        &sim,
        Method::POST,
        &format!("{child}/dynamicobjects"),
        &token,
        Some(json!({ "name": "web", "type": "DynamicObject", "objectType": "IP" })),
    )
    .await;
    let mapped = call(
        &sim,
        Method::POST,
        &format!("{child}/dynamicobjectmappings"),
        &token,
        Some(json!({ "add": [{ "mappings": ["10.1.0.1"], "dynamicObject": { "name": "web" } }] })),
    )
    .await;

    assert_eq!(
        created.status, 201,
        "the same name in another domain is no duplicate"
    );
    assert_eq!(created.body["metadata"]["domain"]["name"], "Global/Devel");
    assert_eq!(mapped.status, 201);
    assert_eq!(
        sim.mappings(),
        view(&[("Global/Devel:web", &["10.1.0.1"]), ("web", &[])])
    );
    assert_eq!(sim.objects().len(), 1, "objects() is Global's");
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_next_answers_the_status_with_retry_after_then_recovers() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
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

    let first = create(&sim, &token, "web").await;
    let second = create(&sim, &token, "web").await;
    assert!(sim.objects().is_empty(), "a failed request changes nothing");
    let third = create(&sim, &token, "web").await;

    assert_eq!([first.status, second.status, third.status], [503, 503, 201]);
    assert_eq!(first.header("retry-after"), Some("7"));
    assert_eq!(first.body["error"]["severity"], "ERROR");
    let stats = sim.stats();
    assert_eq!(
        (stats.requests, stats.errors, stats.objects_created),
        (4, 2, 1)
    );
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
        .post(format!("{}{LOGIN}", sim.base_url()))
        .basic_auth("admin", Some("admin"))
        .send()
        .await;
    let mut raw = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("connects");
    raw.write_all(b"GET /api/fmc_platform/v1/info/serverversion HTTP/1.1\r\nHost: fmc\r\n\r\n")
        .await
        .expect("writes");
    let mut received = Vec::new();
    // Either an orderly EOF or a reset, depending on unread bytes: both close.
    let _ = raw.read_to_end(&mut received).await;

    let error = through_reqwest.expect_err("no answer arrives");
    assert!(!error.is_timeout(), "{error}");
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );
    sim.set_faults(Faults::default());
    login(&sim).await;
    let log = sim.requests(3);
    assert_eq!(
        log.iter().map(|r| r.status_code).collect::<Vec<_>>(),
        [None, None, Some(204)]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_create_objects_and_show_mappings_and_stats() {
    let sim = start().await;
    let (token, _) = login(&sim).await;
    let client = reqwest::Client::new();
    let base = sim.base_url();

    let created = client
        .post(format!("{base}/_sim/objects/web"))
        .send()
        .await
        .unwrap();
    let again = client
        .post(format!("{base}/_sim/objects/web"))
        .send()
        .await
        .unwrap();
    let bad = client
        .post(format!("{base}/_sim/objects/a%20b"))
        .send()
        .await
        .unwrap();
    call(
        &sim,
        Method::PUT,
        &format!("{OBJECTS}/web/mappings?action=add"),
        &token,
        Some(json!({ "type": "DynamicObjectMappings", "mappings": ["10.0.0.2", "10.0.0.10"] })),
    )
    .await;
    let mappings: BTreeMap<String, Vec<String>> = reqwest::get(format!("{base}/_sim/mappings"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stats: FmcStats = reqwest::get(format!("{base}/_sim/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expired = client
        .post(format!("{base}/_sim/tokens/expire"))
        .send()
        .await
        .unwrap();
    let after_expiry = call(&sim, Method::GET, OBJECTS, &token, None).await;
    let reset = client
        .post(format!("{base}/_sim/reset"))
        .send()
        .await
        .unwrap();

    let statuses = [created.status(), again.status(), bad.status()].map(|s| s.as_u16());
    assert_eq!(statuses, [201, 200, 400]);
    assert_eq!(mappings, view(&[("web", &["10.0.0.10", "10.0.0.2"])]));
    assert_eq!(
        (
            stats.requests,
            stats.logins,
            stats.mappings_added,
            stats.objects,
            stats.mappings
        ),
        (2, 1, 2, 1, 2)
    );
    assert_eq!(expired.status(), 204);
    assert_eq!(after_expiry.status, 401);
    assert_eq!(reset.status(), 204);
    assert!(sim.mappings().is_empty());
    assert_eq!(sim.stats(), FmcStats::default());
    assert!(sim.requests(10).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn the_request_log_shows_method_path_and_body_but_no_credentials_or_tokens() {
    let sim = start().await;
    let (token, refresh) = login(&sim).await;
    create(&sim, &token, "web").await;

    let log: Vec<RequestRecord> = reqwest::get(format!("{}/_sim/requests?n=10", sim.base_url()))
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");

    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str()),
        ("POST", LOGIN)
    );
    assert_eq!(log[0].body, None);
    assert_eq!(log[1].path, OBJECTS);
    assert_eq!(
        log[1].body,
        Some(json!({ "name": "web", "type": "DynamicObject", "objectType": "IP" }))
    );
    assert_eq!(log[1].status_code, Some(201));
    let raw = serde_json::to_string(&log).expect("serialises");
    for secret in ["YWRtaW46YWRtaW4", "admin", &token, &refresh] {
        assert!(!raw.contains(secret), "{secret} in {raw}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bad_domain_list_fails_start_and_shutdown_stops_listening() {
    let error = FmcSim::start(
        ([127, 0, 0, 1], 0).into(),
        FmcConfig {
            domains: Vec::new(),
            ..FmcConfig::default()
        },
    )
    .await
    .err()
    .expect("refused");
    assert!(error.to_string().contains("domain"), "{error}");

    let sim = start().await;
    let addr = sim.addr();
    assert_eq!(sim.base_url(), format!("http://127.0.0.1:{}", addr.port()));
    sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
