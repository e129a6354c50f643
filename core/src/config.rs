//! The configuration file: one typed struct, unknown keys rejected, every
//! default written once (here).
//!
//! Secrets are never written in the file itself in production: each names an
//! environment variable or a file (`value` exists for demos and tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::limits::{LimitOverrides, Limits};
use crate::policy::{
    InjectedHeader, Login, LoginSend, OriginRule, OutboundPolicy, TlsMode, TokenAt,
};
use crate::secret::{Secret, SecretSource};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// What a configuration that does not parse gets told: toml's message,
/// which quotes the line it failed at and the value it found there, unless
/// that line may hold a secret written in the file (a password, token or
/// key), which neither the terminal nor the journal
/// (`ExecStartPre=prismhook config check`) should show.
fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let full = e.to_string().trim_end().to_owned();
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return full;
    };
    let Some(before) = text.get(..at) else {
        return full;
    };
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = text[start..end].to_ascii_lowercase();
    let secret = ["password", "token", "secret", "value", "key", "credential"];
    if !secret.iter().any(|word| line.contains(word)) {
        return full;
    }
    // The message quotes what it found ("invalid type: string \"…\"").
    let mut message = String::new();
    let mut quoted = None;
    for c in e.message().trim_end().chars() {
        match quoted {
            Some(q) if c == q => {
                message.push('…');
                message.push(c);
                quoted = None;
            }
            Some(_) => {}
            None => {
                message.push(c);
                if c == '"' || c == '`' {
                    quoted = Some(c);
                }
            }
        }
    }
    format!(
        "TOML parse error at line {}, column {} (not shown: the line may hold a secret)\n{message}",
        before.matches('\n').count() + 1,
        at - start + 1
    )
}

/// The smallest `listener.max_body_bytes`.
pub const MIN_BODY_BYTES: usize = 64 << 10;
/// The longest `delivery.batch_window`.
pub const MAX_BATCH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// The largest `memory_mib`: what the runtime reserves a plugin's memories
/// for.
pub const MAX_MEMORY_MIB: u64 = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this host's webhooks in Prism, so it can find (and only touch)
    /// its own after a restart.
    #[serde(default = "defaults::instance")]
    pub instance: String,
    /// Reach `https://` targets (Prism, plugins' origins) through the proxy
    /// `HTTPS_PROXY` names, except `NO_PROXY` hosts. Off: the environment's
    /// proxies are ignored. `http://` targets never go through a proxy.
    #[serde(default)]
    pub proxy_from_env: bool,
    #[serde(default)]
    pub listener: ListenerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Per-plugin settings, by the name the plugin gives in `init`.
    #[serde(default)]
    pub plugin: BTreeMap<String, PluginConfig>,
    #[serde(default, rename = "cluster")]
    pub clusters: Vec<ClusterConfig>,
    /// Where the file was read from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
    /// The file as [`Config::load`] read it, as a table: what a later
    /// reading of the file is compared with. `None` for a configuration
    /// parsed from text.
    #[serde(skip)]
    pub file_table: Option<toml::Table>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// The base URL Prism should post to; defaults to `http(s)://<listen>`.
    /// Set it when prismhook sits behind NAT or a proxy.
    pub public_url: Option<Url>,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    pub tls: Option<TlsFiles>,
    /// Connections served at once. A peer that finds them all held has the
    /// oldest connection of the peer holding the most closed; more wait in
    /// the kernel's accept queue.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections one peer (an IPv4 address, an IPv6 /64) may hold at
    /// once; more from it are closed as they come, so that one host cannot
    /// take every slot of `max_connections`. 0: no such cap (behind a load
    /// balancer, every connection comes from its addresses).
    #[serde(default = "defaults::max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// A request's head must arrive within this, counted from when the
    /// connection is idle (so it also ends idle keep-alive connections).
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Buffered request head per connection, before authentication (HTTP/1
    /// answers 431 beyond it); at least 8192.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// An authenticated request's whole body must arrive within this (408).
    #[serde(default = "defaults::body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A TLS handshake must finish within this.
    #[serde(default = "defaults::tls_handshake_timeout", with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// A connection whose peer takes none of an answer for this long is
    /// closed (a peer that stops reading would otherwise hold its slot).
    #[serde(default = "defaults::write_stall_timeout", with = "humantime_serde")]
    pub write_stall_timeout: Duration,
}

/// hyper refuses read buffers below this size.
pub const MIN_HEADER_BYTES: usize = 8192;

/// Far beyond what one process keeps open (each connection is a file
/// descriptor and buffers), and below what a semaphore can count.
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// What one socket's peers may cost before a handler sees their request
/// (the host's `serve` enforces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    pub max_connections: usize,
    /// 0: no cap per peer.
    pub max_connections_per_peer: usize,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_header_bytes: usize,
    pub write_stall_timeout: Duration,
}

impl ListenerConfig {
    /// What the listener's peers may cost before a handler runs.
    pub fn limits(&self) -> ServeLimits {
        ServeLimits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            header_read_timeout: self.header_read_timeout,
            tls_handshake_timeout: self.tls_handshake_timeout,
            max_header_bytes: self.max_header_bytes,
            write_stall_timeout: self.write_stall_timeout,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
    /// Required when `listen` is not a loopback address.
    pub token: Option<SecretSource>,
    /// Host names the API may be reached by besides IP addresses and
    /// `localhost` (`Host` headers naming others are refused: DNS
    /// rebinding).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Connections served at once; the listener's timeouts and head limit
    /// apply here too.
    #[serde(default = "defaults::admin_max_connections")]
    pub max_connections: usize,
    /// Of them, what one peer (an IPv4 address, an IPv6 /64) may hold,
    /// so that one host cannot keep operators and the scraper out. 0: no
    /// such cap (behind a reverse proxy).
    #[serde(default = "defaults::admin_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Serve the API over TLS with this certificate and key. The CLI,
    /// reading the same file, trusts exactly this certificate (whatever its
    /// issuer and names), so a self-signed one will do. Beyond loopback the
    /// token otherwise crosses the network in the clear.
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    /// How long delivered events are kept (for replay) before pruning.
    #[serde(default = "defaults::retention", with = "humantime_serde")]
    pub retention: Duration,
    /// The same notification received again within this window is stored once.
    #[serde(default = "defaults::dedupe_window", with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// Above this many pending deliveries the listener answers 503.
    #[serde(default = "defaults::max_backlog")]
    pub max_backlog: u64,
    /// Above this ledger size (MiB) the listener answers 503; 0 = no limit. With JetStream, the
    /// stream's byte limit.
    #[serde(default)]
    pub max_ledger_mib: u64,
    /// Where the ledger lives: `redb` (a file in `data_dir`, one host) or `jetstream` (a NATS
    /// JetStream stream several hosts share; `[storage.jetstream]`).
    #[serde(default)]
    pub backend: StorageBackend,
    pub jetstream: Option<JetStreamConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Redb,
    Jetstream,
}

/// `[storage.jetstream]`: the NATS cluster the ledger's stream lives on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    /// Client URLs of any nodes of the cluster (`nats://host:4222`, `tls://…`).
    pub servers: Vec<String>,
    #[serde(default = "defaults::jetstream_stream")]
    pub stream: String,
    /// Copies of every message (1–5); unset: 3 when the cluster has three or more nodes, else 1.
    pub replicas: Option<usize>,
    /// Sign in with a user and password …
    pub user: Option<String>,
    pub password: Option<SecretSource>,
    /// … or a token …
    pub token: Option<SecretSource>,
    /// … or a `.creds` file (user JWT and nkey seed).
    pub credentials: Option<PathBuf>,
    /// A CA bundle (PEM) the servers' certificates are checked against; TLS is then required.
    pub ca_file: Option<PathBuf>,
    /// How long a write waits for JetStream's acknowledgement before the listener answers 503.
    #[serde(default = "defaults::jetstream_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
}

