//! A loopback simulator of the PAN-OS XML API (`/api/`), for end-to-end tests
//! and the demo.
//!
//! The firewall plugin is only as trustworthy as the firewall it is tested
//! against, so this module speaks the wire format of Palo Alto's XML API
//! documentation, as recorded in `tests/fixtures/panos/`, including the quirks
//! a client must survive: single-quoted attributes with spaces around `=` in
//! 400/403 answers, whitespace between `<entry>` elements, `status="error"`
//! answers that merely say "already exists, ignore", paging by 500. It
//! deliberately shares no code with the production plugin and parses XML with
//! its own small quick-xml tree builder, so a parsing or escaping bug cannot
//! hide on both sides of a test.
//!
//! It models what the plugin relies on, and what other clients send first
//! (`show system info`): API keys, User-ID tag
//! registration (validated as a whole before anything is applied, like the
//! firewall, so a bad message never half-applies), `show object
//! registered-ip` read-back, and commits as counted, instantly finished jobs.
//! `type=config` is answered but not modelled: the plugin must never need it
//! per event, and tests assert that through the request log and the counters.
//!
//! Things a real firewall decides that the documentation does not pin down are
//! chosen here to surface client bugs rather than hide them:
//! - addresses are stored canonically (`2001:DB8::1` reads back as
//!   `2001:db8::1`) and listed in numeric order, IPv4 before IPv6;
//! - tag names are trimmed of surrounding whitespace, and may be at most 127
//!   characters (longer answers code 12);
//! - a `<limit>` outside 1..=500 or a `<start-point>` of 0 is refused (code 18)
//!   instead of clamped, so a client that assumes bigger pages fails loudly;
//! - a `<tag>` element without `<member>` is refused; only an unregister
//!   `<entry>` with no `<tag>` at all removes every tag of an address;
//! - a registration with `timeout="N"` lapses N seconds later, as on the
//!   firewall, and registering the same tag again starts the timeout over
//!   (an assumption: PAN-OS's documentation says a timeout unregisters the
//!   tag, not what a repeated register does to it);
//! - with `max_registered_ips`, a register of one more address is refused
//!   for that entry with "max registered-ip for the platform reached (N)",
//!   the text PAN-OS logs when it reaches its platform's limit;
//! - `target=<serial>` (Panorama forwarding to a managed firewall) is
//!   accepted for the simulator's own serial, [`SERIAL`], and refused for
//!   any other, so a client that names the wrong device fails loudly;
//! - API keys can be expired (`expire_api_keys`), as the firewall's "Expire
//!   All API Keys" or API key lifetime do: the old key then gets 403.
//!
//! Faults (latency, failing statuses, dropped connections) are injected per
//! `/api/` request. Dropping has to really close the TCP connection without an
//! answer, which axum's `serve` cannot do, so connections are accepted on a
//! plain listener and each is served by hyper in its own task that the request
//! handler can tell to drop the socket.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::fault::RequestLog;
use crate::server::{serve, ConnectionKill};

/// Where `prismhook sim panos` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9443";

/// The documented 5 MB User-ID limit, plus room for form encoding.
const API_BODY_LIMIT: usize = 6 * 1024 * 1024;
/// `show object registered-ip` pages hold at most this many entries.
const MAX_PAGE: usize = 500;
/// Longest registration timeout PAN-OS accepts, in seconds (30 days).
const MAX_TIMEOUT_SECS: u64 = 2_592_000;
/// Commonly cited (unverified) limit on tag name length, in characters.
const MAX_TAG_CHARS: usize = 127;
/// Nothing the API accepts nests deeper; the bound keeps hostile input cheap.
const MAX_XML_DEPTH: usize = 32;
/// Parameters that carry secrets and never reach the request log.
const SECRET_PARAMS: [&str; 2] = ["password", "key"];

/// Credentials the simulated firewall accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanosConfig {
    /// Administrator name `type=keygen` expects.
    pub user: String,
    /// Password `type=keygen` expects.
    pub password: String,
    /// The key keygen hands out and every other call must carry in
    /// `X-PAN-KEY`, until [`PanosSim::expire_api_keys`] makes a new one.
    pub api_key: String,
    /// How many addresses may be registered at once, as the platform's
    /// limit; a register beyond it is refused for that entry with "max
    /// registered-ip for the platform reached". `None`: no limit.
    pub max_registered_ips: Option<usize>,
}

impl Default for PanosConfig {
    fn default() -> Self {
        Self {
            user: "admin".to_owned(),
            password: "admin".to_owned(),
            api_key: "sim-key-0001".to_owned(),
            max_registered_ips: None,
        }
    }
}

/// Counters since start or the last reset, as served by `GET /_sim/stats`.
///
/// `errors` counts answers that refused a request: non-2xx HTTP statuses
/// (injected failures included), dropped connections, and `status="error"`
/// answers except the harmless "already exists, ignore" / "does not exist,
/// ignore unreg" notes, which the firewall sends for requests it did apply.
/// `keygens`, `uid_messages`, `ops` and `commits` count attempts of that
/// type that got past authentication (keygen needs none), valid or not.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PanosStats {
    /// Every `/api/` request received, faulted ones included.
    pub requests: u64,
    /// `type=user-id` requests.
    pub uid_messages: u64,
    /// (ip, tag) pairs registered right now.
    pub registered_entries: u64,
    /// `type=commit` requests.
    pub commits: u64,
    /// `type=keygen` requests, successful or not.
    pub keygens: u64,
    /// `type=op` requests.
    pub ops: u64,
    /// Refused requests, see the type's documentation.
    pub errors: u64,
}

