//! Secrets never reach the logs: the real binary runs a VM lifecycle at
//! debug level, in both log formats, and nothing it prints — nor what the
//! operator's commands (`plugins list`, `clusters`, `dlq list`) print —
//! contains the Prism password, the webhook password, the firewall
//! password or any API key the host got from the firewall by signing in
//! (the keys expire mid-run, so there are two).

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use prismhook_sim::panos::{PanosConfig, PanosSim};
use prismhook_sim::prism::{NewNic, NewVm, PrismConfig, PrismSim};
use tokio::io::AsyncReadExt;

const PRISM_PASSWORD: &str = "prism-Pa55-never-logged";
const WEBHOOK_PASSWORD: &str = "webhook-Pa55-never-logged";
const PAN_KEY: &str = "pan-KEY-never-logged-0123456789";
const PAN_PASSWORD: &str = "pan-Pa55-never-logged";

async fn run_host(log_format: &str) -> String {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(common::component("paloalto"), plugins.join("paloalto.wasm")).unwrap();
    let prism = PrismSim::start(
        "127.0.0.1:0".parse().unwrap(),
        PrismConfig {
            password: PRISM_PASSWORD.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let panos = PanosSim::start(
        "127.0.0.1:0".parse().unwrap(),
        PanosConfig {
            api_key: PAN_KEY.into(),
            password: PAN_PASSWORD.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let port = common::free_port();
    // A fixed admin port, so that the CLI finds the host from the config.
    let admin_port = common::free_port();
    let fw = panos.base_url();
    let config = dir.path().join("prismhook.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listener]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin_port}"
[storage]
data_dir = "{data}"
[plugins]
dir = "{plugins}"
[plugin.paloalto]
config = {{ firewall = "{fw}" }}
allow = ["{fw}"]
# The API key comes from keygen: the host signs in with the password.
[[plugin.paloalto.login]]
origin = "{fw}"
url = "{fw}/api/?type=keygen"
send = "form"
username = "admin"
username_field = "user"
password = {{ env = "TEST_PAN_PASSWORD" }}
token_xml = "/response/result/key"
header = "X-PAN-KEY"
[[cluster]]
name = "lab"
prism_url = "{prism}"
username = "admin"
password = {{ env = "TEST_PRISM_PASSWORD" }}
webhook_password = {{ env = "TEST_WEBHOOK_PASSWORD" }}
"#,
            data = dir.path().join("data").display(),
            plugins = plugins.display(),
            prism = prism.base_url(),
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prismhook"))
        .args(["--log-format", log_format, "run", "--config"])
        .arg(&config)
        .env("PRISMHOOK_LOG", "debug")
        .env("TEST_PAN_PASSWORD", PAN_PASSWORD)
        .env("TEST_PRISM_PASSWORD", PRISM_PASSWORD)
        .env("TEST_WEBHOOK_PASSWORD", WEBHOOK_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s).await;
        s
    });
    let err = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });

    let until = Instant::now() + Duration::from_secs(60);
    while prism.webhooks().is_empty() {
        assert!(
            Instant::now() < until,
            "the host never registered its webhook"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wrong credentials too: the refusal is logged, the password is not.
    let hook = prism.webhooks()[0].clone();
    let _ = reqwest::Client::new()
        .post(&hook.post_url)
        .basic_auth("prismhook", Some("guess"))
        .body("{}")
        .send()
        .await;
    // Each step waits for the firewall, so that no batch folds them away.
    let vm = prism
        .create_vm(
            NewVm::named("web")
                .powered_on()
                .category("AppTier", "Web")
                .nic(["10.9.0.1"]),
        )
        .await
        .unwrap()
        .uuid;
    let limit = until.saturating_duration_since(Instant::now());
    common::wait_until("the VM's address on the firewall", limit, || {
        panos.registered().contains_key("10.9.0.1")
    })
    .await;
    prism
        .plug_nic(&vm, NewNic::with_ips(["10.9.0.2"]))
        .await
        .unwrap();
    let limit = until.saturating_duration_since(Instant::now());
    common::wait_until("the new NIC's address on the firewall", limit, || {
        panos.registered().contains_key("10.9.0.2")
    })
    .await;
    // The firewall's keys expire: the next request gets 403, and the host
    // signs in again and resends it.
    assert_eq!(panos.stats().keygens, 1, "one sign-in serves every call");
    panos.expire_api_keys();
    prism.delete_vm(&vm).await.unwrap();
    let limit = until.saturating_duration_since(Instant::now());
    common::wait_until("the deleted VM gone from the firewall", limit, || {
        panos.registered().is_empty()
    })
    .await;
    assert_eq!(panos.stats().keygens, 2);
    // The operator's commands, through the admin API: they show the plugin
    // and its counts, and no secret either.
    let mut cli_output = String::new();
    for args in [&["plugins", "list"][..], &["clusters"], &["dlq", "list"]] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_prismhook"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("TEST_PAN_PASSWORD", PAN_PASSWORD)
            .env("TEST_PRISM_PASSWORD", PRISM_PASSWORD)
            .env("TEST_WEBHOOK_PASSWORD", WEBHOOK_PASSWORD)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "prismhook {args:?}:\n{text}");
        cli_output.push_str(&text);
    }
    assert!(
        cli_output.contains("paloalto") && cli_output.contains("active"),
        "{cli_output}"
    );
    assert!(
        cli_output.contains("lab"),
        "the cluster is listed:\n{cli_output}"
    );

    // SIGTERM: graceful stop.
    let pid = child.id().unwrap() as i32;
    unsafe_kill(pid);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    format!("{}{}{cli_output}", out.await.unwrap(), err.await.unwrap())
}

fn unsafe_kill(pid: i32) {
    // No libc dependency for one signal: the kill(1) command does it.
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn no_configured_secret_appears_in_the_logs_of_a_full_run() {
    for format in ["human", "json"] {
        let logs = run_host(format).await;
        assert!(
            logs.contains("webhook created"),
            "{format}: the run was logged:\n{logs}"
        );
        assert!(
            logs.contains("wrong or missing credentials"),
            "{format}: the refusal was logged"
        );
        assert!(
            logs.contains("signed in"),
            "{format}: the sign-ins were logged"
        );
        for secret in [PRISM_PASSWORD, WEBHOOK_PASSWORD, PAN_PASSWORD, PAN_KEY] {
            assert!(
                !logs.contains(secret),
                "{format}: `{secret}` leaked into the logs"
            );
        }
    }
}

/// `prismhook config check` (the systemd unit's `ExecStartPre`) reads
/// what the host would read at start, and names the key of every problem,
/// never a secret's value.
#[tokio::test]
async fn config_check_reads_every_secret_and_certificate_and_names_the_key_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (one, other) = (
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap(),
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap(),
    );
    std::fs::write(p("cert.pem"), one.cert.pem()).unwrap();
    std::fs::write(p("key.pem"), one.key_pair.serialize_pem()).unwrap();
    std::fs::write(p("other.key"), other.key_pair.serialize_pem()).unwrap();
    let file = dir.path().join("prismhook.toml");
    // `ca` and `pin`: the trust files of the cluster and the plugin.
    let write = |key: &str, ca: &str, pin: &str| {
        let text = format!(
            r#"[listener]
public_url = "https://prismhook.example.com:8080"
tls = {{ cert = "{cert}", key = "{key}" }}
[storage]
data_dir = "{data}"
[plugins]
dir = "{plugins}"
[plugin.fw]
allow = ["https://fw.example.com"]
inject = [{{ origin = "https://fw.example.com", header = "X-Key", env = "TEST_CHECK_FW_KEY" }}]
tls = {{ pinned_cert = "{pin}" }}
[[cluster]]
name = "lab"
prism_url = "https://prism.example.com:9440"
username = "admin"
password = {{ env = "TEST_CHECK_PRISM_PASSWORD" }}
webhook_password = {{ value = "{WEBHOOK_PASSWORD}" }}
tls = {{ ca_file = "{ca}" }}
"#,
            cert = p("cert.pem"),
            key = p(key),
            ca = p(ca),
            pin = p(pin),
            data = p("data"),
            plugins = p("plugins"),
        );
        std::fs::write(&file, text).unwrap();
    };
    let check = |env: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_prismhook"));
        command.args(["config", "check"]).arg(&file);
        command.env_remove("TEST_CHECK_FW_KEY");
        command.env_remove("TEST_CHECK_PRISM_PASSWORD");
        if env {
            command.env("TEST_CHECK_FW_KEY", PAN_KEY);
            command.env("TEST_CHECK_PRISM_PASSWORD", PRISM_PASSWORD);
        }
        let out = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    write("other.key", "no-ca.pem", "no-pin.pem");
    let (ok, text) = check(false);
    assert!(!ok, "{text}");
    for expected in [
        "`listener.tls`: the certificate",
        "do not go together",
        "`cluster[0].password`",
        "TEST_CHECK_PRISM_PASSWORD",
        "`plugin.fw.inject[0]`",
        "TEST_CHECK_FW_KEY",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    // With the secrets there, the trust files are read too.
    let (ok, text) = check(true);
    assert!(!ok, "{text}");
    for expected in [
        "`cluster[0].tls`",
        "no-ca.pem",
        "`plugin.fw.tls`",
        "no-pin.pem",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }

    write("key.pem", "cert.pem", "cert.pem");
    let (ok, text) = check(true);
    assert!(ok, "{text}");
    assert!(
        text.contains(": valid (1 cluster(s), 1 plugin setting(s)"),
        "{text}"
    );
    for secret in [WEBHOOK_PASSWORD, PAN_KEY, PRISM_PASSWORD] {
        assert!(!text.contains(secret), "{text}");
    }
}

/// The NATS sign-in and trust files are read as the host reads them at
/// start: a credentials file that is not one, or a CA file that holds no
/// certificate, is named by its key.
#[test]
fn config_check_reads_the_nats_credentials_and_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(p("nats.creds"), "not a credentials file").unwrap();
    std::fs::write(p("nats-ca.pem"), "not a certificate").unwrap();
    let file = dir.path().join("prismhook.toml");
    std::fs::write(
        &file,
        format!(
            r#"[storage]
data_dir = "{data}"
backend = "jetstream"
[storage.jetstream]
servers = ["nats://127.0.0.1:4222"]
credentials = "{creds}"
ca_file = "{ca}"
"#,
            data = p("data"),
            creds = p("nats.creds"),
            ca = p("nats-ca.pem"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prismhook"))
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for expected in [
        "`storage.jetstream.credentials`",
        "nats.creds",
        "`storage.jetstream.ca_file`",
        "nats-ca.pem",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
}