/// How the host signs in to NATS, with its secrets read.
#[derive(Debug, Clone, PartialEq)]
pub enum NatsSignIn {
    None,
    UserPassword { user: String, password: Secret },
    Token(Secret),
    Credentials(PathBuf),
}

impl JetStreamConfig {
    /// The sign-in, secrets read; the error is (key under `storage.jetstream`, reason).
    pub fn sign_in(&self) -> Result<NatsSignIn, (String, String)> {
        let secret = |key: &str, source: &SecretSource| {
            source
                .resolve()
                .map_err(|e| (key.to_owned(), e.to_string()))
        };
        match (&self.user, &self.password, &self.token, &self.credentials) {
            (None, None, None, None) => Ok(NatsSignIn::None),
            (Some(user), Some(password), None, None) => Ok(NatsSignIn::UserPassword {
                user: user.clone(),
                password: secret("password", password)?,
            }),
            (None, None, Some(token), None) => Ok(NatsSignIn::Token(secret("token", token)?)),
            (None, None, None, Some(path)) => Ok(NatsSignIn::Credentials(path.clone())),
            (Some(_), None, None, None) => {
                Err(("password".into(), "`user` needs a `password`".into()))
            }
            (None, Some(_), None, None) => Err(("user".into(), "`password` needs a `user`".into())),
            _ => Err((
                "user".into(),
                "choose one way to sign in: `user` and `password`, `token`, or `credentials`"
                    .into(),
            )),
        }
    }

    fn check(&self) -> Result<(), (String, String)> {
        if self.servers.is_empty() {
            return Err(("servers".into(), "give at least one server URL".into()));
        }
        for (i, server) in self.servers.iter().enumerate() {
            let url = Url::parse(server).map_err(|e| (format!("servers[{i}]"), e.to_string()))?;
            // Checked first: the messages below quote the URL.
            if !url.username().is_empty() || url.password().is_some() {
                return Err((
                    format!("servers[{i}]"),
                    "credentials do not belong in a URL: use `user` and `password`, `token` or \
                     `credentials`"
                        .into(),
                ));
            }
            if !matches!(url.scheme(), "nats" | "tls") || url.host_str().is_none() {
                return Err((
                    format!("servers[{i}]"),
                    format!("expected nats://host:port or tls://host:port, found {server:?}"),
                ));
            }
        }
        if self.stream.is_empty()
            || !self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err((
                "stream".into(),
                format!(
                    "expected letters, digits, `-` or `_`, found {:?}",
                    self.stream
                ),
            ));
        }
        if let Some(r) = self.replicas {
            if !(1..=5).contains(&r) {
                return Err(("replicas".into(), format!("expected 1 to 5, found {r}")));
            }
        }
        if self.ack_timeout.is_zero() {
            return Err(("ack_timeout".into(), "must be more than zero".into()));
        }
        self.sign_in().map(drop)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Most events in one `handle` call.
    #[serde(default = "defaults::batch_max")]
    pub batch_max: usize,
    /// How long to gather a batch once the first event is due.
    #[serde(default = "defaults::batch_window", with = "humantime_serde")]
    pub batch_window: Duration,
    #[serde(default = "defaults::retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(default = "defaults::retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Attempts before an event goes to the dead letters.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Age after which a still-failing event goes to the dead letters.
    #[serde(default = "defaults::max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Failed calls (traps, timeouts, memory overruns) in a row after which
    /// a plugin is quarantined: its deliveries pause, its events stay queued.
    #[serde(default = "defaults::quarantine_after")]
    pub quarantine_after: u32,
    /// The first quarantine pause; it doubles with each further failure.
    #[serde(default = "defaults::quarantine_pause", with = "humantime_serde")]
    pub quarantine_pause: Duration,
    /// How long the queued deliveries of a plugin whose file was removed
    /// wait for it to come back before they move to the dead letters;
    /// 0 = forever.
    #[serde(default = "defaults::removed_plugin_expiry", with = "humantime_serde")]
    pub removed_plugin_expiry: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// `.wasm` components (and optional `<name>.toml` settings) to load.
    #[serde(default = "defaults::plugins_dir")]
    pub dir: PathBuf,
    /// Reload plugins when files in `dir` change.
    #[serde(default = "defaults::yes")]
    pub watch: bool,
    /// Serve a new file with Winch's quickly compiled code while Cranelift
    /// compiles it in the background; false = wait for Cranelift.
    #[serde(default = "defaults::yes")]
    pub tiered: bool,
    /// Larger component files in `dir` are refused unread.
    #[serde(default = "defaults::max_file_mib")]
    pub max_file_mib: u64,
    /// Soft limit on `<data_dir>/cache`, the compiled components: beyond
    /// it the least recently used go. 0 = no limit.
    #[serde(default = "defaults::cache_max_mib")]
    pub cache_max_mib: u64,
    /// Snapshot each plugin after its load-time `init` (when `init` called
    /// no import) so that calls skip it; false = `init` in every call.
    #[serde(default = "defaults::yes")]
    pub pre_initialise: bool,
    /// Limits for every plugin, each overridable per plugin.
    #[serde(default)]
    pub limits: LimitOverrides,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Runs this table as an *instance* of a component file in the plugins
    /// directory (`paloalto.wasm`), under the table's name: one component
    /// can then feed several firewalls, each instance with its own
    /// settings, kv, deliveries and dead letters. A file some instance
    /// names is loaded only as its instances.
    pub component: Option<String>,
    /// Handed to the plugin's `init` as a JSON object.
    #[serde(default)]
    pub config: toml::Table,
    /// Origins the plugin may reach (`https://fw1.example.com`,
    /// `https://*.example.com`, `http://10.0.0.0/8:*`). Empty = none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Headers the host adds for an origin; the plugin never sees them.
    #[serde(default)]
    pub inject: Vec<InjectConfig>,
    /// Session logins: for each origin listed, the host signs in with a
    /// username and password and injects the token it gets.
    #[serde(default)]
    pub login: Vec<LoginConfig>,
    /// Secrets this plugin's `<name>.toml` in the plugins directory may
    /// have injected (`grant = "<key>"`), each for the origins listed only.
    /// Only the main configuration grants: whoever can write the plugins
    /// directory gets these and no other secret of the host.
    #[serde(default)]
    pub grants: BTreeMap<String, Grant>,
    /// How the certificates of the plugin's `https://` origins are checked:
    /// the public roots by default; a firewall's self-signed certificate
    /// needs `pinned_cert`, a private CA `ca_file`. Main configuration only.
    pub tls: Option<PluginTls>,
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Refuse the plugin file unless its sha256 is this (hex).
    pub sha256: Option<String>,
    /// Deliver only the newest of several queued state events of one VM.
    #[serde(default)]
    pub coalesce: bool,
    /// Set to false to keep a plugin file in the directory but not load it.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
}

/// `[[plugin.<name>.login]]`: sign in to `origin` and inject the token.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    /// The origin whose requests carry the token (as in `allow`).
    pub origin: String,
    /// Where to sign in: a URL of `origin`, so the password goes nowhere
    /// else.
    pub url: String,
    /// `json` (default), `form` or `basic`.
    #[serde(default)]
    pub send: LoginSend,
    pub username: String,
    pub password: SecretSource,
    /// The body's names for the username and password.
    #[serde(default = "defaults::username_field")]
    pub username_field: String,
    #[serde(default = "defaults::password_field")]
    pub password_field: String,
    /// Further fields of the body, such as `loginProviderName = "tmos"`.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Where the token is in the answer: exactly one of these.
    pub token_pointer: Option<String>,
    pub token_header: Option<String>,
    pub token_xml: Option<String>,
    /// The header the token goes in, after `prefix` (`Bearer `).
    pub header: String,
    #[serde(default)]
    pub prefix: String,
    /// Sign in again after this long; without it, a token serves until the
    /// origin answers 401 or 403.
    #[serde(default, with = "humantime_serde")]
    pub lifetime: Option<Duration>,
}

