//! Session logins: the host signs in to an origin for its plugins, keeps
//! the token, signs in again when the origin refuses it, and the plugins
//! never see the password or the token. Against the BIG-IP simulator with
//! Basic authentication off, as for remotely authenticated users.

use crate::common::{self, HostConfig};

use std::time::Duration;

use prismhook::app::App;
use prismhook_sim::bigip::{BigipConfig, BigipSim};

const PASSWORD: &str = "bigip-Pa55-never-seen";
/// A credential some origins take as a parameter of the login URL.
const QUERY_KEY: &str = "query-held-credential";

/// The probe's settings for a BIG-IP simulator with a token login, whose
/// URL ends with `query`.
fn probe_on(lb: &str, password: &str, query: &str) -> Vec<String> {
    vec![
        r#"component = "probe.wasm""#.to_owned(),
        format!(r#"allow = ["{lb}"]"#),
        format!(
            r#"login = [{{ origin = "{lb}", url = "{lb}/mgmt/shared/authn/login{query}", username = "admin", password = {{ value = "{password}" }}, fields = {{ loginProviderName = "tmos" }}, token_pointer = "/token/token", header = "X-F5-Auth-Token" }}]"#
        ),
    ]
}

/// A `TEST.HTTP` event: the probe GETs the pool list and keeps the answer.
async fn fetch_pools(app: &App, seq: u64, lb: &str) -> u64 {
    let body = serde_json::json!({ "url": format!("{lb}/mgmt/tm/ltm/pool") }).to_string();
    let id = common::append_body(app, seq, &format!("vm-{seq}"), "TEST.HTTP", body).await;
    common::drained(app).await;
    id
}

fn answer(app: &App, plugin: &str, id: u64) -> String {
    let kv = app.runtime.kv().dump(plugin).unwrap();
    String::from_utf8(kv[&format!("http/{id}")].clone()).unwrap()
}

#[tokio::test]
async fn one_sign_in_serves_every_call_and_an_expired_token_is_renewed_without_a_failed_request() {
    common::init_tracing();
    let bigip = BigipSim::start(
        "127.0.0.1:0".parse().unwrap(),
        BigipConfig {
            password: PASSWORD.into(),
            basic_auth: false,
            pools: vec!["web".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let lb = bigip.base_url();
    let dir = tempfile::tempdir().unwrap();
    let host = HostConfig::new(dir.path())
        .plugin("good", &probe_on(&lb, PASSWORD, ""))
        .plugin(
            "wrong",
            &probe_on(&lb, "not-the-password", &format!("?apikey={QUERY_KEY}")),
        );
    common::setup::install(host.plugins_dir(), &["probe"]);
    let app = App::start(host.config()).await.unwrap();

    let mut ids = Vec::new();
    for seq in 1..=3 {
        ids.push(fetch_pools(&app, seq, &lb).await);
    }
    assert_eq!(bigip.stats().logins, 1, "one token for every call");
    // The token ends on the device's side: the next request gets 401, the
    // host signs in again and sends it once more.
    bigip.expire_tokens();
    ids.push(fetch_pools(&app, 4, &lb).await);
    let stats = bigip.stats();
    assert_eq!((stats.logins, stats.expired_tokens), (2, 1));
    for id in &ids {
        let got = answer(&app, "good", *id);
        assert!(got.starts_with("status=200"), "{got}");
        assert!(got.contains("~Common~web"), "{got}");
    }
    // A refused sign-in is the plugin's error to retry, and says why
    // without the password or the URL's query.
    let refused = answer(&app, "wrong", ids[0]);
    assert!(
        refused.contains("signing in to") && refused.contains("failed: HTTP 401"),
        "{refused}"
    );
    assert!(
        refused.contains("/mgmt/shared/authn/login failed") && !refused.contains(QUERY_KEY),
        "{refused}"
    );

    let tokens = bigip.issued_tokens();
    assert_eq!(tokens.len(), 2);
    for plugin in ["good", "wrong"] {
        for (key, value) in app.runtime.kv().dump(plugin).unwrap() {
            let value = String::from_utf8_lossy(&value);
            for secret in tokens
                .iter()
                .map(String::as_str)
                .chain([PASSWORD, QUERY_KEY])
            {
                assert!(
                    !value.contains(secret),
                    "{plugin} holds `{secret}` in `{key}`: {value}"
                );
            }
        }
    }
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}
