//! A loopback simulator of F5 BIG-IP's iControl REST API, limited to LTM
//! pool members, for the end-to-end tests of the `f5-bigip` plugin and the
//! demo.
//!
//! It models what a pool-member sync relies on, with the answers a client
//! must survive:
//! - Basic authentication or a token on every `/mgmt/` request (401 with
//!   iControl's error JSON otherwise). `POST /mgmt/shared/authn/login` with
//!   `{"username", "password", "loginProviderName"}` answers
//!   `{"token": {"token", "timeout", ...}}`, and the token, sent back as
//!   `X-F5-Auth-Token`, serves until its timeout (1,200 s, as the real
//!   device's default) or `POST /_sim/tokens/expire`. Basic authentication
//!   can be switched off, as it is for remotely authenticated users;
//! - pools addressed as `~Partition~name` (or a bare `name` in `Common`), and
//!   members as `~Partition~<ip>:<port>` (`<ip>.<port>` for IPv6);
//! - `POST .../members` to a missing pool answers 404, a duplicate member
//!   409 `{"code":409,"message":"... already exists in pool ...","errorStack":[]}`,
//!   and `DELETE` of a missing member 404, as the real device does;
//! - a member keeps the `description` it was created with and shows it
//!   when read (one without a description has no such field, as on the
//!   real device), which is how a client tells its members from those an
//!   administrator added;
//! - pools are never created by the API under test: they come from the
//!   configuration or from `POST /_sim/pools/<name>`, like a pool an
//!   administrator set up by hand.
//!
//! Addresses are stored canonically (`2001:DB8::1` reads back as
//! `2001:db8::1`), so a client that does not canonicalise sees its members
//! come back different. It shares no code with the plugin.
//!
//! Faults (latency, failing statuses, dropped connections) are injected per
//! `/mgmt/` request, as in the PAN-OS simulator: connections are served by
//! hyper one task each so that a handler can drop its socket unanswered.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::fault::{FaultAction, RequestLog};
pub use crate::fault::{Faults, RequestRecord};
use crate::server::{serve, ConnectionKill};

/// Where `prismhook sim bigip` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9445";

/// BIG-IP object names are at most this long.
const MAX_NAME_LEN: usize = 255;
const DEFAULT_PARTITION: &str = "Common";

/// Credentials and pre-created pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BigipConfig {
    /// User name Basic authentication expects.
    pub user: String,
    /// Password Basic authentication expects.
    pub password: String,
    /// Pools that exist from the start: `web` (in `Common`) or `/Tenant/web`.
    pub pools: Vec<String>,
    /// Whether Basic authentication is accepted besides tokens.
    pub basic_auth: bool,
    /// How long a login token serves.
    pub token_timeout: Duration,
}

impl Default for BigipConfig {
    fn default() -> Self {
        Self {
            user: "admin".to_owned(),
            password: "admin".to_owned(),
            pools: Vec::new(),
            basic_auth: true,
            token_timeout: Duration::from_secs(1200),
        }
    }
}

/// Counters since start or the last reset, as served by `GET /_sim/stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BigipStats {
    /// Every `/mgmt/` request received, faulted ones included.
    pub requests: u64,
    /// `POST .../members` that created a member.
    pub members_added: u64,
    /// `DELETE .../members/<member>` that removed a member.
    pub members_removed: u64,
    /// 409 answers to a member that already exists.
    pub conflicts: u64,
    /// 404 answers (missing pool, member or path).
    pub not_found: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// Successful logins (tokens issued).
    pub logins: u64,
    /// Requests refused for an unknown or expired token (counted in
    /// `unauthorized` too).
    pub expired_tokens: u64,
    /// Non-2xx answers of any kind (404, 409 and injected ones included) and
    /// dropped connections.
    pub errors: u64,
    /// Members in all pools right now.
    pub members: u64,
}