impl LoginConfig {
    /// Everything but the password, checked: (key, reason) on error.
    fn resolve(&self, password: Secret) -> Result<Login, (String, String)> {
        let origin =
            OriginRule::parse(&self.origin).map_err(|e| ("origin".into(), e.to_string()))?;
        // One token per login: a pattern would hand it to every host the
        // plugin is allowed to reach under it (a settings file may allow more).
        if !origin.is_exact() {
            return Err((
                "origin".into(),
                format!(
                    "`{}` is a pattern; a login's origin is one host and port, as its token goes \
                     to every host its origin matches",
                    self.origin
                ),
            ));
        }
        let url = Url::parse(&self.url).map_err(|e| ("url".into(), e.to_string()))?;
        if !origin.matches(&url) {
            return Err((
                "url".into(),
                format!(
                    "the login URL must be on `{}`, the origin its token is for",
                    self.origin
                ),
            ));
        }
        let header = |name: &str, key: &str| {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (key.to_owned(), "not a valid header name".to_owned()))
        };
        let token = match (&self.token_pointer, &self.token_header, &self.token_xml) {
            (Some(p), None, None) if p.starts_with('/') => TokenAt::JsonPointer(p.clone()),
            (Some(_), None, None) => {
                return Err((
                    "token_pointer".into(),
                    "a JSON pointer starts with `/` (`/token/token`)".into(),
                ))
            }
            (None, Some(h), None) => TokenAt::Header(header(h, "token_header")?),
            (None, None, Some(x)) => {
                let path: Vec<String> = x
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if path.is_empty() {
                    return Err((
                        "token_xml".into(),
                        "an element path such as `/response/result/key`".into(),
                    ));
                }
                TokenAt::XmlPath(path)
            }
            _ => {
                return Err((
                    "token_pointer".into(),
                    "give exactly one of `token_pointer`, `token_header` or `token_xml`".into(),
                ))
            }
        };
        Ok(Login {
            origin,
            url,
            send: self.send,
            username: self.username.clone(),
            password,
            username_field: self.username_field.clone(),
            password_field: self.password_field.clone(),
            fields: self
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            token,
            header: header(&self.header, "header")?,
            prefix: self.prefix.clone(),
            lifetime: self.lifetime,
        })
    }
}

/// `[plugin.<name>] tls`: exactly one of the two.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginTls {
    /// Trust servers whose chain ends at a CA in this PEM (or DER) file,
    /// and no other CA.
    pub ca_file: Option<PathBuf>,
    /// Trust exactly this certificate (PEM or DER), whatever its issuer,
    /// names and dates.
    pub pinned_cert: Option<PathBuf>,
}

impl PluginTls {
    fn mode(&self) -> Result<TlsMode, &'static str> {
        match (&self.ca_file, &self.pinned_cert) {
            (Some(ca), None) => Ok(TlsMode::CaFile(ca.clone())),
            (None, Some(pin)) => Ok(TlsMode::PinnedCert(pin.clone())),
            _ => Err("give exactly one of `ca_file` or `pinned_cert`"),
        }
    }
}

/// What a plugin is loaded with, resolved from its [`PluginConfig`] (and
/// settings file): secrets read, origins parsed, limits filled in.
#[derive(Debug, Clone, Default)]
pub struct PluginSettings {
    /// The plugin's own configuration, handed to `init` as JSON.
    pub config: serde_json::Value,
    pub limits: Limits,
    pub policy: OutboundPolicy,
    /// How its `https://` origins' certificates are checked.
    pub tls: TlsMode,
    /// Refuse the file unless its sha256 (hex) is this.
    pub sha256: Option<String>,
}

/// A header the host adds to a plugin's requests to one origin. The value
/// is a secret read by the host (`env`, `file`, `value`), or in a plugin's
/// settings file a secret the main configuration grants (`grant`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    pub origin: String,
    pub header: String,
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    pub value: Option<String>,
    pub grant: Option<String>,
}

impl InjectConfig {
    fn source(&self) -> SecretSource {
        SecretSource {
            env: self.env.clone(),
            file: self.file.clone(),
            value: self.value.clone(),
        }
    }
}

/// A secret the main configuration lets a plugin's settings file use, and
/// where it may be sent.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    pub value: Option<String>,
    /// Origins (as in `allow`) an inject of this secret may name.
    pub origins: Vec<String>,
}

impl Grant {
    fn source(&self) -> SecretSource {
        SecretSource {
            env: self.env.clone(),
            file: self.file.clone(),
            value: self.value.clone(),
        }
    }
}

/// Settings from a plugin's `<name>.toml`, held to what the main
/// configuration's `[plugin.<name>]` grants: every injected secret must be
/// a `grant` of the main configuration, for one of the origins it is
/// granted for. Returns the settings with each grant's source filled in.
///
/// What only the operator decides holds whatever the file says: the main
/// configuration's logins, `tls` and `sha256` pin stay (its grants are
/// spent above, on the injects that name them), a plugin it disables stays
/// disabled, and its limits (`defaults` under its own
/// `limits`) are ceilings the file may lower a limit under, not raise.
pub fn confine_settings_file(
    mut settings: PluginConfig,
    main: Option<&PluginConfig>,
    name: &str,
    defaults: &Limits,
) -> Result<PluginConfig, (String, String)> {
    if !settings.grants.is_empty() {
        return Err((
            "grants".into(),
            "only the main configuration grants secrets".into(),
        ));
    }
    if !settings.login.is_empty() {
        // A login carries a password: the main configuration's to give.
        return Err((
            "login".into(),
            "only the main configuration configures logins (they carry a password)".into(),
        ));
    }
    if settings.tls.is_some() {
        // Whom to trust is the operator's decision, as are the secrets.
        return Err((
            "tls".into(),
            "only the main configuration says which certificates a plugin trusts".into(),
        ));
    }
    let empty = BTreeMap::new();
    let grants = main.map_or(&empty, |m| &m.grants);
    for (j, inj) in settings.inject.iter_mut().enumerate() {
        if inj.env.is_some() || inj.file.is_some() || inj.value.is_some() {
            return Err((
                format!("inject[{j}]"),
                format!(
                    "a settings file in the plugins directory cannot name secrets itself; \
                     use `grant = \"…\"` with a secret that `[plugin.{name}.grants]` in the \
                     main configuration grants"
                ),
            ));
        }
        fill_grant(inj, grants, name).map_err(|(k, m)| (format!("inject[{j}].{k}"), m))?;
    }
    let operator = main.cloned().unwrap_or_default();
    if let (Some(pin), Some(other)) = (&operator.sha256, &settings.sha256) {
        if !pin.eq_ignore_ascii_case(other) {
            return Err((
                "sha256".into(),
                format!("the main configuration pins `{name}` to {pin}"),
            ));
        }
    }
    let limits = operator.limits.overlaid_with(&settings.limits);
    let ceiling = defaults.with(&operator.limits);
    if let Some((limit, wanted, allowed)) = defaults.with(&limits).first_above(&ceiling) {
        return Err((
            format!("limits.{limit}"),
            format!(
                "{wanted} is above the {allowed} the main configuration allows `{name}`; \
                 only `[plugin.{name}] limits` there may raise it"
            ),
        ));
    }
    Ok(PluginConfig {
        limits,
        login: operator.login,
        tls: operator.tls,
        sha256: operator.sha256.or(settings.sha256),
        enabled: operator.enabled && settings.enabled,
        ..settings
    })
}