/// Faults injected into `/api/` requests; `/_sim/` stays healthy so a test
/// can always switch them off again.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Delay before every `/api/` answer (or drop).
    pub latency_ms: u64,
    /// Answer every `/api/` request with this HTTP status and an error body.
    pub fail_status: Option<u16>,
    /// If above zero, only the next N `/api/` requests fail (with
    /// `fail_status`, or 500), after which the simulator behaves again and
    /// `fail_status` is cleared.
    pub fail_next: u32,
    /// Close each `/api/` request's TCP connection without answering.
    pub drop_connections: bool,
}

impl Faults {
    fn validate(&self) -> Result<(), String> {
        match self.fail_status {
            Some(code) if StatusCode::from_u16(code).is_err() => {
                Err(format!("fail_status {code} is not an HTTP status code"))
            }
            _ => Ok(()),
        }
    }
}

/// One `/api/` request as `GET /_sim/requests` reports it, secrets left out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// The `type` parameter, if any.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Query and form parameters merged, without `cmd`, `password` and `key`.
    pub params: BTreeMap<String, String>,
    /// The `cmd` parameter (uid-message, op or commit XML), verbatim.
    pub xml_cmd: Option<String>,
    /// HTTP status answered; `None` when the connection was dropped.
    pub status_code: Option<u16>,
}

/// A running simulator. Dropping it stops the server too, but only
/// [`PanosSim::shutdown`] waits for that to finish.
pub struct PanosSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl PanosSim {
    /// Binds `addr` (port 0 picks a free port) and serves in a background task.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr, config: PanosConfig) -> anyhow::Result<PanosSim> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the PAN-OS simulator to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("reading the PAN-OS simulator's bound address")?;
        let shared = Arc::new(Shared::new(config));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            router(Arc::clone(&shared)),
            shutdown_rx,
            "PAN-OS",
        ));
        debug!(%addr, "PAN-OS simulator started");
        Ok(PanosSim {
            addr,
            shared,
            shutdown,
            server,
        })
    }

    /// The address actually bound.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`, with a loopback host when bound to a wildcard address.
    #[must_use]
    pub fn base_url(&self) -> String {
        let host = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(host, self.addr.port()))
    }

    /// Registered addresses and their sorted tags, as `GET /_sim/registered`.
    #[must_use]
    pub fn registered(&self) -> BTreeMap<String, Vec<String>> {
        let mut state = self.shared.lock();
        state.lapse();
        state.registered_view()
    }

    /// Counters, as `GET /_sim/stats`.
    #[must_use]
    pub fn stats(&self) -> PanosStats {
        let mut state = self.shared.lock();
        state.lapse();
        state.stats_view()
    }

    /// Replaces the injected faults, as `POST /_sim/faults`.
    ///
    /// # Panics
    ///
    /// If `fail_status` is not a valid HTTP status code: a test asking for
    /// that has a bug worth stopping at.
    pub fn set_faults(&self, faults: Faults) {
        if let Err(problem) = faults.validate() {
            panic!("PanosSim::set_faults: {problem}");
        }
        self.shared.lock().faults = faults;
    }

    /// The last `n` `/api/` requests, oldest first, as `GET /_sim/requests?n=`.
    #[must_use]
    pub fn requests(&self, n: usize) -> Vec<RequestRecord> {
        self.shared.lock().log.recent(n)
    }

    /// Registers tags behind the API's back, like an administrator editing the
    /// firewall by hand. Counts nothing.
    ///
    /// # Panics
    ///
    /// If `ip` is not an IPv4 or IPv6 address.
    pub fn register_directly(&self, ip: &str, tags: &[&str]) {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            panic!("PanosSim::register_directly: {ip:?} is not an IP address");
        };
        let mut state = self.shared.lock();
        let entry = state.registered.entry(ip).or_default();
        entry.extend(tags.iter().map(|tag| (*tag).to_owned()));
        if entry.is_empty() {
            state.registered.remove(&ip);
        }
    }

    /// Expires every API key, as "Expire All API Keys" (or the API key
    /// lifetime running out) does on a firewall: the old key gets 403 from
    /// now on and keygen hands out a new one. As `POST /_sim/keys/expire`.
    pub fn expire_api_keys(&self) {
        self.shared.lock().key_generation += 1;
    }

    /// The key keygen hands out now.
    pub fn api_key(&self) -> String {
        self.shared.lock().api_key(&self.shared.config)
    }

    /// Stops accepting, lets in-flight requests finish (up to a few seconds)
    /// and returns once the server task has ended.
    pub async fn shutdown(self) {
        // The receiver is gone only if the server already stopped.
        let _ = self.shutdown.send(true);
        if let Err(error) = self.server.await {
            warn!(%error, "PAN-OS simulator task ended abnormally");
        }
    }
}

