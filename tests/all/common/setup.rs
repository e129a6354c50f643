//! A host's configuration for a test, built from typed parts and written
//! out as the TOML an operator would write, so that every test goes
//! through the real loader (`Config::parse`) and no test spells the same
//! dozen lines again.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prismhook::config::Config;
use prismhook_sim::fmc::{FmcConfig, FmcSim};
use prismhook_sim::panos::{PanosConfig, PanosSim};
use prismhook_sim::prism::{PrismConfig, PrismSim};

/// The password the tests' webhooks present.
pub const WEBHOOK_PASSWORD: &str = "hook-secret";
/// The Prism simulator's default credentials.
pub const PRISM_USER: &str = "admin";
pub const PRISM_PASSWORD: &str = "nutanix/4u";

/// Prism and PAN-OS simulators on loopback ports, with their defaults.
pub async fn start_prism() -> PrismSim {
    PrismSim::start("127.0.0.1:0".parse().unwrap(), PrismConfig::default())
        .await
        .unwrap()
}

pub async fn start_fmc() -> FmcSim {
    FmcSim::start("127.0.0.1:0".parse().unwrap(), FmcConfig::default())
        .await
        .unwrap()
}

pub async fn start_panos() -> PanosSim {
    PanosSim::start("127.0.0.1:0".parse().unwrap(), PanosConfig::default())
        .await
        .unwrap()
}

/// Copies the named guest components (built by `cargo xtask plugins`) into
/// `dir` as `<name>.wasm`.
pub fn install(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for name in names {
        std::fs::copy(super::component(name), dir.join(format!("{name}.wasm"))).unwrap();
    }
}

/// One `[[cluster]]` table.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub prism_url: String,
    /// `None`: the host generates and keeps one.
    pub webhook_password: Option<String>,
    pub reconcile_interval: String,
    /// Further `key = value` lines of the table.
    pub extra: Vec<String>,
}

impl Cluster {
    /// Cluster `name` at `prism_url`, with the simulator's credentials, the
    /// tests' webhook password and no reconcile timer.
    pub fn new(name: &str, prism_url: &str) -> Cluster {
        Cluster {
            name: name.into(),
            prism_url: prism_url.into(),
            webhook_password: Some(WEBHOOK_PASSWORD.into()),
            reconcile_interval: "0s".into(),
            extra: Vec::new(),
        }
    }

    /// Cluster `lab` of a Prism simulator.
    pub fn lab(prism: &PrismSim) -> Cluster {
        Cluster::new("lab", &prism.base_url())
    }
}

/// Everything a test host is configured with. Built with [`HostConfig::new`]
/// and the methods below; [`HostConfig::toml`] writes it out.
#[derive(Debug, Clone)]
pub struct HostConfig {
    instance: String,
    listen: String,
    admin_listen: String,
    admin_token: Option<String>,
    /// Further lines of `[admin]`.
    admin: Vec<String>,
    data_dir: PathBuf,
    plugins_dir: PathBuf,
    watch: bool,
    /// Further lines of `[listener]`.
    listener: Vec<String>,
    /// Further lines of `[plugins]`.
    plugins_table: Vec<String>,
    storage: Vec<String>,
    delivery: Vec<String>,
    /// Whole `[plugin.<name>]` tables.
    plugins: Vec<String>,
    clusters: Vec<Cluster>,
    proxy_from_env: bool,
}

impl HostConfig {
    /// Instance `test`, listener and admin API on free loopback ports, data
    /// and plugins under `root`, no watcher, the default retry policy, no
    /// cluster.
    pub fn new(root: &Path) -> HostConfig {
        HostConfig {
            instance: "test".into(),
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            admin_token: None,
            admin: Vec::new(),
            data_dir: root.join("data"),
            plugins_dir: root.join("plugins"),
            watch: false,
            listener: Vec::new(),
            plugins_table: Vec::new(),
            storage: Vec::new(),
            delivery: Vec::new(),
            plugins: Vec::new(),
            clusters: Vec::new(),
            proxy_from_env: false,
        }
    }