/// Replaces an inject's `grant` by the granted secret's source, if the
/// grant exists and covers the inject's origin.
fn fill_grant(
    inj: &mut InjectConfig,
    grants: &BTreeMap<String, Grant>,
    plugin: &str,
) -> Result<(), (String, String)> {
    let Some(name) = inj.grant.take() else {
        return Ok(());
    };
    let Some(grant) = grants.get(&name) else {
        return Err((
            "grant".into(),
            format!("`{name}` is not granted to `{plugin}` by the main configuration"),
        ));
    };
    let wanted = OriginRule::parse(&inj.origin).map_err(|e| ("origin".into(), e.to_string()))?;
    let covered = grant
        .origins
        .iter()
        .any(|o| OriginRule::parse(o).is_ok_and(|rule| rule == wanted));
    if !covered {
        return Err((
            "origin".into(),
            format!(
                "`{name}` is granted for {} only, not for `{}`",
                grant.origins.join(", "),
                inj.origin
            ),
        ));
    }
    let source = grant.source();
    (inj.env, inj.file, inj.value) = (source.env, source.file, source.value);
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Short name; used in the callback path and recorded with every event.
    pub name: String,
    /// `https://prism.example.com:9440`.
    pub prism_url: Url,
    pub username: String,
    pub password: SecretSource,
    #[serde(default)]
    pub tls: ClusterTls,
    /// Basic-auth user Prism must present on every notification.
    #[serde(default = "defaults::webhook_user")]
    pub webhook_user: String,
    /// Its password; generated once and kept in the data directory when
    /// absent.
    pub webhook_password: Option<SecretSource>,
    /// How often to reconcile the plugins with Prism's inventory; 0 = only
    /// at start.
    #[serde(default = "defaults::reconcile_interval", with = "humantime_serde")]
    pub reconcile_interval: Duration,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// Trust this CA bundle (PEM) instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Accept exactly this certificate (PEM), self-signed or not.
    pub pinned_cert: Option<PathBuf>,
    /// Skip verification. Warned about at start; for labs only.
    #[serde(default)]
    pub insecure: bool,
}

mod defaults {
    use super::*;

    pub fn username_field() -> String {
        "username".into()
    }
    pub fn password_field() -> String {
        "password".into()
    }
    pub fn instance() -> String {
        "prismhook".into()
    }
    pub fn listen() -> SocketAddr {
        "0.0.0.0:8080".parse().unwrap()
    }
    pub fn admin_listen() -> SocketAddr {
        "127.0.0.1:9100".parse().unwrap()
    }
    pub fn max_body_bytes() -> usize {
        1 << 20
    }
    pub fn max_connections() -> usize {
        512
    }
    pub fn max_connections_per_peer() -> usize {
        128
    }
    pub fn admin_max_connections() -> usize {
        64
    }
    /// A browser on the status page opens six, a scraper one, the CLI one
    /// at a time.
    pub fn admin_max_connections_per_peer() -> usize {
        16
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_header_bytes() -> usize {
        16 << 10
    }
    pub fn body_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn tls_handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn write_stall_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn data_dir() -> PathBuf {
        "data".into()
    }
    pub fn retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn dedupe_window() -> Duration {
        Duration::from_secs(600)
    }
    pub fn jetstream_stream() -> String {
        "PRISMHOOK".into()
    }
    pub fn jetstream_ack_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_backlog() -> u64 {
        1_000_000
    }
    pub fn batch_max() -> usize {
        256
    }
    pub fn batch_window() -> Duration {
        Duration::from_millis(5)
    }
    pub fn retry_initial() -> Duration {
        Duration::from_secs(1)
    }
    pub fn retry_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_attempts() -> u32 {
        20
    }
    pub fn max_age() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn quarantine_after() -> u32 {
        5
    }
    pub fn quarantine_pause() -> Duration {
        Duration::from_secs(5)
    }
    pub fn removed_plugin_expiry() -> Duration {
        Duration::from_secs(7 * 24 * 3600)
    }
    pub fn max_file_mib() -> u64 {
        256
    }
    pub fn cache_max_mib() -> u64 {
        1024
    }
    pub fn plugins_dir() -> PathBuf {
        "plugins".into()
    }
    pub fn webhook_user() -> String {
        "prismhook".into()
    }
    pub fn reconcile_interval() -> Duration {
        Duration::from_secs(600)
    }
    pub fn yes() -> bool {
        true
    }
}

/// Sections left out of the file take their defaults, exactly as if they
/// were written empty.
macro_rules! default_from_empty_table {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field of this section has a default")
            }
        }
    )*};
}
// PluginConfig too: a derived Default would leave `enabled` false, and a
// plugin file with no settings of its own would be silently disabled.
default_from_empty_table!(
    ListenerConfig,
    AdminConfig,
    StorageConfig,
    DeliveryConfig,
    PluginsConfig,
    PluginConfig
);

/// The environment variables [`Config::load`] reads after the file.
///
/// Secrets are pointed at their variable rather than copied, so the value
/// is read where every secret is read and never sits in the config struct.
/// A cluster's name is written upper case with `-` as `_`.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("PRISMHOOK_LISTEN", "listener.listen"),
    ("PRISMHOOK_ADMIN_LISTEN", "admin.listen"),
    ("PRISMHOOK_ADMIN_TOKEN", "admin.token (a secret)"),
    ("PRISMHOOK_DATA_DIR", "storage.data_dir"),
    ("PRISMHOOK_PLUGINS_DIR", "plugins.dir"),
    (
        "PRISMHOOK_CLUSTER_<NAME>_PASSWORD",
        "the cluster's Prism password (a secret)",
    ),
    (
        "PRISMHOOK_CLUSTER_<NAME>_WEBHOOK_PASSWORD",
        "the cluster's webhook password (a secret)",
    ),
];