/// Serves until ctrl-c: `prismhook sim panos --listen ADDR`.
///
/// # Errors
///
/// When the address cannot be bound or ctrl-c cannot be listened for.
pub async fn run(addr: SocketAddr, config: PanosConfig) -> anyhow::Result<()> {
    let user = config.user.clone();
    let sim = PanosSim::start(addr, config).await?;
    println!(
        "PAN-OS XML API simulator listening on {} (POST {}/api/, user {user}); ctrl-c stops it",
        sim.addr(),
        sim.base_url()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    sim.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// State

struct Shared {
    config: PanosConfig,
    state: Mutex<SimState>,
}

impl Shared {
    fn new(config: PanosConfig) -> Self {
        Self {
            config,
            state: Mutex::new(SimState::default()),
        }
    }

    /// A panic while holding the lock cannot leave the state half-updated in a
    /// way that matters more than losing the simulator, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct SimState {
    registered: BTreeMap<IpAddr, BTreeSet<String>>,
    stats: PanosStats,
    faults: Faults,
    jobs: Vec<Job>,
    log: RequestLog<RequestRecord>,
    /// How many times every key was expired: the current key is the
    /// configured one while this is 0, then a new one each time.
    key_generation: u64,
    /// When each registration made with a timeout lapses. Registering the
    /// same tag again starts its timeout over (and `timeout="0"` or none
    /// makes it permanent), the behaviour clients that refresh rely on.
    expires: BTreeMap<(IpAddr, String), Instant>,
}

struct Job {
    description: String,
    enqueued_unix: u64,
}

impl SimState {
    fn api_key(&self, config: &PanosConfig) -> String {
        match self.key_generation {
            0 => config.api_key.clone(),
            n => format!("{}-{n}", config.api_key),
        }
    }

    /// Drops the registrations whose timeout has run out, as the firewall
    /// does by itself.
    fn lapse(&mut self) {
        let now = Instant::now();
        let lapsed: Vec<(IpAddr, String)> = self
            .expires
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for (ip, tag) in lapsed {
            self.expires.remove(&(ip, tag.clone()));
            if let Some(tags) = self.registered.get_mut(&ip) {
                tags.remove(&tag);
                if tags.is_empty() {
                    self.registered.remove(&ip);
                }
            }
        }
    }

    fn registered_view(&self) -> BTreeMap<String, Vec<String>> {
        self.registered
            .iter()
            .map(|(ip, tags)| (ip.to_string(), tags.iter().cloned().collect()))
            .collect()
    }

    fn stats_view(&self) -> PanosStats {
        let pairs = self.registered.values().map(BTreeSet::len).sum::<usize>();
        PanosStats {
            registered_entries: u64::try_from(pairs).unwrap_or(u64::MAX),
            ..self.stats.clone()
        }
    }

    /// Decides this request's fault, consuming one of `fail_next`.
    fn take_fault(&mut self) -> (Duration, Option<FaultAction>) {
        let faults = &mut self.faults;
        let latency = Duration::from_millis(faults.latency_ms);
        let action = if faults.drop_connections {
            Some(FaultAction::Drop)
        } else if faults.fail_next > 0 {
            faults.fail_next -= 1;
            let status = faults.fail_status.unwrap_or(500);
            if faults.fail_next == 0 {
                faults.fail_status = None;
            }
            Some(FaultAction::Fail(status))
        } else {
            faults.fail_status.map(FaultAction::Fail)
        };
        (latency, action)
    }

    /// Applies an already validated update in document order, collecting the
    /// firewall's "nothing to do" notes.
    fn apply(&mut self, ops: Vec<UidOp>, max_ips: Option<usize>) -> Vec<UidNote> {
        self.lapse();
        let mut notes = Vec::new();
        for op in ops {
            match op {
                UidOp::Register { ip, tags } => {
                    let full = max_ips.filter(|max| self.registered.len() >= *max);
                    if let (Some(max), false) = (full, self.registered.contains_key(&ip)) {
                        notes.push(UidNote::register(
                            ip,
                            format!("max registered-ip for the platform reached ({max})"),
                        ));
                        continue;
                    }
                    let present = self.registered.entry(ip).or_default();
                    for (tag, timeout) in tags {
                        let key = (ip, tag.clone());
                        match timeout {
                            Some(secs) if secs > 0 => {
                                let at = Instant::now() + Duration::from_secs(secs);
                                self.expires.insert(key, at);
                            }
                            _ => {
                                self.expires.remove(&key);
                            }
                        }
                        if present.contains(&tag) {
                            notes.push(UidNote::register(
                                ip,
                                format!("tag {tag} already exists, ignore"),
                            ));
                        } else {
                            present.insert(tag);
                        }
                    }
                }
                UidOp::Unregister { ip, tags: None } => {
                    self.expires.retain(|(at, _), _| *at != ip);
                    if self.registered.remove(&ip).is_none() {
                        notes.push(UidNote::unregister(
                            ip,
                            format!("ip {ip} does not exist, ignore unreg"),
                        ));
                    }
                }
                UidOp::Unregister {
                    ip,
                    tags: Some(tags),
                } => {
                    let mut present = self.registered.get_mut(&ip);
                    for tag in tags {
                        self.expires.remove(&(ip, tag.clone()));
                        let removed = present.as_mut().is_some_and(|set| set.remove(&tag));
                        if !removed {
                            notes.push(UidNote::unregister(
                                ip,
                                format!("tag {tag} does not exist, ignore unreg"),
                            ));
                        }
                    }
                    if present.is_some_and(|set| set.is_empty()) {
                        self.registered.remove(&ip);
                    }
                }
            }
        }
        notes
    }
}

enum FaultAction {
    Drop,
    Fail(u16),
}

// ---------------------------------------------------------------------------
// Serving

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/", get(api).post(api))
        .route("/api", get(api).post(api))
        .route("/_sim/registered", get(sim_registered))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/faults", post(sim_faults))
        .route("/_sim/reset", post(sim_reset))
        .route("/_sim/keys/expire", post(sim_expire_keys))
        .route("/_sim/requests", get(sim_requests))
        .layer(DefaultBodyLimit::max(API_BODY_LIMIT))
        .with_state(shared)
}

type Params = BTreeMap<String, String>;

/// An `/api/` answer: XML body, HTTP status, and whether it refused the request.
struct Reply {
    status: StatusCode,
    body: String,
    refused: bool,
}

impl Reply {
    fn ok(body: String) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            refused: false,
        }
    }

    /// `status="error"` with HTTP 200, the firewall's usual way of refusing.
    fn line_error(code: Option<u16>, message: &str) -> Self {
        let code = code
            .map(|code| format!(" code=\"{code}\""))
            .unwrap_or_default();
        Self {
            status: StatusCode::OK,
            body: format!(
                "<response status=\"error\"{code}><msg><line>{}</line></msg></response>",
                escape(message)
            ),
            refused: true,
        }
    }

    /// The web front end's format for 400 and 403, quirky quoting included
    /// (`error_400_result_msg.xml`, `keygen_response_error_403.xml`).
    fn result_msg_error(status: StatusCode, message: &str) -> Self {
        Self {
            status,
            body: format!(
                "<response status = 'error' code = '{}'><result><msg>{}</msg></result></response>",
                status.as_u16(),
                escape(message)
            ),
            refused: true,
        }
    }

    fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    fn bad_request(message: &str) -> Self {
        Self::result_msg_error(StatusCode::BAD_REQUEST, message)
    }

    fn malformed(message: &str) -> Self {
        Self::line_error(Some(18), message)
    }

    fn injected(status: u16) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            // No code attribute: code 22 or 403 would tell the client to re-key,
            // which an injected transport failure does not mean.
            body: format!(
                "<response status=\"error\"><msg><line>simulated failure: HTTP {} injected by the PAN-OS simulator</line></msg></response>",
                status.as_u16()
            ),
            refused: true,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.status, [(CONTENT_TYPE, "application/xml")], self.body).into_response()
    }
}