/// A running simulator. Dropping it stops the server too, but only
/// [`BigipSim::shutdown`] waits for that to finish.
pub struct BigipSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl BigipSim {
    /// Binds `addr` (port 0 picks a free port) and serves in a background task.
    pub async fn start(addr: SocketAddr, config: BigipConfig) -> anyhow::Result<BigipSim> {
        for pool in &config.pools {
            pool_path(pool)
                .map_err(|problem| anyhow::anyhow!("BIG-IP simulator pool {pool:?}: {problem}"))?;
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the BIG-IP simulator to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("reading the BIG-IP simulator's bound address")?;
        let shared = Arc::new(Shared::new(config));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            router(Arc::clone(&shared)),
            shutdown_rx,
            "BIG-IP",
        ));
        debug!(%addr, "BIG-IP simulator started");
        Ok(BigipSim {
            addr,
            shared,
            shutdown,
            server,
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`, with a loopback host when bound to a wildcard address.
    pub fn base_url(&self) -> String {
        let host = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(host, self.addr.port()))
    }

    /// Every pool (full path) with its sorted member names, as `GET /_sim/pools`.
    pub fn pools(&self) -> BTreeMap<String, Vec<String>> {
        self.shared.lock().pools_view()
    }

    /// Counters, as `GET /_sim/stats`.
    pub fn stats(&self) -> BigipStats {
        self.shared.lock().stats_view()
    }

    /// Replaces the injected faults, as `POST /_sim/faults`.
    ///
    /// # Panics
    ///
    /// If `fail_status` is not a valid HTTP status code: a test asking for
    /// that has a bug worth stopping at.
    pub fn set_faults(&self, faults: Faults) {
        if let Err(problem) = faults.validate() {
            panic!("BigipSim::set_faults: {problem}");
        }
        self.shared.lock().faults = faults;
    }

    /// Ends every token issued so far, as `POST /_sim/tokens/expire`: the
    /// next request with one gets 401, as after the device's timeout.
    pub fn expire_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    /// Every token issued since start or the last reset, expired or not.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// The last `n` `/mgmt/` requests, oldest first, as `GET /_sim/requests?n=`.
    pub fn requests(&self, n: usize) -> Vec<RequestRecord> {
        self.shared.lock().log.recent(n)
    }

    /// Creates an empty pool (if missing), as `POST /_sim/pools/<name>`.
    ///
    /// # Panics
    ///
    /// If `name` is not a pool name or path.
    pub fn create_pool(&self, name: &str) {
        let path =
            pool_path(name).unwrap_or_else(|problem| panic!("BigipSim::create_pool: {problem}"));
        self.shared.lock().pools.entry(path).or_default();
    }

    /// Adds a member behind the API's back, like an administrator editing the
    /// pool by hand, with no description. Counts nothing.
    ///
    /// # Panics
    ///
    /// If the pool does not exist or `member` is not `<ip>:<port>`.
    pub fn add_member_directly(&self, pool: &str, member: &str) {
        self.add_member_described(pool, member, None);
    }

    /// [`add_member_directly`](Self::add_member_directly) with a
    /// description.
    ///
    /// # Panics
    ///
    /// As `add_member_directly`.
    pub fn add_member_described(&self, pool: &str, member: &str, description: Option<&str>) {
        let path = pool_path(pool)
            .unwrap_or_else(|problem| panic!("BigipSim::add_member_directly: {problem}"));
        let member = Member::parse(member)
            .unwrap_or_else(|problem| panic!("BigipSim::add_member_directly: {problem}"));
        let mut state = self.shared.lock();
        let Some(members) = state.pools.get_mut(&path) else {
            panic!("BigipSim::add_member_directly: pool {path} does not exist");
        };
        members.insert(member, description.map(str::to_owned));
    }

    /// Stops accepting, lets in-flight requests finish (up to a few seconds)
    /// and returns once the server task has ended.
    pub async fn shutdown(self) {
        // The receiver is gone only if the server already stopped.
        let _ = self.shutdown.send(true);
        if let Err(error) = self.server.await {
            warn!(%error, "BIG-IP simulator task ended abnormally");
        }
    }
}

/// Serves until ctrl-c: `prismhook sim bigip --listen ADDR`.
pub async fn run(addr: SocketAddr, config: BigipConfig) -> anyhow::Result<()> {
    let user = config.user.clone();
    let sim = BigipSim::start(addr, config).await?;
    println!(
        "BIG-IP iControl REST simulator listening on {} ({}/mgmt/tm/ltm/pool, Basic auth as {user}); \
         create pools with POST {}/_sim/pools/<name>; ctrl-c stops it",
        sim.addr(),
        sim.base_url(),
        sim.base_url()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    sim.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Names

/// `web`, `~Common~web`, `/Common/web` -> `/Common/web`.
fn pool_path(name: &str) -> Result<String, String> {
    let (partition, pool) = split_path(name)?;
    Ok(format!("/{partition}/{pool}"))
}

/// Splits `~Partition~name`, `/Partition/name` or a bare `name` (in `Common`).
fn split_path(raw: &str) -> Result<(String, String), String> {
    let normal = raw.replace('~', "/");
    let (partition, name) = match normal.strip_prefix('/') {
        Some(rest) => rest
            .split_once('/')
            .ok_or_else(|| format!("{raw:?} names a partition but no object"))?,
        None => (DEFAULT_PARTITION, normal.as_str()),
    };
    for part in [partition, name] {
        if !valid_name(part) {
            return Err(format!(
                "{part:?} (in {raw:?}) is not a BIG-IP name: 1 to {MAX_NAME_LEN} letters, digits, `.`, `_`, `-` or `:`"
            ));
        }
    }
    Ok((partition.to_owned(), name.to_owned()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
}

/// A pool member: address and port, ordered and named as BIG-IP names them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Member {
    address: IpAddr,
    port: u16,
}

impl Member {
    /// `10.0.0.1:80` or `2001:db8::1.80`.
    fn parse(name: &str) -> Result<Member, String> {
        let invalid =
            || format!("{name:?} is not a pool member name (<ipv4>:<port> or <ipv6>.<port>)");
        let (address, port) = if name.matches(':').count() > 1 {
            name.rsplit_once('.').ok_or_else(invalid)?
        } else {
            name.rsplit_once(':').ok_or_else(invalid)?
        };
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        if address.is_ipv6() != (name.matches(':').count() > 1) {
            return Err(invalid());
        }
        let port: u16 = port.parse().map_err(|_| invalid())?;
        Ok(Member { address, port })
    }

    fn name(&self) -> String {
        match self.address {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("{ip}.{}", self.port),
        }
    }

    fn json(&self, partition: &str, description: Option<&str>) -> Value {
        let name = self.name();
        let mut json = json!({
            "kind": "tm:ltm:pool:members:membersstate",
            "name": name,
            "partition": partition,
            "fullPath": format!("/{partition}/{name}"),
            "address": self.address.to_string(),
            "session": "user-enabled",
            "state": "unchecked",
        });
        if let Some(description) = description {
            json["description"] = description.into();
        }
        json
    }
}

fn partition_of(path: &str) -> &str {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or(DEFAULT_PARTITION)
}

// ---------------------------------------------------------------------------
// State

struct Shared {
    config: BigipConfig,
    state: Mutex<SimState>,
}

impl Shared {
    fn new(config: BigipConfig) -> Self {
        let state = SimState::initial(&config);
        Self {
            config,
            state: Mutex::new(state),
        }
    }

    /// A panic while holding the lock cannot leave the state half-updated in a
    /// way that matters more than losing the simulator, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pool's members and their descriptions.
type Members = BTreeMap<Member, Option<String>>;

#[derive(Default)]
struct SimState {
    /// Full path -> members and their descriptions.
    pools: BTreeMap<String, Members>,
    stats: BigipStats,
    faults: Faults,
    log: RequestLog<RequestRecord>,
    /// Live tokens and when each expires.
    tokens: BTreeMap<String, std::time::Instant>,
    /// Every token issued, for tests that look for leaks.
    issued: Vec<String>,
}

impl SimState {
    fn initial(config: &BigipConfig) -> Self {
        let pools = config
            .pools
            .iter()
            .filter_map(|pool| pool_path(pool).ok())
            .map(|path| (path, Members::new()))
            .collect();
        SimState {
            pools,
            ..SimState::default()
        }
    }

    fn pools_view(&self) -> BTreeMap<String, Vec<String>> {
        self.pools
            .iter()
            .map(|(path, members)| {
                let mut names: Vec<String> = members.keys().map(Member::name).collect();
                names.sort();
                (path.clone(), names)
            })
            .collect()
    }

    fn stats_view(&self) -> BigipStats {
        let members = self.pools.values().map(Members::len).sum::<usize>();
        BigipStats {
            members: u64::try_from(members).unwrap_or(u64::MAX),
            ..self.stats.clone()
        }
    }
}

// ---------------------------------------------------------------------------
// Serving

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/mgmt/{*rest}", any(mgmt))
        .route("/_sim/pools", get(sim_pools))
        .route(
            "/_sim/pools/{name}",
            post(sim_create_pool).delete(sim_delete_pool),
        )
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/tokens/expire", post(sim_expire_tokens))
        .route("/_sim/faults", post(sim_faults))
        .route("/_sim/reset", post(sim_reset))
        .route("/_sim/requests", get(sim_requests))
        .with_state(shared)
}

/// An iControl answer: status and JSON body (`None` for an empty body).
struct Reply {
    status: StatusCode,
    body: Option<Value>,
    retry_after: Option<u64>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body: Some(body),
            retry_after: None,
        }
    }

    fn empty() -> Self {
        Self {
            status: StatusCode::OK,
            body: None,
            retry_after: None,
        }
    }

    /// iControl's error shape: `{"code", "message", "errorStack", "apiError"}`.
    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({
                "code": status.as_u16(),
                "message": message.into(),
                "errorStack": [],
                "apiError": 3,
            })),
            retry_after: None,
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::error(StatusCode::NOT_FOUND, message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::error(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Some(body) => (self.status, Json(body)).into_response(),
            None => (self.status, [(CONTENT_TYPE, "application/json")], "").into_response(),
        };
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                "Basic realm=\"Enterprise Manager\""
                    .parse()
                    .expect("a valid header"),
            );
        }
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert("retry-after", secs.into());
        }
        response
    }
}

async fn mgmt(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnectionKill>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let login = method == Method::POST && uri.path() == LOGIN_PATH;
    // A login's body holds a password: not for the request log.
    let mut record = RequestRecord::new(&method, &uri, &body, !login);

    let (latency, fault) = {
        let mut state = shared.lock();
        state.stats.requests += 1;
        state.faults.take()
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let reply = match fault {
        Some(FaultAction::Drop) => {
            debug!(path = %record.path, "BIG-IP simulator dropping a /mgmt/ request");
            {
                let mut state = shared.lock();
                state.stats.errors += 1;
                state.log.record(record);
            }
            kill.kill();
            // The connection task drops this future along with the socket.
            return std::future::pending().await;
        }
        Some(FaultAction::Fail(status, retry_after)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut reply = Reply::error(
                status,
                format!(
                    "simulated failure: HTTP {} injected by the BIG-IP simulator",
                    status.as_u16()
                ),
            );
            reply.retry_after = retry_after;
            reply
        }
        None if login => sign_in(&shared, &body),
        None => match authorized(&shared, &headers) {
            Auth::Yes => dispatch(&shared, &method, uri.path(), uri.query(), &body),
            Auth::No => {
                shared.lock().stats.unauthorized += 1;
                Reply::error(
                    StatusCode::UNAUTHORIZED,
                    "Authorization failed: no user authentication header or token detected. Uri:http://localhost:8100/mgmt/tm/ltm/pool Referrer:127.0.0.1 Sender:127.0.0.1",
                )
            }
            Auth::BadToken => {
                let mut state = shared.lock();
                state.stats.unauthorized += 1;
                state.stats.expired_tokens += 1;
                Reply::error(StatusCode::UNAUTHORIZED, "X-F5-Auth-Token does not exist.")
            }
        },
    };

    record.status_code = Some(reply.status.as_u16());
    debug!(
        method = %record.method,
        path = %record.path,
        http_status = reply.status.as_u16(),
        "BIG-IP simulator answered a /mgmt/ request"
    );
    {
        let mut state = shared.lock();
        if !reply.status.is_success() {
            state.stats.errors += 1;
        }
        match reply.status {
            StatusCode::NOT_FOUND => state.stats.not_found += 1,
            StatusCode::CONFLICT => state.stats.conflicts += 1,
            _ => {}
        }
        state.log.record(record);
    }
    reply.into_response()
}

/// Where clients sign in for a token.
const LOGIN_PATH: &str = "/mgmt/shared/authn/login";

enum Auth {
    Yes,
    /// Neither Basic credentials nor a token.
    No,
    /// A token that was never issued or has expired.
    BadToken,
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> Auth {
    if let Some(token) = headers.get("x-f5-auth-token") {
        let token = token.to_str().unwrap_or_default().to_owned();
        let mut state = shared.lock();
        let now = std::time::Instant::now();
        state.tokens.retain(|_, expires| *expires > now);
        return if state.tokens.contains_key(&token) {
            Auth::Yes
        } else {
            Auth::BadToken
        };
    }
    if shared.config.basic_auth && basic_matches(&shared.config, headers) {
        Auth::Yes
    } else {
        Auth::No
    }
}

fn basic_matches(config: &BigipConfig, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    decoded == format!("{}:{}", config.user, config.password).as_bytes()
}

/// `POST /mgmt/shared/authn/login`: a token for the right username and
/// password, in the shape BIG-IP answers.
fn sign_in(shared: &Shared, body: &Bytes) -> Reply {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Login {
        username: String,
        password: String,
        login_provider_name: Option<String>,
    }
    let Ok(login) = serde_json::from_slice::<Login>(body) else {
        return Reply::bad_request(
            "Bad Request: expected {\"username\", \"password\", \"loginProviderName\"}",
        );
    };
    let config = &shared.config;
    if login.username != config.user || login.password != config.password {
        shared.lock().stats.unauthorized += 1;
        return Reply::error(StatusCode::UNAUTHORIZED, "Authentication failed.");
    }
    let token: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..26)
            .map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[rng.random_range(0..32)]))
            .collect()
    };
    let timeout = config.token_timeout;
    {
        let mut state = shared.lock();
        state.stats.logins += 1;
        state
            .tokens
            .insert(token.clone(), std::time::Instant::now() + timeout);
        state.issued.push(token.clone());
    }
    Reply::ok(json!({
        "username": login.username,
        "loginReference": { "link": "https://localhost/mgmt/cm/system/authn/providers/tmos/1f44a60e-11a7-3c51-a49f-82983026b41b/login" },
        "loginProviderName": login.login_provider_name.unwrap_or_else(|| "tmos".into()),
        "token": {
            "token": token,
            "name": token,
            "userName": login.username,
            "authProviderName": "tmos",
            "timeout": timeout.as_secs(),
            "kind": "shared:authz:tokens:authtokenitemstate",
            "selfLink": format!("https://localhost/mgmt/shared/authz/tokens/{token}"),
        },
        "generation": 0,
        "lastUpdateMicros": 0,
    }))
}

/// Percent-decodes one path segment; `None` when it is not valid UTF-8.
fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn dispatch(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &Bytes,
) -> Reply {
    let Some(rest) = path.strip_prefix("/mgmt/tm/ltm/pool") else {
        return Reply::not_found(format!(
            "URI path {path} not registered.  Please try again with a valid path."
        ));
    };
    let segments: Option<Vec<String>> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let Some(segments) = segments else {
        return Reply::bad_request(format!("{path} is not valid UTF-8 once percent-decoded"));
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, segments.as_slice()) {
        (&Method::GET, []) => list_pools(shared),
        (&Method::GET, [pool]) => with_pool(shared, pool, |path, members| {
            Reply::ok(pool_json(path, members.len()))
        }),
        (&Method::GET, [pool, "members"]) => with_pool(shared, pool, |path, members| {
            let partition = partition_of(path);
            let selected = selected(query);
            let items = members
                .iter()
                .map(|(m, d)| select(m.json(partition, d.as_deref()), selected.as_deref()));
            Reply::ok(json!({
                "kind": "tm:ltm:pool:members:memberscollectionstate",
                "selfLink": format!("https://localhost/mgmt/tm/ltm/pool/{}/members", path.replace('/', "~")),
                "items": items.collect::<Vec<_>>(),
            }))
        }),
        (&Method::POST, [pool, "members"]) => add_member(shared, pool, body),
        (&Method::GET, [pool, "members", member]) => with_pool(shared, pool, |path, members| {
            match find_member(path, members, member) {
                Ok(found) => Reply::ok(found.json(partition_of(path), members[&found].as_deref())),
                Err(reply) => reply,
            }
        }),
        (&Method::DELETE, [pool, "members", member]) => remove_member(shared, pool, member),
        (_, [] | [_] | [_, "members"] | [_, "members", _]) => Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} is not supported on {path} by the simulator"),
        ),
        _ => Reply::not_found(format!(
            "URI path {path} not registered.  Please try again with a valid path."
        )),
    }
}

/// The properties an iControl REST `$select` names (`$select=name,description`),
/// if the query has one.
fn selected(query: Option<&str>) -> Option<Vec<String>> {
    let value = query?.split('&').find_map(|pair| {
        pair.strip_prefix("$select=")
            .or(pair.strip_prefix("%24select="))
    })?;
    let value = decode_segment(value)?;
    Some(value.split(',').map(|p| p.trim().to_owned()).collect())
}

/// `item` with only the properties `$select` named, as BIG-IP answers.
fn select(item: Value, selected: Option<&[String]>) -> Value {
    match (item, selected) {
        (Value::Object(fields), Some(names)) => Value::Object(
            fields
                .into_iter()
                .filter(|(k, _)| names.iter().any(|n| n == k))
                .collect(),
        ),
        (item, _) => item,
    }
}

fn pool_json(path: &str, members: usize) -> Value {
    let partition = partition_of(path);
    let name = path.rsplit('/').next().unwrap_or_default();
    json!({
        "kind": "tm:ltm:pool:poolstate",
        "name": name,
        "partition": partition,
        "fullPath": path,
        "loadBalancingMode": "round-robin",
        "membersReference": {
            "link": format!("https://localhost/mgmt/tm/ltm/pool/{}/members", path.replace('/', "~")),
            "isSubcollection": true,
        },
        "memberCount": members,
    })
}

fn list_pools(shared: &Shared) -> Reply {
    let state = shared.lock();
    Reply::ok(json!({
        "kind": "tm:ltm:pool:poolcollectionstate",
        "items": state.pools.iter().map(|(path, members)| pool_json(path, members.len())).collect::<Vec<_>>(),
    }))
}

fn missing_pool(path: &str) -> Reply {
    Reply::not_found(format!(
        "01020036:3: The requested Pool ({path}) was not found."
    ))
}

/// Runs `f` on an existing pool, or answers 400/404.
fn with_pool(shared: &Shared, pool: &str, f: impl FnOnce(&str, &Members) -> Reply) -> Reply {
    let path = match pool_path(pool) {
        Ok(path) => path,
        Err(problem) => return Reply::bad_request(problem),
    };
    let state = shared.lock();
    match state.pools.get(&path) {
        Some(members) => f(&path, members),
        None => missing_pool(&path),
    }
}

/// The member a URL segment (`~Common~10.0.0.1:80`) names in a pool.
fn find_member(pool: &str, members: &Members, raw: &str) -> Result<Member, Reply> {
    let (partition, name) = split_path(raw).map_err(Reply::bad_request)?;
    let member = Member::parse(&name).map_err(Reply::bad_request)?;
    if partition == partition_of(pool) && members.contains_key(&member) {
        Ok(member)
    } else {
        Err(Reply::not_found(format!(
            "01020036:3: The requested Pool Member ({pool} /{partition}/{name}) was not found."
        )))
    }
}

#[derive(Deserialize)]
struct NewMember {
    name: Option<String>,
    address: Option<String>,
    partition: Option<String>,
    description: Option<String>,
}

fn add_member(shared: &Shared, pool: &str, body: &Bytes) -> Reply {
    let path = match pool_path(pool) {
        Ok(path) => path,
        Err(problem) => return Reply::bad_request(problem),
    };
    let new: NewMember = match serde_json::from_slice(body) {
        Ok(new) => new,
        Err(error) => {
            return Reply::bad_request(format!("Found invalid JSON body in the request: {error}"))
        }
    };
    let Some(name) = new.name else {
        return Reply::bad_request("\"name\" is required to create a pool member");
    };
    let member = match Member::parse(&name) {
        Ok(member) => member,
        Err(problem) => return Reply::bad_request(format!("01070587:3: {problem}")),
    };
    if let Some(address) = &new.address {
        if address.parse::<IpAddr>().ok() != Some(member.address) {
            return Reply::bad_request(format!(
                "01070587:3: The address {address:?} does not match the member name {name:?}"
            ));
        }
    }
    if let Some(partition) = &new.partition {
        if partition != partition_of(&path) {
            return Reply::bad_request(format!(
                "the simulator keeps members in their pool's partition ({}), not {partition:?}",
                partition_of(&path)
            ));
        }
    }
    let mut state = shared.lock();
    let Some(members) = state.pools.get_mut(&path) else {
        return missing_pool(&path);
    };
    let partition = partition_of(&path).to_owned();
    if members.contains_key(&member) {
        return Reply::error(
            StatusCode::CONFLICT,
            format!(
                "01020066:3: The requested Pool Member ({path} /{partition}/{} {}) already exists in pool {path}.",
                member.address, member.port
            ),
        );
    }
    let reply = Reply::ok(member.json(&partition, new.description.as_deref()));
    members.insert(member, new.description);
    state.stats.members_added += 1;
    reply
}

fn remove_member(shared: &Shared, pool: &str, raw: &str) -> Reply {
    let path = match pool_path(pool) {
        Ok(path) => path,
        Err(problem) => return Reply::bad_request(problem),
    };
    let mut state = shared.lock();
    let Some(members) = state.pools.get_mut(&path) else {
        return missing_pool(&path);
    };
    let member = match find_member(&path, members, raw) {
        Ok(member) => member,
        Err(reply) => return reply,
    };
    members.remove(&member);
    state.stats.members_removed += 1;
    Reply::empty()
}

// ---------------------------------------------------------------------------
// /_sim/ control endpoints

async fn sim_pools(State(shared): State<Arc<Shared>>) -> Json<BTreeMap<String, Vec<String>>> {
    Json(shared.lock().pools_view())
}

async fn sim_create_pool(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    match pool_path(&name) {
        Ok(path) => {
            let created = {
                let mut state = shared.lock();
                let created = !state.pools.contains_key(&path);
                state.pools.entry(path.clone()).or_default();
                created
            };
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(json!({ "fullPath": path }))).into_response()
        }
        Err(problem) => (StatusCode::BAD_REQUEST, problem).into_response(),
    }
}

async fn sim_delete_pool(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    match pool_path(&name) {
        Ok(path) => {
            if shared.lock().pools.remove(&path).is_some() {
                StatusCode::NO_CONTENT.into_response()
            } else {
                (StatusCode::NOT_FOUND, format!("no pool {path}")).into_response()
            }
        }
        Err(problem) => (StatusCode::BAD_REQUEST, problem).into_response(),
    }
}

async fn sim_stats(State(shared): State<Arc<Shared>>) -> Json<BigipStats> {
    Json(shared.lock().stats_view())
}

async fn sim_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> Response {
    if let Err(problem) = faults.validate() {
        return (StatusCode::BAD_REQUEST, problem).into_response();
    }
    debug!(?faults, "BIG-IP simulator faults set");
    shared.lock().faults = faults;
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_expire_tokens(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().tokens.clear();
    StatusCode::NO_CONTENT
}

/// Back to the configured pools, empty, with no stats, faults or log.
async fn sim_reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    *shared.lock() = SimState::initial(&shared.config);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct RequestsQuery {
    n: Option<usize>,
}

async fn sim_requests(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<RequestsQuery>,
) -> Json<Vec<RequestRecord>> {
    Json(shared.lock().log.recent(query.n.unwrap_or(50)))
}