impl Config {
    /// Reads `path`, applies the `PRISMHOOK_…` environment overrides
    /// ([`ENV_OVERRIDES`]) and checks the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_adjusted(path, |_| {})
    }

    /// [`Config::load`], with `adjust` (the command line's flags, which win
    /// over the environment and the file) applied before the checks, so
    /// that they judge what runs: a flag can make a file's configuration
    /// valid, or invalid.
    pub fn load_adjusted(
        path: &Path,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut config = Config::parse_unchecked(&text, path)?;
        config.apply_env(std::env::vars())?;
        adjust(&mut config);
        config.validate()?;
        config.file_table = text.parse().ok();
        Ok(config)
    }

    /// [`Config::parse`], then the overrides among `vars`.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::parse_unchecked(text, path)?;
        config.apply_env(vars)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let from_env = |var: &str| SecretSource {
            env: Some(var.to_owned()),
            file: None,
            value: None,
        };
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix("PRISMHOOK_") else {
                continue;
            };
            let bad = |expected: &str| ConfigError::Invalid {
                file: self.source.clone(),
                key: format!("environment variable {var}"),
                message: format!("expected {expected}, found {value:?}"),
            };
            match rest {
                "LISTEN" => {
                    self.listener.listen = value
                        .parse()
                        .map_err(|_| bad("an address like 0.0.0.0:8080"))?
                }
                "ADMIN_LISTEN" => {
                    self.admin.listen = value
                        .parse()
                        .map_err(|_| bad("an address like 127.0.0.1:9100"))?
                }
                "ADMIN_TOKEN" => self.admin.token = Some(from_env(&var)),
                "DATA_DIR" => self.storage.data_dir = value.into(),
                "PLUGINS_DIR" => self.plugins.dir = value.into(),
                _ => {
                    let Some(rest) = rest.strip_prefix("CLUSTER_") else {
                        continue;
                    };
                    // Every reading, not the first: with clusters `prod` and
                    // `prod_webhook`, PRISMHOOK_CLUSTER_PROD_WEBHOOK_PASSWORD
                    // is the one's webhook password and the other's password.
                    let readings: Vec<(usize, bool)> = self
                        .clusters
                        .iter()
                        .enumerate()
                        .filter_map(|(i, c)| {
                            let which = rest.strip_prefix(env_name(&c.name).as_str())?;
                            match which.strip_prefix('_')? {
                                "PASSWORD" => Some((i, true)),
                                "WEBHOOK_PASSWORD" => Some((i, false)),
                                _ => None,
                            }
                        })
                        .collect();
                    match readings[..] {
                        [(i, true)] => self.clusters[i].password = from_env(&var),
                        [(i, false)] => self.clusters[i].webhook_password = Some(from_env(&var)),
                        [_, _, ..] => {
                            let named: Vec<String> = readings
                                .iter()
                                .map(|&(i, password)| {
                                    let what = if password {
                                        "password"
                                    } else {
                                        "webhook password"
                                    };
                                    format!("`{}`'s {what}", self.clusters[i].name)
                                })
                                .collect();
                            return Err(self.invalid(
                                format!("environment variable {var}"),
                                format!(
                                    "could be {}; rename a cluster so that each variable names one",
                                    named.join(" or ")
                                ),
                            ));
                        }
                        [] => {
                            // A typo here would silently leave the file's
                            // secret in force.
                            return Err(self.invalid(
                                format!("environment variable {var}"),
                                "names no configured cluster: expected \
                                 PRISMHOOK_CLUSTER_<NAME>_PASSWORD or _WEBHOOK_PASSWORD",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses and checks a configuration; `path` is only used in messages.
    /// Relative paths in it stay relative to the working directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config = Config::parse_unchecked(text, path)?;
        config.validate()?;
        Ok(config)
    }

    fn parse_unchecked(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.to_owned(),
            message: parse_message(&e, text),
        })?;
        config.source = path.to_owned();
        Ok(config)
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match (self.storage.backend, &self.storage.jetstream) {
            (StorageBackend::Jetstream, Some(js)) => js
                .check()
                .map_err(|(k, m)| self.invalid(format!("storage.jetstream.{k}"), m))?,
            (StorageBackend::Jetstream, None) => {
                return Err(self.invalid(
                    "storage.jetstream",
                    "`backend = \"jetstream\"` needs a [storage.jetstream] table with `servers`",
                ))
            }
            (StorageBackend::Redb, Some(_)) => return Err(self.invalid(
                "storage.backend",
                "[storage.jetstream] is set but the backend is redb: add `backend = \"jetstream\"`",
            )),
            (StorageBackend::Redb, None) => {}
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(self.invalid(
                    format!("cluster[{i}].name"),
                    format!("expected letters, digits, `-` or `_`, found {:?}", c.name),
                ));
            }
            if !names.insert(&c.name) {
                return Err(self.invalid(
                    format!("cluster[{i}].name"),
                    format!("`{}` is used twice", c.name),
                ));
            }
            if let Some(other) = self.clusters[..i]
                .iter()
                .find(|o| env_name(&o.name) == env_name(&c.name))
            {
                return Err(self.invalid(
                    format!("cluster[{i}].name"),
                    format!(
                        "`{}` and `{}` would read the same environment variables \
                         (PRISMHOOK_CLUSTER_{}_*)",
                        other.name,
                        c.name,
                        env_name(&c.name)
                    ),
                ));
            }
            if !matches!(c.prism_url.scheme(), "http" | "https") {
                return Err(
                    self.invalid(format!("cluster[{i}].prism_url"), "expected an http(s) URL")
                );
            }
            let pins = [
                c.tls.ca_file.is_some(),
                c.tls.pinned_cert.is_some(),
                c.tls.insecure,
            ];
            if pins.iter().filter(|b| **b).count() > 1 {
                return Err(self.invalid(
                    format!("cluster[{i}].tls"),
                    "choose one of `ca_file`, `pinned_cert` or `insecure`",
                ));
            }
        }
        for (name, p) in &self.plugin {
            if let Some(component) = &p.component {
                if !valid_plugin_name(name) {
                    return Err(self.invalid(
                        format!("plugin.{name}"),
                        "an instance's name is lower case letters, digits and `-`, at most 64",
                    ));
                }
                check_component(component)
                    .map_err(|m| self.invalid(format!("plugin.{name}.component"), m))?;
            }
            for (j, origin) in p.allow.iter().enumerate() {
                OriginRule::parse(origin).map_err(|e| {
                    self.invalid(format!("plugin.{name}.allow[{j}]"), e.to_string())
                })?;
            }
            for (j, inj) in p.inject.iter().enumerate() {
                OriginRule::parse(&inj.origin).map_err(|e| {
                    self.invalid(format!("plugin.{name}.inject[{j}].origin"), e.to_string())
                })?;
                http::HeaderName::from_bytes(inj.header.as_bytes()).map_err(|_| {
                    self.invalid(
                        format!("plugin.{name}.inject[{j}].header"),
                        "not a valid header name",
                    )
                })?;
            }
            for (j, login) in p.login.iter().enumerate() {
                // The password is read at load, like every plugin secret.
                login
                    .resolve(Secret::new("-"))
                    .map_err(|(k, m)| self.invalid(format!("plugin.{name}.login[{j}].{k}"), m))?;
            }
            if let Some(tls) = &p.tls {
                tls.mode()
                    .map_err(|m| self.invalid(format!("plugin.{name}.tls"), m))?;
            }
            for (g, grant) in &p.grants {
                let source = grant.source();
                let given = [
                    source.env.is_some(),
                    source.file.is_some(),
                    source.value.is_some(),
                ];
                if given.iter().filter(|b| **b).count() != 1 {
                    return Err(self.invalid(
                        format!("plugin.{name}.grants.{g}"),
                        "give exactly one of `env`, `file` or `value`",
                    ));
                }
                if grant.origins.is_empty() {
                    return Err(self.invalid(
                        format!("plugin.{name}.grants.{g}.origins"),
                        "name at least one origin the secret may be sent to",
                    ));
                }
                for (k, origin) in grant.origins.iter().enumerate() {
                    OriginRule::parse(origin).map_err(|e| {
                        self.invalid(
                            format!("plugin.{name}.grants.{g}.origins[{k}]"),
                            e.to_string(),
                        )
                    })?;
                }
            }
            if let Some(sha) = &p.sha256 {
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(
                        self.invalid(format!("plugin.{name}.sha256"), "expected 64 hex digits")
                    );
                }
            }
        }
        self.check_delivery()?;
        self.check_limits("plugins.limits", &self.plugins.limits)?;
        for (name, p) in &self.plugin {
            self.check_limits(&format!("plugin.{name}.limits"), &p.limits)?;
        }
        if self.listener.max_body_bytes < MIN_BODY_BYTES {
            return Err(self.invalid(
                "listener.max_body_bytes",
                format!(
                    "must be at least {MIN_BODY_BYTES}: a VM's notification can take tens of \
                     KiB, and one over the limit is refused (413)"
                ),
            ));
        }
        let l = &self.listener;
        if l.max_header_bytes < MIN_HEADER_BYTES {
            return Err(self.invalid(
                "listener.max_header_bytes",
                format!("must be at least {}", MIN_HEADER_BYTES),
            ));
        }
        for (key, n) in [
            ("listener.max_connections", l.max_connections),
            ("admin.max_connections", self.admin.max_connections),
        ] {
            if n == 0 {
                return Err(self.invalid(key, "must be at least 1"));
            }
            if n > MAX_CONNECTIONS {
                return Err(self.invalid(key, format!("must be at most {MAX_CONNECTIONS}")));
            }
        }
        for (key, d) in [
            ("listener.header_read_timeout", l.header_read_timeout),
            ("listener.body_read_timeout", l.body_read_timeout),
            ("listener.tls_handshake_timeout", l.tls_handshake_timeout),
            ("listener.write_stall_timeout", l.write_stall_timeout),
        ] {
            if d.is_zero() {
                return Err(self.invalid(key, "must be longer than zero"));
            }
        }
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(self.invalid(
                "admin.token",
                "required when the admin API listens beyond loopback",
            ));
        }
        if !self.clusters.is_empty()
            && self.listener.public_url.is_none()
            && self.listener.listen.ip().is_unspecified()
        {
            return Err(self.invalid(
                "listener.public_url",
                format!(
                    "required when the listener listens on {} (every address): the webhook \
                     registered with Prism needs the URL Prism reaches this host at",
                    self.listener.listen
                ),
            ));
        }
        Ok(())
    }

    /// `[delivery]`: waits and counts that do what they say.
    fn check_delivery(&self) -> Result<(), ConfigError> {
        let d = &self.delivery;
        let zero = |key: &str, is_zero: bool, why: &str| {
            if is_zero {
                Err(self.invalid(format!("delivery.{key}"), why.to_owned()))
            } else {
                Ok(())
            }
        };
        zero("batch_max", d.batch_max == 0, "must be at least 1")?;
        zero(
            "retry_initial",
            d.retry_initial.is_zero(),
            "must be longer than zero: retries at once would spend every attempt of an outage in milliseconds",
        )?;
        zero("max_attempts", d.max_attempts == 0, "must be at least 1")?;
        zero(
            "max_age",
            d.max_age.is_zero(),
            "must be longer than zero: every first failure would be a dead letter",
        )?;
        zero(
            "quarantine_after",
            d.quarantine_after == 0,
            "must be at least 1",
        )?;
        zero(
            "quarantine_pause",
            d.quarantine_pause.is_zero(),
            "must be longer than zero",
        )?;
        if d.retry_max < d.retry_initial {
            return Err(self.invalid(
                "delivery.retry_max",
                format!(
                    "{:?} is shorter than retry_initial ({:?})",
                    d.retry_max, d.retry_initial
                ),
            ));
        }
        if d.batch_window > MAX_BATCH_WINDOW {
            return Err(self.invalid(
                "delivery.batch_window",
                format!(
                    "must be at most {MAX_BATCH_WINDOW:?}: every batch short of batch_max waits \
                     this long"
                ),
            ));
        }
        Ok(())
    }

    /// A table of plugin limits: what a plugin can run within.
    fn check_limits(&self, table: &str, l: &LimitOverrides) -> Result<(), ConfigError> {
        if let Some(mib) = l.memory_mib {
            if !(1..=MAX_MEMORY_MIB).contains(&mib) {
                return Err(self.invalid(
                    format!("{table}.memory_mib"),
                    format!("must be from 1 to {MAX_MEMORY_MIB} (the most a plugin's memories may hold)"),
                ));
            }
        }
        if l.deadline_ms == Some(0) {
            return Err(self.invalid(format!("{table}.deadline_ms"), "must be at least 1"));
        }
        Ok(())
    }

    /// The URL Prism posts a cluster's notifications to.
    pub fn callback_url(&self, cluster: &str) -> String {
        let base = match &self.listener.public_url {
            Some(u) => u.as_str().trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.listener.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", self.listener.listen)
            }
        };
        format!("{base}{}", callback_path(cluster))
    }

    /// The limits every plugin gets unless its own settings say otherwise.
    pub fn default_limits(&self) -> Limits {
        Limits::default().with(&self.plugins.limits)
    }

    /// Resolves a plugin's settings: its JSON config, limits and outbound
    /// policy with secrets read. `name` is the plugin's file stem.
    pub fn plugin_settings(
        &self,
        name: &str,
        extra: Option<&PluginConfig>,
    ) -> Result<PluginSettings, ConfigError> {
        let empty = PluginConfig::default();
        let p = extra.or_else(|| self.plugin.get(name)).unwrap_or(&empty);
        resolve_plugin(p, name, self.default_limits())
            .map_err(|(key, message)| self.invalid(key, message))
    }
}