async fn api(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnectionKill>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (params, param_problem) = collect_params(&uri, &headers, body.as_ref().ok());
    let mut record = RequestRecord {
        kind: params.get("type").cloned(),
        method: method.to_string(),
        params: params
            .iter()
            .filter(|(name, _)| name.as_str() != "cmd" && !SECRET_PARAMS.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        xml_cmd: params.get("cmd").cloned(),
        status_code: None,
    };

    let (latency, fault) = {
        let mut state = shared.lock();
        state.stats.requests += 1;
        state.take_fault()
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let reply = match fault {
        Some(FaultAction::Drop) => {
            debug!(
                kind = record.kind.as_deref(),
                "PAN-OS simulator dropping an /api/ request"
            );
            {
                let mut state = shared.lock();
                state.stats.errors += 1;
                state.log.record(record);
            }
            kill.kill();
            // The connection task drops this future along with the socket.
            return std::future::pending().await;
        }
        Some(FaultAction::Fail(status)) => Reply::injected(status),
        None => match (&body, param_problem) {
            (Err(rejection), _) => {
                Reply::line_error(None, &rejection.body_text()).with_status(rejection.status())
            }
            (Ok(_), Some(problem)) => Reply::bad_request(&problem),
            (Ok(_), None) => dispatch(&shared, &headers, &params),
        },
    };

    record.status_code = Some(reply.status.as_u16());
    debug!(
        kind = record.kind.as_deref(),
        http_status = reply.status.as_u16(),
        refused = reply.refused,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "PAN-OS simulator answered an /api/ request"
    );
    {
        let mut state = shared.lock();
        if reply.refused {
            state.stats.errors += 1;
        }
        state.log.record(record);
    }
    reply.into_response()
}

/// Merges query and form parameters, the form winning. A body in any other
/// encoding is reported instead of silently ignored: the firewall would not
/// read it either, and "missing type" would hide the real mistake.
fn collect_params(
    uri: &Uri,
    headers: &HeaderMap,
    body: Option<&Bytes>,
) -> (Params, Option<String>) {
    let mut params = Params::new();
    if let Some(query) = uri.query() {
        params.extend(form_urlencoded::parse(query.as_bytes()).into_owned());
    }
    let Some(body) = body.filter(|body| !body.is_empty()) else {
        return (params, None);
    };
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        params.extend(form_urlencoded::parse(body).into_owned());
        (params, None)
    } else {
        let problem = format!(
            "Unsupported Content-Type \"{content_type}\": send parameters as application/x-www-form-urlencoded"
        );
        (params, Some(problem))
    }
}

fn dispatch(shared: &Shared, headers: &HeaderMap, params: &Params) -> Reply {
    let kind = params.get("type").map(String::as_str);
    if kind == Some("keygen") {
        return keygen(shared, params);
    }
    let key = shared.lock().api_key(&shared.config);
    if !authorized(&key, headers, params) {
        return Reply::result_msg_error(StatusCode::FORBIDDEN, "Invalid credentials.");
    }
    // Panorama forwards a request with `target` to the managed firewall of
    // that serial; the simulator stands for one firewall, its own serial.
    if let Some(target) = params.get("target").filter(|t| t.as_str() != SERIAL) {
        return Reply::line_error(
            None,
            &format!("target {target} is not a connected device (the simulator is {SERIAL})"),
        );
    }
    match kind {
        Some("user-id") => user_id(shared, params),
        Some("op") => op(shared, params),
        Some("commit") => commit(shared, params),
        Some("config") => config(params),
        Some(other) => Reply::bad_request(&format!(
            "Invalid type \"{other}\": the simulator knows keygen, user-id, op, commit and config"
        )),
        None => Reply::bad_request("Missing required parameter \"type\""),
    }
}

fn authorized(key: &str, headers: &HeaderMap, params: &Params) -> bool {
    let header = headers
        .get("x-pan-key")
        .and_then(|value| value.to_str().ok());
    header == Some(key) || params.get("key").map(String::as_str) == Some(key)
}

fn keygen(shared: &Shared, params: &Params) -> Reply {
    let key = {
        let mut state = shared.lock();
        state.stats.keygens += 1;
        state.api_key(&shared.config)
    };
    let config = &shared.config;
    let user_ok = params.get("user") == Some(&config.user);
    let password_ok = params.get("password") == Some(&config.password);
    if user_ok && password_ok {
        Reply::ok(format!(
            "<response status = 'success'><result><key>{}</key></result></response>",
            escape(&key)
        ))
    } else {
        Reply::result_msg_error(StatusCode::FORBIDDEN, "Invalid Credential")
    }
}

fn required_cmd(params: &Params) -> Result<&str, Reply> {
    params
        .get("cmd")
        .map(String::as_str)
        .ok_or_else(|| Reply::bad_request("Missing required parameter \"cmd\""))
}

fn user_id(shared: &Shared, params: &Params) -> Reply {
    shared.lock().stats.uid_messages += 1;
    let cmd = match required_cmd(params) {
        Ok(cmd) => cmd,
        Err(reply) => return reply,
    };
    let ops = match parse_uid_message(cmd) {
        Ok(ops) => ops,
        Err(PanError { code, message }) => return Reply::line_error(Some(code), &message),
    };
    let notes = shared.lock().apply(ops, shared.config.max_registered_ips);
    if notes.is_empty() {
        return Reply::ok(
            "<response status=\"success\"><result><uid-response><version>1.0</version><payload/></uid-response></result></response>"
                .to_owned(),
        );
    }
    // Status "error" although everything asked for now holds: the firewall's
    // habit, which clients must read as success (uid_response_error_*.xml).
    let mut body = String::from(
        "<response status=\"error\"><msg><line><uid-response><version>1.0</version><payload>",
    );
    for (kind, element) in [
        (UidNoteKind::Register, "register"),
        (UidNoteKind::Unregister, "unregister"),
    ] {
        let mut of_kind = notes.iter().filter(|note| note.kind == kind).peekable();
        if of_kind.peek().is_none() {
            continue;
        }
        let _ = write!(body, "<{element}>");
        for note in of_kind {
            let _ = write!(
                body,
                "<entry ip=\"{}\" message=\"{}\"/>",
                note.ip,
                escape(note.message.as_str())
            );
        }
        let _ = write!(body, "</{element}>");
    }
    body.push_str("</payload></uid-response></line></msg></response>");
    Reply {
        status: StatusCode::OK,
        body,
        refused: false,
    }
}

fn op(shared: &Shared, params: &Params) -> Reply {
    shared.lock().stats.ops += 1;
    let cmd = match required_cmd(params) {
        Ok(cmd) => cmd,
        Err(reply) => return reply,
    };
    let root = match parse_xml(cmd) {
        Ok(root) => root,
        Err(problem) => return Reply::malformed(&problem),
    };
    let result = match command_path(&root).as_slice() {
        ["show", "object", "registered-ip", ..] => show_registered_ip(shared, &root),
        ["show", "jobs", "id"] => show_job(shared, &root),
        ["show", "system", "info"] => Ok(system_info()),
        path => Err(PanError::new(
            1,
            format!("unknown command: {} is unexpected", path.join(" -> ")),
        )),
    };
    result.unwrap_or_else(|PanError { code, message }| Reply::line_error(Some(code), &message))
}

/// What the simulator's own serial number is, in `show system info`.
pub const SERIAL: &str = "007951000000001";
/// The PAN-OS release the simulator answers as.
pub const SW_VERSION: &str = "11.1.4";

/// `show system info`, which clients send first to learn the release and
/// the serial: the fields pan-os-python and Ansible read, in the
/// firewall's layout.
fn system_info() -> Reply {
    Reply::ok(format!(
        "<response status=\"success\"><result><system>\
         <hostname>prismhook-sim</hostname><ip-address>127.0.0.1</ip-address>\
         <model>PA-VM</model><family>vm</family><serial>{SERIAL}</serial>\
         <sw-version>{SW_VERSION}</sw-version><multi-vsys>off</multi-vsys>\
         <operational-mode>normal</operational-mode></system></result></response>"
    ))
}

/// The chain of first children, which is how an op command names itself.
fn command_path(root: &Element) -> Vec<&str> {
    let mut path = vec![root.name.as_str()];
    let mut current = root;
    while let [only] = current.children.as_slice() {
        path.push(only.name.as_str());
        current = only;
    }
    path
}

fn show_registered_ip(shared: &Shared, root: &Element) -> Result<Reply, PanError> {
    let query = root
        .child("object")
        .and_then(|object| object.child("registered-ip"))
        .ok_or_else(|| PanError::malformed("expected <show><object><registered-ip>"))?;
    query.require_no_text()?;
    let mut limit = MAX_PAGE;
    let mut start = 1usize;
    let mut tag_filter: Option<BTreeSet<String>> = None;
    let mut ip_filter: Option<IpAddr> = None;
    for argument in &query.children {
        match argument.name.as_str() {
            "limit" => {
                limit = argument
                    .leaf_text()?
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_PAGE).contains(limit))
                    .ok_or_else(|| {
                        PanError::malformed(format!(
                            "<limit> must be an integer from 1 to {MAX_PAGE}"
                        ))
                    })?;
            }
            "start-point" => {
                start = argument
                    .leaf_text()?
                    .parse()
                    .ok()
                    .filter(|start| *start >= 1)
                    .ok_or_else(|| {
                        PanError::malformed(
                            "<start-point> must be an integer from 1 (the first entry)",
                        )
                    })?;
            }
            "tag" => {
                argument.require_no_text()?;
                let wanted = tag_filter.get_or_insert_with(BTreeSet::new);
                for entry in &argument.children {
                    if entry.name != "entry" {
                        return Err(PanError::malformed(format!(
                            "unexpected <{}> in <tag>",
                            entry.name
                        )));
                    }
                    let name = entry.attr("name").ok_or_else(|| {
                        PanError::malformed("<tag><entry> needs a name attribute")
                    })?;
                    wanted.insert(name.to_owned());
                }
            }
            "ip" => {
                let text = argument.leaf_text()?;
                ip_filter = Some(text.parse().map_err(|_| {
                    PanError::malformed(format!("<ip> {text:?} is not an IP address"))
                })?);
            }
            "all" => {}
            other => {
                return Err(PanError::new(
                    1,
                    format!(
                        "unknown command: show -> object -> registered-ip -> {other} is unexpected"
                    ),
                ))
            }
        }
    }

    let mut state = shared.lock();
    state.lapse();
    let page: Vec<(&IpAddr, &BTreeSet<String>)> = state
        .registered
        .iter()
        .filter(|(ip, _)| ip_filter.is_none_or(|wanted| wanted == **ip))
        .filter(|(_, tags)| {
            tag_filter
                .as_ref()
                .is_none_or(|wanted| tags.iter().any(|tag| wanted.contains(tag)))
        })
        .skip(start - 1)
        .take(limit)
        .collect();
    let mut body = String::from("<response status=\"success\"><result>\n");
    for (ip, tags) in &page {
        let _ = write!(
            body,
            "  <entry ip=\"{ip}\" from_agent=\"0\" persistent=\"1\"><tag>"
        );
        for tag in &**tags {
            let _ = write!(body, "<member>{}</member>", escape(tag.as_str()));
        }
        body.push_str("</tag></entry>\n");
    }
    let _ = write!(
        body,
        "  <count>{}</count>\n</result></response>",
        page.len()
    );
    Ok(Reply::ok(body))
}