    /// Top-level `proxy_from_env`.
    pub fn proxy_from_env(mut self, on: bool) -> Self {
        self.proxy_from_env = on;
        self
    }

    pub fn instance(mut self, name: &str) -> Self {
        self.instance = name.into();
        self
    }

    pub fn listen(mut self, addr: impl std::fmt::Display) -> Self {
        self.listen = addr.to_string();
        self
    }

    pub fn admin_listen(mut self, addr: impl std::fmt::Display) -> Self {
        self.admin_listen = addr.to_string();
        self
    }

    /// Data and plugins directories elsewhere than under the root.
    pub fn dirs(mut self, data: &Path, plugins: &Path) -> Self {
        self.data_dir = data.to_owned();
        self.plugins_dir = plugins.to_owned();
        self
    }

    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    /// A `key = value` line of `[admin]` (value in TOML).
    pub fn admin(mut self, line: &str) -> Self {
        self.admin.push(line.into());
        self
    }

    pub fn watch(mut self, on: bool) -> Self {
        self.watch = on;
        self
    }

    pub fn plugins_dir(&self) -> &Path {
        &self.plugins_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A `key = value` line of `[listener]` (value in TOML).
    pub fn listener(mut self, line: &str) -> Self {
        self.listener.push(line.into());
        self
    }

    /// A `key = value` line of `[plugins]` (value in TOML).
    pub fn plugins_setting(mut self, line: &str) -> Self {
        self.plugins_table.push(line.into());
        self
    }

    /// A `key = value` line of `[storage]` (value in TOML).
    pub fn storage(mut self, line: &str) -> Self {
        self.storage.push(line.into());
        self
    }

    /// A `key = value` line of `[delivery]`; replaces the default for the
    /// same key.
    pub fn delivery(mut self, line: &str) -> Self {
        let key = line.split('=').next().unwrap_or_default().trim().to_owned();
        self.delivery
            .retain(|l| l.split('=').next().unwrap_or_default().trim() != key);
        self.delivery.push(line.into());
        self
    }

    /// Retries after 50 ms, backing off to 200 ms: tests that wait for a
    /// retry do not wait for long.
    pub fn fast_retries(self) -> Self {
        self.delivery(r#"retry_initial = "50ms""#)
            .delivery(r#"retry_max = "200ms""#)
    }

    /// A `[plugin.<name>]` table with `lines` in it.
    pub fn plugin(mut self, name: &str, lines: &[impl AsRef<str>]) -> Self {
        let mut table = format!("[plugin.{name}]\n");
        for line in lines {
            let _ = writeln!(table, "{}", line.as_ref());
        }
        self.plugins.push(table);
        self
    }

    /// Adds `line` to the table of the plugin added last, such as
    /// `limits = { memory_mib = 16 }`.
    pub fn plugin_line(mut self, line: &str) -> Self {
        let table = self.plugins.last_mut().expect("a plugin added before");
        let _ = writeln!(table, "{line}");
        self
    }

    /// The Palo Alto plugin's table for a PAN-OS simulator: its firewall,
    /// allowed, with the simulator's API key injected.
    pub fn paloalto(self, panos: &PanosSim) -> Self {
        self.plugin("paloalto", &paloalto_lines(panos, None, ""))
    }

    /// [`HostConfig::paloalto`] with more of the plugin's settings:
    /// `settings` continues its `config` table (`tag_preset = "panorama"`).
    pub fn paloalto_with(self, panos: &PanosSim, settings: &str) -> Self {
        self.plugin("paloalto", &paloalto_lines(panos, None, settings))
    }

    /// An instance `name` of `paloalto.wasm` feeding a PAN-OS simulator,
    /// configured as [`HostConfig::paloalto`] configures the plugin.
    pub fn paloalto_instance(self, name: &str, panos: &PanosSim) -> Self {
        self.plugin(name, &paloalto_lines(panos, Some("paloalto.wasm"), ""))
    }

    /// The Cisco FMC plugin (Go) for an FMC simulator: its base URL,
    /// allowed, with a session login that turns the simulator's user and
    /// password into the `X-auth-access-token` it wants. `settings`
    /// continues the plugin's `config` table.
    pub fn cisco_fmc(self, fmc: &FmcSim, settings: &str) -> Self {
        let url = fmc.base_url();
        let defaults = FmcConfig::default();
        let more = if settings.is_empty() {
            String::new()
        } else {
            format!(", {settings}")
        };
        self.plugin(
            "cisco-fmc",
            &[
                format!(r#"config = {{ fmc = "{url}"{more} }}"#),
                format!(r#"allow = ["{url}"]"#),
                format!(
                    r#"login = [{{ origin = "{url}", url = "{url}/api/fmc_platform/v1/auth/generatetoken", send = "basic", username = "{}", password = {{ value = "{}" }}, token_header = "X-auth-access-token", header = "X-auth-access-token" }}]"#,
                    defaults.user, defaults.password
                ),
            ],
        )
    }

    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// The configuration file's text.
    pub fn toml(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "instance = {:?}", self.instance);
        let _ = writeln!(t, "proxy_from_env = {}", self.proxy_from_env);
        let _ = writeln!(t, "[listener]\nlisten = {:?}", self.listen);
        for line in &self.listener {
            let _ = writeln!(t, "{line}");
        }
        let _ = writeln!(t, "[admin]\nlisten = {:?}", self.admin_listen);
        if let Some(token) = &self.admin_token {
            let _ = writeln!(t, "token = {{ value = {token:?} }}");
        }
        for line in &self.admin {
            let _ = writeln!(t, "{line}");
        }
        let _ = writeln!(t, "[storage]\ndata_dir = {:?}", path(&self.data_dir));
        for line in &self.storage {
            let _ = writeln!(t, "{line}");
        }
        let _ = writeln!(t, "[delivery]");
        for line in &self.delivery {
            let _ = writeln!(t, "{line}");
        }
        let _ = writeln!(
            t,
            "[plugins]\ndir = {:?}\nwatch = {}",
            path(&self.plugins_dir),
            self.watch
        );
        for line in &self.plugins_table {
            let _ = writeln!(t, "{line}");
        }
        for table in &self.plugins {
            t.push_str(table);
        }
        for c in &self.clusters {
            let _ = writeln!(
                t,
                "[[cluster]]\nname = {:?}\nprism_url = {:?}",
                c.name, c.prism_url
            );
            let _ = writeln!(
                t,
                "username = {PRISM_USER:?}\npassword = {{ value = {PRISM_PASSWORD:?} }}"
            );
            if let Some(p) = &c.webhook_password {
                let _ = writeln!(t, "webhook_password = {{ value = {p:?} }}");
            }
            let _ = writeln!(t, "reconcile_interval = {:?}", c.reconcile_interval);
            for line in &c.extra {
                let _ = writeln!(t, "{line}");
            }
        }
        t
    }

    /// The configuration, through the real loader.
    pub fn config(&self) -> Config {
        let text = self.toml();
        Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"))
    }
}

fn paloalto_lines(panos: &PanosSim, component: Option<&str>, settings: &str) -> Vec<String> {
    let fw = panos.base_url();
    let key = PanosConfig::default().api_key;
    let more = if settings.is_empty() {
        String::new()
    } else {
        format!(", {settings}")
    };
    let mut lines = vec![
        format!(r#"config = {{ firewall = "{fw}"{more} }}"#),
        format!(r#"allow = ["{fw}"]"#),
        format!(r#"inject = [{{ origin = "{fw}", header = "X-PAN-KEY", value = "{key}" }}]"#),
    ];
    lines.extend(component.map(|c| format!("component = {c:?}")));
    lines
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