/// A plugin's name as it appears in the registry, kv, metrics and URLs:
/// lower case letters, digits and `-`, at most 64 bytes.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An instance's `component`: the name of a `.wasm` file in the plugins
/// directory, never a path (instances cannot reach outside it).
pub fn check_component(component: &str) -> Result<(), String> {
    let stem = component.strip_suffix(".wasm").unwrap_or_default();
    if stem.is_empty()
        || stem.starts_with('.')
        || !stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "expected the name of a `.wasm` file in the plugins directory, such as \
             \"paloalto.wasm\", found {component:?}"
        ));
    }
    Ok(())
}

/// The listener path for one cluster's notifications.
pub fn callback_path(cluster: &str) -> String {
    format!("/listener/callback/{cluster}")
}

/// A plugin's settings as it will be loaded: `p` (its `[plugin.<name>]` or
/// settings file) with secrets read, origins parsed and `defaults` filled
/// in. The error is (key, reason).
pub fn resolve_plugin(
    p: &PluginConfig,
    name: &str,
    defaults: Limits,
) -> Result<PluginSettings, (String, String)> {
    let key = |k: String| format!("plugin.{name}.{k}");
    let tls = match &p.tls {
        Some(tls) => tls.mode().map_err(|m| (key("tls".into()), m.to_owned()))?,
        None => TlsMode::System,
    };
    let allow = p
        .allow
        .iter()
        .enumerate()
        .map(|(j, o)| OriginRule::parse(o).map_err(|e| (key(format!("allow[{j}]")), e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let inject = p
        .inject
        .iter()
        .enumerate()
        .map(|(j, inj)| {
            let origin = OriginRule::parse(&inj.origin)
                .map_err(|e| (key(format!("inject[{j}].origin")), e.to_string()))?;
            let header = http::HeaderName::from_bytes(inj.header.as_bytes()).map_err(|_| {
                (
                    key(format!("inject[{j}].header")),
                    "not a valid header name".to_owned(),
                )
            })?;
            let mut inj = inj.clone();
            fill_grant(&mut inj, &p.grants, name)
                .map_err(|(k, m)| (key(format!("inject[{j}].{k}")), m))?;
            let value: Secret = inj
                .source()
                .resolve()
                .map_err(|e| (key(format!("inject[{j}]")), e.to_string()))?;
            Ok(InjectedHeader {
                origin,
                name: header,
                value,
            })
        })
        .collect::<Result<Vec<_>, (String, String)>>()?;
    let logins = p
        .login
        .iter()
        .enumerate()
        .map(|(j, login)| {
            let password = login
                .password
                .resolve()
                .map_err(|e| (key(format!("login[{j}].password")), e.to_string()))?;
            login
                .resolve(password)
                .map_err(|(k, m)| (key(format!("login[{j}].{k}")), m))
        })
        .collect::<Result<Vec<_>, (String, String)>>()?;
    let config =
        serde_json::to_value(&p.config).map_err(|e| (key("config".into()), e.to_string()))?;
    Ok(PluginSettings {
        config,
        limits: defaults.with(&p.limits),
        policy: OutboundPolicy::new(allow, inject).with_logins(logins),
        tls,
        sha256: p.sha256.clone(),
    })
}

/// A cluster's name as its environment variables spell it:
/// `PRISMHOOK_CLUSTER_<this>_PASSWORD`.
fn env_name(cluster: &str) -> String {
    cluster.to_ascii_uppercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("prismhook.toml"))
    }

    #[test]
    fn an_empty_file_is_a_valid_configuration_with_every_default() {
        let c = parse("").unwrap();
        assert_eq!(c.listener.listen, defaults::listen());
        assert_eq!(c.listener.max_body_bytes, 1 << 20);
        assert_eq!(c.delivery.batch_max, 256);
        assert_eq!(c.default_limits(), Limits::default());
        assert_eq!(c.plugins.cache_max_mib, 1024);
        assert!(c.plugins.tiered && c.plugins.pre_initialise);
    }

    #[test]
    fn the_example_configurations_are_valid() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for name in ["prismhook.toml", "local.toml", "fleet.toml"] {
            let c = Config::load(&examples.join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.clusters.is_empty(), "{name}");
        }
    }

    #[test]
    fn a_login_sends_its_password_to_its_own_origin_only_and_reads_one_token() {
        let login = |extra: &str| {
            let text = format!(
                "[[plugin.f5.login]]\norigin = \"https://lb.example.com\"\nusername = \"u\"\n\
                 password = {{ value = \"p\" }}\nheader = \"X-F5-Auth-Token\"\n{extra}"
            );
            parse(&text).map(|_| ()).map_err(|e| e.to_string())
        };
        let good = "url = \"https://lb.example.com/mgmt/shared/authn/login\"\ntoken_pointer = \"/token/token\"\n";
        login(good).unwrap();
        let elsewhere =
            login("url = \"https://evil.example.com/login\"\ntoken_pointer = \"/token/token\"\n")
                .unwrap_err();
        assert!(
            elsewhere.contains("plugin.f5.login[0].url")
                && elsewhere.contains("must be on `https://lb.example.com`"),
            "{elsewhere}"
        );
        let two = login(&format!("{good}token_header = \"X-Token\"\n")).unwrap_err();
        assert!(two.contains("exactly one of `token_pointer`"), "{two}");
        let relative =
            login("url = \"https://lb.example.com/login\"\ntoken_pointer = \"token/token\"\n")
                .unwrap_err();
        assert!(relative.contains("starts with `/`"), "{relative}");
        for pattern in [
            "https://*.example.com",
            "https://10.0.0.0/24",
            "https://lb.example.com:*",
        ] {
            let text = format!(
                "[[plugin.f5.login]]\norigin = \"{pattern}\"\nusername = \"u\"\n\
                 password = {{ value = \"p\" }}\nheader = \"X-F5-Auth-Token\"\n\
                 url = \"https://lb.example.com/login\"\ntoken_pointer = \"/token/token\"\n"
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("plugin.f5.login[0].origin") && e.contains("is a pattern"),
                "{e}"
            );
        }
        let one_address = good.replace("lb.example.com", "10.0.0.5");
        let text = format!(
            "[[plugin.f5.login]]\norigin = \"https://10.0.0.5\"\nusername = \"u\"\n\
             password = {{ value = \"p\" }}\nheader = \"X-F5-Auth-Token\"\n{one_address}"
        );
        parse(&text).unwrap();

        let file: PluginConfig = toml::from_str(&format!(
            "[[login]]\norigin = \"https://lb.example.com\"\nusername = \"u\"\n\
             password = {{ value = \"p\" }}\nheader = \"H\"\n{good}"
        ))
        .unwrap();
        let refused = confine_settings_file(file, None, "f5", &Limits::default()).unwrap_err();
        assert_eq!(refused.0, "login");
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name_and_place() {
        let e = parse("[listener]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("prismhook.toml: "), "{e}");
        assert!(e.contains("unknown field `listne`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_bad_origin_names_the_plugin_and_entry() {
        let e = parse("[plugin.paloalto]\nallow = [\"https://fw1\", \"fw2\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "prismhook.toml: `plugin.paloalto.allow[1]`: invalid origin `fw2`: expected scheme://host[:port]"
        );
    }

    #[test]
    fn a_jetstream_ledger_is_checked_before_anything_connects() {
        let storage = |extra: &str| {
            let text = format!(
                "[storage]\nbackend = \"jetstream\"\n[storage.jetstream]\n\
                 servers = [\"nats://10.0.0.1:4222\", \"tls://nats-2.example.com:4222\"]\n{extra}"
            );
            parse(&text).map_err(|e| e.to_string())
        };
        let c =
            storage("replicas = 3\nuser = \"ph\"\npassword = { value = \"s3cret\" }\n").unwrap();
        let js = c.storage.jetstream.as_ref().unwrap();
        assert_eq!((js.stream.as_str(), js.replicas), ("PRISMHOOK", Some(3)));
        assert_eq!(js.ack_timeout, Duration::from_secs(5));
        assert!(
            matches!(js.sign_in(), Ok(NatsSignIn::UserPassword { ref user, .. }) if user == "ph")
        );

        let both = storage("token = { value = \"t\" }\ncredentials = \"/etc/ph.creds\"\n");
        assert!(both.unwrap_err().contains("choose one way to sign in"));
        let half = storage("user = \"ph\"\n").unwrap_err();
        assert!(half.contains("`storage.jetstream.password`"), "{half}");
        let too_many = storage("replicas = 7\n").unwrap_err();
        assert!(too_many.contains("expected 1 to 5"), "{too_many}");

        let in_url = parse(
            "[storage]\nbackend = \"jetstream\"\n[storage.jetstream]\nservers = [\"nats://u:p@h:4222\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            in_url.contains("`storage.jetstream.servers[0]`"),
            "{in_url}"
        );
        assert!(
            !in_url.contains("u:p"),
            "the credentials are not echoed: {in_url}"
        );
        let scheme = parse("[storage]\nbackend = \"jetstream\"\n[storage.jetstream]\nservers = [\"http://h:4222\"]\n")
            .unwrap_err()
            .to_string();
        assert!(scheme.contains("expected nats://host:port"), "{scheme}");

        let missing = parse("[storage]\nbackend = \"jetstream\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("needs a [storage.jetstream] table"),
            "{missing}"
        );
        let forgotten = parse("[storage.jetstream]\nservers = [\"nats://h:4222\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            forgotten.contains("add `backend = \"jetstream\"`"),
            "{forgotten}"
        );
        assert_eq!(parse("").unwrap().storage.backend, StorageBackend::Redb);
    }

    #[test]
    fn an_admin_api_beyond_loopback_needs_a_token() {
        let e = parse("[admin]\nlisten = \"0.0.0.0:9100\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`admin.token`"), "{e}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const TWO_CLUSTERS: &str = r#"
[listener]
public_url = "https://prismhook.example.com:8080"

[[cluster]]
name = "lab-east"
prism_url = "https://pc1:9440"
username = "u"
password = { file = "/run/secrets/east" }
[[cluster]]
name = "west"
prism_url = "https://pc2:9440"
username = "u"
password = { env = "WEST" }
"#;

    #[test]
    fn environment_overrides_point_secrets_at_their_variable_and_set_addresses() {
        let c = Config::parse_with_env(
            TWO_CLUSTERS,
            Path::new("prismhook.toml"),
            env(&[
                ("PRISMHOOK_CLUSTER_LAB_EAST_PASSWORD", "p1"),
                ("PRISMHOOK_CLUSTER_WEST_WEBHOOK_PASSWORD", "p2"),
                ("PRISMHOOK_ADMIN_LISTEN", "0.0.0.0:9200"),
                ("PRISMHOOK_ADMIN_TOKEN", "t"),
                ("PRISMHOOK_DATA_DIR", "/var/lib/prismhook"),
                ("PRISMHOOK_LOG", "debug"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let east = &c.clusters[0];
        assert_eq!(
            east.password.env.as_deref(),
            Some("PRISMHOOK_CLUSTER_LAB_EAST_PASSWORD")
        );
        assert_eq!(
            east.password.file, None,
            "the file's source is replaced, not merged"
        );
        assert_eq!(c.clusters[1].password.env.as_deref(), Some("WEST"));
        let hook = c.clusters[1].webhook_password.as_ref().unwrap();
        assert_eq!(
            hook.env.as_deref(),
            Some("PRISMHOOK_CLUSTER_WEST_WEBHOOK_PASSWORD")
        );
        // The token from the environment is what lets the admin API leave loopback.
        assert_eq!(c.admin.listen, "0.0.0.0:9200".parse().unwrap());
        assert_eq!(c.storage.data_dir, Path::new("/var/lib/prismhook"));
    }

    #[test]
    fn a_variable_two_clusters_could_read_is_refused_and_so_are_names_that_spell_alike() {
        let two = |a: &str, b: &str| {
            format!(
                "[listener]\npublic_url = \"https://prismhook.example.com\"\n\
                 [[cluster]]\nname = \"{a}\"\nprism_url = \"https://pc1:9440\"\nusername = \"u\"\n\
                 password = {{ value = \"x\" }}\n\
                 [[cluster]]\nname = \"{b}\"\nprism_url = \"https://pc2:9440\"\nusername = \"u\"\n\
                 password = {{ value = \"y\" }}\n"
            )
        };
        let e = Config::parse_with_env(
            &two("prod", "prod_webhook"),
            Path::new("p.toml"),
            env(&[("PRISMHOOK_CLUSTER_PROD_WEBHOOK_PASSWORD", "s")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "p.toml: `environment variable PRISMHOOK_CLUSTER_PROD_WEBHOOK_PASSWORD`: could be \
             `prod`'s webhook password or `prod_webhook`'s password; rename a cluster so that \
             each variable names one"
        );
        // Unambiguous variables of the same two clusters are fine.
        let c = Config::parse_with_env(
            &two("prod", "prod_webhook"),
            Path::new("p.toml"),
            env(&[("PRISMHOOK_CLUSTER_PROD_PASSWORD", "s")]),
        )
        .unwrap();
        assert_eq!(
            c.clusters[0].password.env.as_deref(),
            Some("PRISMHOOK_CLUSTER_PROD_PASSWORD")
        );
        let e = Config::parse_with_env(&two("lab-a", "lab_a"), Path::new("p.toml"), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`lab-a` and `lab_a` would read the same environment variables (PRISMHOOK_CLUSTER_LAB_A_*)"),
            "{e}"
        );
    }

    #[test]
    fn an_override_naming_no_cluster_or_a_bad_address_is_refused() {
        let e = Config::parse_with_env(
            TWO_CLUSTERS,
            Path::new("prismhook.toml"),
            env(&[("PRISMHOOK_CLUSTER_EAST_PASSWORD", "p")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("prismhook.toml: `environment variable PRISMHOOK_CLUSTER_EAST_PASSWORD`: names no configured cluster"), "{e}");
        let e = Config::parse_with_env(
            "",
            Path::new("p.toml"),
            env(&[("PRISMHOOK_LISTEN", "8080")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "p.toml: `environment variable PRISMHOOK_LISTEN`: expected an address like 0.0.0.0:8080, found \"8080\""
        );
    }

    /// Each `tests/config/*.toml` must fail with exactly the message in the
    /// `.err` file beside it. `PRISMHOOK_BLESS=1` rewrites the `.err` files.
    #[test]
    fn every_broken_configuration_gives_its_golden_error() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/config");
        let bless = std::env::var_os("PRISMHOOK_BLESS").is_some();
        let mut checked = 0;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        {
            let name = Path::new(path.file_name().unwrap());
            let text = std::fs::read_to_string(path).unwrap();
            let got = match Config::parse(&text, name) {
                Ok(_) => panic!("{} parsed, but it is meant to be refused", path.display()),
                Err(e) => format!("{e}\n"),
            };
            let golden = path.with_extension("err");
            if bless {
                std::fs::write(&golden, &got).unwrap();
            }
            let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
                panic!("{}: {e} (PRISMHOOK_BLESS=1 writes it)", golden.display())
            });
            assert_eq!(got, want, "{}", path.display());
            checked += 1;
        }
        assert!(
            checked >= 8,
            "only {checked} golden files in {}",
            dir.display()
        );
    }

    #[test]
    fn a_plugin_without_settings_of_its_own_is_enabled() {
        let defaults = PluginConfig::default();
        assert!(defaults.enabled);
        assert_eq!(defaults, toml::from_str::<PluginConfig>("").unwrap());
    }

    #[test]
    fn durations_read_as_human_text() {
        let c = parse("[delivery]\nbatch_window = \"20ms\"\nmax_age = \"2h\"\n").unwrap();
        assert_eq!(c.delivery.batch_window, Duration::from_millis(20));
        assert_eq!(c.delivery.max_age, Duration::from_secs(7200));
    }

    #[test]
    fn plugin_settings_merge_limits_and_read_injected_secrets() {
        let c = parse(
            r#"
[plugins.limits]
deadline_ms = 2000
[plugin.paloalto]
config = { firewall = "https://fw1.example.com" }
allow = ["https://fw1.example.com"]
limits = { memory_mib = 32 }
inject = [{ origin = "https://fw1.example.com", header = "X-PAN-KEY", value = "k" }]
"#,
        )
        .unwrap();
        let s = c.plugin_settings("paloalto", None).unwrap();
        assert_eq!(s.limits.deadline, Duration::from_secs(2));
        assert_eq!(s.limits.memory_bytes, 32 << 20);
        assert_eq!(s.config["firewall"], "https://fw1.example.com");
        assert!(s
            .policy
            .allows(&Url::parse("https://fw1.example.com/api/").unwrap()));
        assert_eq!(s.policy.secrets().next().unwrap().expose(), "k");
    }

    #[test]
    fn a_settings_file_keeps_the_operators_pin_trust_and_switch_and_may_only_lower_limits() {
        let pin = "ab".repeat(32);
        let main: PluginConfig = toml::from_str(&format!(
            r#"
sha256 = "{pin}"
tls = {{ pinned_cert = "/etc/prismhook/fw1.pem" }}
limits = {{ deadline_ms = 10000 }}
enabled = false
"#
        ))
        .unwrap();
        let defaults = Limits::default();
        let confine = |file: &str| {
            let settings: PluginConfig = toml::from_str(file).unwrap();
            confine_settings_file(settings, Some(&main), "paloalto", &defaults)
        };

        let kept = confine(
            "config = { firewall = \"https://fw1.example.com\" }\n\
             limits = { memory_mib = 32 }\nenabled = true\n",
        )
        .unwrap();
        assert_eq!(kept.sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(kept.tls, main.tls);
        assert!(!kept.enabled, "the operator's switch stays off");
        let limits = defaults.with(&kept.limits);
        assert_eq!(limits.memory_bytes, 32 << 20, "lowered by the file");
        assert_eq!(
            limits.deadline,
            Duration::from_secs(10),
            "the operator's own, which the file does not name, stays"
        );
        assert!(confine("limits = { deadline_ms = 10000 }").is_ok());

        let (key, message) = confine(&format!("sha256 = \"{}\"", "cd".repeat(32))).unwrap_err();
        assert_eq!(key, "sha256");
        assert!(message.contains("pins `paloalto`"), "{message}");
        for (file, key, above) in [
            (
                "limits = { memory_mib = 128 }",
                "limits.memory_mib",
                "128 is above the 64",
            ),
            (
                "limits = { deadline_ms = 10001 }",
                "limits.deadline_ms",
                "10001 is above the 10000",
            ),
            (
                "limits = { max_response_bytes = 18446744073709551615 }",
                "limits.max_response_bytes",
                "18446744073709551615 is above the 8388608",
            ),
            (
                "limits = { kv_mib = 18446744073709551615 }",
                "limits.kv_mib",
                "is above the 1024",
            ),
        ] {
            let (k, message) = confine(file).unwrap_err();
            assert_eq!(k, key, "{file}");
            assert!(message.contains(above), "{message}");
            assert!(message.contains("[plugin.paloalto] limits"), "{message}");
        }
    }

    /// The command line's flags are applied before the checks: a flag can
    /// make a file valid (an address Prism can post to), or invalid.
    #[test]
    fn flags_are_judged_with_the_file_not_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prismhook.toml");
        std::fs::write(
            &file,
            "[[cluster]]\nname = \"lab\"\nprism_url = \"https://pc:9440\"\nusername = \"u\"\n\
             password = { value = \"p\" }\n",
        )
        .unwrap();
        let e = Config::load(&file).unwrap_err().to_string();
        assert!(e.contains("`listener.public_url`"), "{e}");
        let c = Config::load_adjusted(&file, |c| {
            c.listener.listen = "10.0.0.5:8080".parse().unwrap()
        })
        .unwrap();
        assert_eq!(
            c.callback_url("lab"),
            "http://10.0.0.5:8080/listener/callback/lab"
        );
        let e = Config::load_adjusted(&file, |c| {
            c.listener.listen = "10.0.0.5:8080".parse().unwrap();
            c.admin.listen = "0.0.0.0:9100".parse().unwrap();
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("`admin.token`"), "{e}");
    }

    #[test]
    fn a_settings_file_cannot_choose_which_certificates_its_plugin_trusts() {
        let settings: PluginConfig =
            toml::from_str(r#"tls = { pinned_cert = "/etc/prismhook/mitm.pem" }"#).unwrap();
        let (key, message) =
            confine_settings_file(settings, None, "paloalto", &Limits::default()).unwrap_err();
        assert_eq!(key, "tls");
        assert!(message.contains("only the main configuration"), "{message}");
    }
}