fn show_job(shared: &Shared, root: &Element) -> Result<Reply, PanError> {
    let id_text = root
        .child("jobs")
        .and_then(|jobs| jobs.child("id"))
        .ok_or_else(|| PanError::malformed("expected <show><jobs><id>"))?
        .leaf_text()?;
    let id: usize = id_text
        .parse()
        .map_err(|_| PanError::malformed(format!("job id {id_text:?} is not a number")))?;
    let state = shared.lock();
    let Some(job) = id.checked_sub(1).and_then(|index| state.jobs.get(index)) else {
        return Ok(Reply::line_error(None, &format!("job {id} not found")));
    };
    let (date, time) = utc_date_time(job.enqueued_unix);
    Ok(Reply::ok(format!(
        "<response status=\"success\"><result><job><tenq>{date} {time}</tenq><tdeq>{time}</tdeq><id>{id}</id>\
         <user>{user}</user><type>Commit</type><status>FIN</status><queued>NO</queued><stoppable>no</stoppable>\
         <result>OK</result><tfin>{time}</tfin><description>{description}</description><positionInQ>0</positionInQ>\
         <progress>100</progress><details><line>Configuration committed successfully</line></details><warnings/></job>\
         </result></response>",
        user = escape(shared.config.user.as_str()),
        description = escape(job.description.as_str()),
    )))
}

fn commit(shared: &Shared, params: &Params) -> Reply {
    shared.lock().stats.commits += 1;
    let description = match params.get("cmd") {
        None => String::new(),
        Some(cmd) => match parse_xml(cmd) {
            Err(problem) => return Reply::malformed(&problem),
            Ok(root) if root.name != "commit" => {
                return Reply::malformed(&format!("expected <commit>, found <{}>", root.name))
            }
            Ok(root) => match root.child("description").map(Element::leaf_text) {
                None => String::new(),
                Some(Ok(text)) => text.to_owned(),
                Some(Err(error)) => return Reply::malformed(&error.message),
            },
        },
    };
    let enqueued_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let mut state = shared.lock();
    state.jobs.push(Job {
        description,
        enqueued_unix,
    });
    let id = state.jobs.len();
    Reply::ok(format!(
        "<response status=\"success\" code=\"19\"><result><msg><line>Commit job enqueued with jobid {id}</line></msg><job>{id}</job></result></response>"
    ))
}

fn config(params: &Params) -> Reply {
    let action = params.get("action").map(String::as_str);
    let needs_element = matches!(action, Some("set" | "edit"));
    match action {
        Some("set" | "edit" | "delete" | "get" | "show") => {}
        Some(other) => return Reply::bad_request(&format!("Invalid action \"{other}\"")),
        None => return Reply::bad_request("Missing required parameter \"action\""),
    }
    if !params.contains_key("xpath") {
        return Reply::bad_request("Missing required parameter \"xpath\"");
    }
    if needs_element && !params.contains_key("element") {
        return Reply::bad_request("Missing required parameter \"element\"");
    }
    if matches!(action, Some("get" | "show")) {
        // Not found: configuration is not modelled (config_get_response_not_found.xml).
        Reply::ok("<response status=\"success\" code=\"7\"><result/></response>".to_owned())
    } else {
        Reply::ok(
            "<response status=\"success\" code=\"20\"><msg>command succeeded</msg></response>"
                .to_owned(),
        )
    }
}

// ---------------------------------------------------------------------------
// /_sim/ control endpoints

async fn sim_registered(State(shared): State<Arc<Shared>>) -> Json<BTreeMap<String, Vec<String>>> {
    let mut state = shared.lock();
    state.lapse();
    Json(state.registered_view())
}

async fn sim_stats(State(shared): State<Arc<Shared>>) -> Json<PanosStats> {
    let mut state = shared.lock();
    state.lapse();
    Json(state.stats_view())
}

async fn sim_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> Response {
    if let Err(problem) = faults.validate() {
        return (StatusCode::BAD_REQUEST, problem).into_response();
    }
    debug!(?faults, "PAN-OS simulator faults set");
    shared.lock().faults = faults;
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_expire_keys(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().key_generation += 1;
    StatusCode::NO_CONTENT
}

async fn sim_reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    *shared.lock() = SimState::default();
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

// ---------------------------------------------------------------------------
// User-ID messages

#[derive(Debug)]
enum UidOp {
    Register {
        ip: IpAddr,
        tags: Vec<Member>,
    },
    /// `tags: None` removes every tag of the address.
    Unregister {
        ip: IpAddr,
        tags: Option<Vec<String>>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UidNoteKind {
    Register,
    Unregister,
}

struct UidNote {
    kind: UidNoteKind,
    ip: IpAddr,
    message: String,
}

impl UidNote {
    fn register(ip: IpAddr, message: String) -> Self {
        Self {
            kind: UidNoteKind::Register,
            ip,
            message,
        }
    }

    fn unregister(ip: IpAddr, message: String) -> Self {
        Self {
            kind: UidNoteKind::Unregister,
            ip,
            message,
        }
    }
}

/// A refusal with its PAN-OS error code.
#[derive(Debug)]
struct PanError {
    code: u16,
    message: String,
}

impl PanError {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn malformed(message: impl Into<String>) -> Self {
        Self::new(18, message)
    }
}

/// Parses and validates a whole `<uid-message>`; nothing is applied unless
/// every part of it is acceptable.
fn parse_uid_message(xml: &str) -> Result<Vec<UidOp>, PanError> {
    let root = parse_xml(xml).map_err(PanError::malformed)?;
    if root.name != "uid-message" {
        return Err(PanError::malformed(format!(
            "expected root element <uid-message>, found <{}>",
            root.name
        )));
    }
    root.require_no_text()?;
    let mut version = None;
    let mut kind = None;
    let mut payload = None;
    for child in &root.children {
        let slot = match child.name.as_str() {
            "version" => &mut version,
            "type" => &mut kind,
            "payload" => &mut payload,
            other => {
                return Err(PanError::malformed(format!(
                    "unexpected element <{other}> in <uid-message>"
                )))
            }
        };
        if slot.replace(child).is_some() {
            return Err(PanError::malformed(format!(
                "duplicate <{}> in <uid-message>",
                child.name
            )));
        }
    }
    let version = version.ok_or_else(|| PanError::malformed("<uid-message> lacks <version>"))?;
    if version.leaf_text()? != "1.0" {
        return Err(PanError::malformed(format!(
            "unsupported uid-message version {:?}, expected 1.0",
            version.leaf_text()?
        )));
    }
    let kind = kind.ok_or_else(|| PanError::malformed("<uid-message> lacks <type>"))?;
    if kind.leaf_text()? != "update" {
        return Err(PanError::malformed(format!(
            "unsupported uid-message type {:?}, expected update",
            kind.leaf_text()?
        )));
    }
    let payload = payload.ok_or_else(|| PanError::malformed("<uid-message> lacks <payload>"))?;
    payload.require_no_text()?;

    let mut ops = Vec::new();
    for block in &payload.children {
        let register = match block.name.as_str() {
            "register" => true,
            "unregister" => false,
            other => {
                return Err(PanError::malformed(format!(
                    "unsupported element <{other}> in <payload>: the simulator models register and unregister"
                )))
            }
        };
        block.require_no_text()?;
        for entry in &block.children {
            if entry.name != "entry" {
                return Err(PanError::malformed(format!(
                    "unexpected element <{}> in <{}>",
                    entry.name, block.name
                )));
            }
            let (ip, tags) = parse_uid_entry(entry, &block.name)?;
            ops.push(if register {
                let tags = tags.ok_or_else(|| {
                    PanError::malformed(format!("<register><entry ip=\"{ip}\"> has no <tag>"))
                })?;
                UidOp::Register { ip, tags }
            } else {
                UidOp::Unregister {
                    ip,
                    tags: tags.map(|tags| tags.into_iter().map(|(tag, _)| tag).collect()),
                }
            });
        }
    }
    Ok(ops)
}

/// A tag of a register entry, with its `timeout` attribute in seconds, if
/// any.
type Member = (String, Option<u64>);

/// One `<entry ip="..">` with its optional `<tag>` members.
fn parse_uid_entry(
    entry: &Element,
    block: &str,
) -> Result<(IpAddr, Option<Vec<Member>>), PanError> {
    let ip_text = entry
        .attr("ip")
        .ok_or_else(|| PanError::malformed(format!("<{block}><entry> lacks the ip attribute")))?;
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| PanError::malformed(format!("invalid ip {ip_text:?} in <{block}>")))?;
    entry.require_no_text()?;
    let mut tags: Option<Vec<Member>> = None;
    for tag in &entry.children {
        if tag.name != "tag" {
            return Err(PanError::malformed(format!(
                "unexpected element <{}> in <{block}><entry ip=\"{ip_text}\">",
                tag.name
            )));
        }
        tag.require_no_text()?;
        if tag.children.is_empty() {
            return Err(PanError::malformed(format!(
                "<tag> without <member> for ip {ip_text} in <{block}>"
            )));
        }
        let collected = tags.get_or_insert_with(Vec::new);
        for member in &tag.children {
            collected.push(parse_member(member, ip_text)?);
        }
    }
    Ok((ip, tags))
}

fn parse_member(member: &Element, ip_text: &str) -> Result<Member, PanError> {
    if member.name != "member" {
        return Err(PanError::malformed(format!(
            "unexpected element <{}> in <tag> for ip {ip_text}",
            member.name
        )));
    }
    let timeout = match member.attr("timeout") {
        Some(timeout) => {
            let seconds = timeout
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|seconds| *seconds <= MAX_TIMEOUT_SECS)
                .ok_or_else(|| {
                    PanError::malformed(format!(
                        "invalid timeout {timeout:?} for ip {ip_text}: seconds from 0 to {MAX_TIMEOUT_SECS}"
                    ))
                })?;
            Some(seconds)
        }
        None => None,
    };
    let name = member.leaf_text()?;
    if name.is_empty() {
        return Err(PanError::malformed(format!(
            "empty tag <member> for ip {ip_text}"
        )));
    }
    if name.chars().count() > MAX_TAG_CHARS {
        return Err(PanError::new(
            12,
            format!("invalid object: tag name is longer than {MAX_TAG_CHARS} characters for ip {ip_text}"),
        ));
    }
    Ok((name.to_owned(), timeout))
}

// ---------------------------------------------------------------------------
// A minimal XML tree, enough for the small documents the API takes

#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    /// All character data directly inside, entities and CDATA resolved.
    text: String,
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|child| child.name == name)
    }

    /// The trimmed text of an element that must hold nothing else.
    fn leaf_text(&self) -> Result<&str, PanError> {
        if let Some(child) = self.children.first() {
            return Err(PanError::malformed(format!(
                "unexpected element <{}> in <{}>",
                child.name, self.name
            )));
        }
        Ok(self.text.trim())
    }

    /// Containers may hold whitespace between elements, nothing else.
    fn require_no_text(&self) -> Result<(), PanError> {
        if self.text.trim().is_empty() {
            Ok(())
        } else {
            Err(PanError::malformed(format!(
                "unexpected text {:?} in <{}>",
                self.text.trim(),
                self.name
            )))
        }
    }
}

/// Parses one XML document into a tree, refusing anything not well formed,
/// DOCTYPEs (no entity games) and nesting deeper than [`MAX_XML_DEPTH`].
fn parse_xml(input: &str) -> Result<Element, String> {
    let mut reader = Reader::from_str(input);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader.read_event().map_err(|error| {
            format!("malformed XML at byte {}: {error}", reader.error_position())
        })?;
        let decoder = reader.decoder();
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_XML_DEPTH {
                    return Err(format!("XML nested deeper than {MAX_XML_DEPTH} elements"));
                }
                if root.is_some() {
                    return Err("malformed XML: more than one root element".to_owned());
                }
                stack.push(element_from(&start, &reader)?);
            }
            Event::Empty(start) => {
                if root.is_some() && stack.is_empty() {
                    return Err("malformed XML: more than one root element".to_owned());
                }
                let element = element_from(&start, &reader)?;
                attach(&mut stack, &mut root, element);
            }
            Event::End(_) => {
                // quick-xml has already checked that the names match.
                let element = stack.pop().ok_or_else(|| {
                    "malformed XML: closing tag without an opening one".to_owned()
                })?;
                attach(&mut stack, &mut root, element);
            }
            Event::Text(text) => {
                let text = text
                    .xml10_content()
                    .map_err(|error| format!("malformed XML text: {error}"))?;
                push_text(&mut stack, &text)?;
            }
            Event::CData(data) => {
                let data = data
                    .xml10_content()
                    .map_err(|error| format!("malformed XML CDATA: {error}"))?;
                push_text(&mut stack, &data)?;
            }
            Event::GeneralRef(reference) => {
                let character = reference
                    .resolve_char_ref()
                    .map_err(|error| format!("malformed character reference: {error}"))?;
                let resolved = if let Some(character) = character {
                    character.to_string()
                } else {
                    let name = decoder
                        .decode(&reference)
                        .map_err(|error| format!("malformed entity reference: {error}"))?;
                    resolve_predefined_entity(&name)
                        .ok_or_else(|| format!("malformed XML: unknown entity &{name};"))?
                        .to_owned()
                };
                push_text(&mut stack, &resolved)?;
            }
            Event::DocType(_) => return Err("malformed XML: DOCTYPE is not accepted".to_owned()),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(format!("malformed XML: <{}> is never closed", open.name));
    }
    root.ok_or_else(|| "malformed XML: no root element".to_owned())
}

fn element_from(start: &BytesStart<'_>, reader: &Reader<&[u8]>) -> Result<Element, String> {
    let decoder = reader.decoder();
    let name = decoder
        .decode(start.name().as_ref())
        .map_err(|error| format!("malformed element name: {error}"))?
        .into_owned();
    let mut attrs = Vec::new();
    for attribute in start.attributes() {
        let attribute =
            attribute.map_err(|error| format!("malformed attribute in <{name}>: {error}"))?;
        let key = decoder
            .decode(attribute.key.as_ref())
            .map_err(|error| format!("malformed attribute name in <{name}>: {error}"))?
            .into_owned();
        let value = attribute
            .decode_and_unescape_value(decoder)
            .map_err(|error| format!("malformed value of {key} in <{name}>: {error}"))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Element::default()
    })
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, element: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

fn push_text(stack: &mut [Element], text: &str) -> Result<(), String> {
    match stack.last_mut() {
        Some(open) => {
            open.text.push_str(text);
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err("malformed XML: text outside the root element".to_owned()),
    }
}

/// `("YYYY/MM/DD", "HH:MM:SS")` in UTC, the job timestamps' format.
fn utc_date_time(unix: u64) -> (String, String) {
    let days = unix / 86_400;
    let seconds = unix % 86_400;
    // Howard Hinnant's days-to-civil algorithm, for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (
        format!("{year:04}/{month:02}/{day:02}"),
        format!(
            "{:02}:{:02}:{:02}",
            seconds / 3_600,
            seconds % 3_600 / 60,
            seconds % 60
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_timestamps_are_formatted_in_utc() {
        assert_eq!(
            utc_date_time(1_749_321_662),
            ("2025/06/07".to_owned(), "18:41:02".to_owned())
        );
        assert_eq!(
            utc_date_time(0),
            ("1970/01/01".to_owned(), "00:00:00".to_owned())
        );
    }

    #[test]
    fn the_xml_tree_resolves_entities_cdata_and_self_closing_elements() {
        let root = parse_xml(
            "<?xml version=\"1.0\"?><a x='1&amp;2'><b/><c>t&apos;<![CDATA[<x>]]>&#65;</c></a>",
        )
        .expect("well formed");
        assert_eq!(root.attr("x"), Some("1&2"));
        assert_eq!(root.children.len(), 2);
        assert_eq!(root.children[1].text, "t'<x>A");
    }

    #[test]
    fn the_xml_tree_refuses_mismatched_and_unclosed_elements() {
        assert!(parse_xml("<a><b></a>").is_err());
        assert!(parse_xml("<a>").is_err());
        assert!(parse_xml("<a/><b/>").is_err());
        assert!(parse_xml("").is_err());
        assert!(parse_xml("<a>&bogus;</a>").is_err());
    }
}
