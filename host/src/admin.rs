//! The admin listener: health, readiness, Prometheus metrics, the operator
//! API and a status page, on a port of its own.
//!
//! It is separate from the notification listener because the two face
//! different people: Prism's listener must be reachable from the cluster,
//! while this one lets an operator replay or drop events and should stay on
//! loopback, or behind a token when it cannot (the configuration refuses a
//! non-loopback address without one), over TLS (`admin.tls`) so that the
//! token does not cross the network in the clear.
//!
//! Everything here reads the handles the running host already shares — the
//! ledger, the plugin registry, the dispatcher's counters, the event source
//! and the listener's counts — so nothing is counted twice and nothing can
//! drift. Nothing global is installed either: each [`AdminState`] owns its
//! metrics registry, so several hosts in one process (as in the tests) never
//! see each other's numbers.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | `ok` while the process runs; the only route without the token |
//! | `GET /readyz` | 200 once the listener accepts, the ledger is open and a cluster is registered; else 503 with the reasons |
//! | `GET /metrics` | Prometheus (OpenMetrics) text |
//! | `GET /` | the status page (`admin/status.html`, inline CSS and JS) |
//! | `GET /api/plugins`, `POST /api/plugins/reload` | plugins with state, counts and backlog; rescan the plugins directory |
//! | `GET /api/clusters`, `POST /api/reconcile` | clusters and their webhook; reconcile now |
//! | `GET /api/hosts` | the hosts sharing a JetStream ledger, their partitions and lag; `null` for a host alone |
//! | `GET /api/dlq`, `POST /api/dlq/replay`, `POST /api/dlq/drop` | dead letters |
//! | `POST /api/replay` | redeliver a plugin's events since a time |
//!
//! The request and answer bodies are the types in [`api`]; [`client`] is the
//! CLI side that speaks them.

pub mod api;
pub mod client;
mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::dispatch::Dispatcher;
use crate::event::matches;
use crate::ledger::{DeadLetterCursor, LedgerError, Membership, SharedLedger};
use crate::registry::Registry;
use crate::reload::{self, Reloader};
use crate::secret::Secret;
use crate::serve::BodyError;
use crate::source::{EventSource, SourceError};
use crate::telemetry::{HandleDurations, ListenerStats};
use prismhook_core::text::LogThrottle;

use api::{
    ClusterReport, Count, DeadLetters, DlqQuery, DlqSelection, PluginReport, Readiness,
    ReconcileRequest, ReconcileResult, ReplayRequest,
};

/// The status page: one self-contained file, no build step.
const STATUS_PAGE: &str = include_str!("admin/status.html");

/// Most dead letters one `GET /api/dlq` returns.
const DLQ_LIMIT_MAX: usize = 10_000;
/// About the most bytes of bodies and reasons one page of dead letters holds
/// (it ends after the letter that reaches it): 10,000 letters of 1 MiB
/// bodies would be 10 GiB in the host's memory, then on the wire.
const DLQ_PAGE_BYTES: usize = 8 << 20;
/// Dead letters read from the ledger at a time while a page fills, so that
/// what is read past the page's bytes stays small.
const DLQ_READ_CHUNK: usize = 16;

/// The host's shared handles the admin API reads and acts on. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub ledger: SharedLedger,
    pub registry: Registry,
    pub dispatcher: Dispatcher,
    /// Where events come from; its endpoints are the API's clusters.
    pub source: Arc<dyn EventSource>,
    pub listener_stats: Arc<ListenerStats>,
    /// What the listener's connection limits turned away.
    pub listener_serve: Arc<crate::serve::ServeStats>,
    pub reloader: Reloader,
    /// For the plugins' outbound request counts.
    pub runtime: Arc<crate::runtime::Runtime>,
    /// When set, every route but `/healthz` needs `Authorization: Bearer`.
    pub token: Option<Secret>,
    /// Host names (besides IP addresses and `localhost`) requests may name
    /// in `Host`; others are refused, which defeats DNS rebinding.
    pub hosts: Vec<String>,
    /// Whether the notification listener accepts. Clear it when shutdown
    /// begins, so that `/readyz` turns 503 before the listener stops.
    pub ready: Arc<AtomicBool>,
    /// `handle` durations, recorded by the dispatcher when it is given this
    /// handle; rendered as a histogram per plugin.
    pub handle_durations: HandleDurations,
    /// A request's body must arrive within this (the listener's
    /// `body_read_timeout`), or the request is answered 408.
    pub body_read_timeout: Duration,
}

impl AdminState {
    /// Marks the host (not) ready; `/readyz` follows at once.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// What the handlers share: the state and the metrics registry built on it.
struct Shared {
    state: AdminState,
    metrics: metrics::Metrics,
    /// Refused requests are logged at most this often: a peer without the
    /// token must not fill the host's log.
    refusals: LogThrottle,
}

/// Refused requests logged per minute; the rest are counted, and the next
/// line logged says how many.
const REFUSALS_LOGGED_PER_MINUTE: u32 = 10;

/// Most bytes of an operator request's body (axum's own default for JSON):
/// filters, or a selection of some hundred thousand dead letters by id.
const MAX_BODY_BYTES: usize = 2 << 20;

/// Most characters of a peer's header quoted in a log line or an answer.
const QUOTED_HEADER_BYTES: usize = 100;

type Admin = State<Arc<Shared>>;

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    state: AdminState,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: crate::serve::ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, token = state.token.is_some(), tls = tls.is_some(), "admin API listening");
    }
    let router = router(state);
    let stats = Arc::default();
    crate::serve::serve("admin", listener, router, tls, limits, stats, shutdown).await;
}

/// The admin routes, for [`serve`] or for calling without a socket.
pub fn router(state: AdminState) -> Router {
    let metrics = metrics::Metrics::new(&state);
    let shared = Arc::new(Shared {
        state,
        metrics,
        refusals: LogThrottle::new(REFUSALS_LOGGED_PER_MINUTE, Duration::from_secs(60)),
    });
    let protected = Router::new()
        .route("/", get(status_page))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/plugins", get(plugins))
        .route("/api/plugins/reload", post(reload_plugins))
        .route("/api/clusters", get(clusters))
        .route("/api/hosts", get(hosts))
        .route("/api/reconcile", post(reconcile))
        .route("/api/dlq", get(dlq_list))
        .route("/api/dlq/replay", post(dlq_replay))
        .route("/api/dlq/drop", post(dlq_drop))
        .route("/api/replay", post(replay))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            read_body_in_time,
        ))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            refuse_foreign_sites,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(protected)
        .layer(middleware::from_fn(trace_request))
        .with_state(shared)
}

/// Logs each request by method and path; never the query, which may hold
/// the status page's token.
async fn trace_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "admin request");
    response
}

/// Refuses what a browser sends on another site's behalf. Without a token
/// (the loopback default) any page a local browser opens could otherwise
/// POST to the API, or reach it under its own domain name resolved to
/// 127.0.0.1 (DNS rebinding). So the `Host` must be an IP address,
/// `localhost` or a configured `admin.hosts` name, and a state-changing
/// request that a browser marks as cross-site (`Sec-Fetch-Site`), or whose
/// `Origin` is not this API, is refused. The CLI sends neither header.
async fn refuse_foreign_sites(State(shared): Admin, req: Request, next: Next) -> Response {
    match foreign_site(&req, &shared.state.hosts) {
        None => next.run(req).await,
        Some(why) => {
            if let Some(held_back) = shared.refusals.admit() {
                tracing::warn!(path = %quoted(req.uri().path()), held_back, "admin request refused: {why}");
            }
            ApiError::Forbidden(why).into_response()
        }
    }
}

/// What a peer sent, shortened and on one line, for a log line or an
/// answer.
fn quoted(text: &str) -> String {
    let text = prismhook_core::text::truncate(text.to_owned(), QUOTED_HEADER_BYTES);
    prismhook_core::text::one_line(&text).into_owned()
}

/// Why `req` looks like a browser acting for another site, if it does.
fn foreign_site(req: &Request, hosts: &[String]) -> Option<String> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header(header::HOST.as_str())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(host) = host.as_deref().filter(|h| !known_host(h, hosts)) {
        return Some(format!(
            "`Host: {}` is not a name of this admin API; add it to `admin.hosts`",
            quoted(host)
        ));
    }
    if matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) {
        return None;
    }
    if let Some(site) = header("sec-fetch-site").filter(|s| !matches!(*s, "same-origin" | "none")) {
        return Some(format!(
            "a {} request cannot change anything here",
            quoted(site)
        ));
    }
    let own = |origin: &str| {
        origin
            .split_once("://")
            .is_some_and(|(_, authority)| Some(authority) == host.as_deref())
    };
    header("origin").filter(|o| !own(o)).map(|origin| {
        format!(
            "requests from `{}` cannot change anything here",
            quoted(origin)
        )
    })
}

/// Whether `host` (a `Host` header: name or address, optional port) names
/// this API: any IP address (a rebound name never arrives as one),
/// `localhost`, or one of `configured`.
fn known_host(host: &str, configured: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || configured
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name) || c.eq_ignore_ascii_case(host))
}

async fn require_token(State(shared): Admin, req: Request, next: Next) -> Response {
    let Some(expected) = &shared.state.token else {
        return next.run(req).await;
    };
    // A browser cannot send a header when it opens the status page, so the
    // page (and only the page, which holds no data) also takes `?token=`.
    let presented = bearer(req.headers()).or_else(|| match req.uri().path() {
        "/" => query_token(req.uri()),
        _ => None,
    });
    if presented.is_some_and(|p| expected.matches(p.as_bytes())) {
        return next.run(req).await;
    }
    if let Some(held_back) = shared.refusals.admit() {
        tracing::warn!(
            path = %quoted(req.uri().path()),
            held_back,
            "admin request with a wrong or missing token refused"
        );
    }
    let mut r = ApiError::Unauthorized.into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"prismhook admin\""),
    );
    r
}

/// Reads the body of an authorised request, whole, within the listener's
/// `body_read_timeout` (408) and [`MAX_BODY_BYTES`] (413), before its
/// handler: [`crate::serve::read_body`].
async fn read_body_in_time(State(shared): Admin, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let timeout = shared.state.body_read_timeout;
    match crate::serve::read_body(body, MAX_BODY_BYTES, timeout).await {
        Ok(bytes) => {
            let req = Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(req).await
        }
        Err(e) => closing(ApiError::Body(e).into_response()),
    }
}

/// `r`, ending its connection: what is left of the request is not read.
fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn query_token(uri: &Uri) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Why an admin request failed, as the operator should read it.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("wrong or missing token: send `Authorization: Bearer <admin.token>`")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Body(BodyError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<SourceError> for ApiError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::UnknownEndpoint { .. } => ApiError::NotFound(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, self.to_string()),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, self.to_string()),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, self.to_string()),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, self.to_string()),
            ApiError::Body(e) => (e.status(), self.to_string()),
            ApiError::Ledger(LedgerError::Closed) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger is closed: the host is shutting down".to_owned(),
            ),
            ApiError::Ledger(
                e @ (LedgerError::ReplayStopped { .. } | LedgerError::Backpressure { .. }),
            ) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            ApiError::Ledger(e) => {
                // The detail (paths, database errors) belongs in the log.
                tracing::error!("admin API: {e}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the ledger failed; see the host's log".to_owned(),
                )
            }
        };
        (status, Json(api::Error { error: message })).into_response()
    }
}

async fn status_page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // The URL may carry the token: keep it out of Referer headers.
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; \
                 style-src 'unsafe-inline'; img-src data:",
            ),
        ],
        Html(STATUS_PAGE),
    )
        .into_response()
}

async fn readyz(State(shared): Admin) -> Response {
    let state = &shared.state;
    let mut reasons = Vec::new();
    if !state.ready.load(Ordering::Relaxed) {
        reasons.push(
            "the notification listener is not accepting (starting or shutting down)".to_owned(),
        );
    }
    if let Err(e) = state.ledger.check().await {
        reasons.push(format!("the ledger is not readable: {e}"));
    }
    let clusters = state.source.status();
    if !clusters.is_empty() && !clusters.iter().any(|c| c.registered) {
        for c in &clusters {
            reasons.push(match &c.last_error {
                Some(e) => format!("cluster `{}`: webhook not registered: {e}", c.name),
                None => format!("cluster `{}`: webhook not registered yet", c.name),
            });
        }
    }
    let ready = reasons.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, reasons })).into_response()
}

async fn metrics_text(State(shared): Admin) -> Response {
    match shared.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!("admin API: cannot render metrics: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot render metrics; see the host's log\n",
            )
                .into_response()
        }
    }
}

async fn plugins(State(shared): Admin) -> Result<Json<Vec<PluginReport>>, ApiError> {
    let state = &shared.state;
    Ok(Json(api::plugin_reports(
        state.registry.status(),
        state.dispatcher.counters(),
        state.dispatcher.quarantined(),
        state.ledger.backlog()?,
    )))
}

async fn reload_plugins(State(shared): Admin) -> Json<Vec<reload::Report>> {
    Json(shared.state.reloader.reload().await)
}

async fn clusters(State(shared): Admin) -> Json<Vec<ClusterReport>> {
    Json(
        shared
            .state
            .source
            .status()
            .into_iter()
            .map(ClusterReport::from)
            .collect(),
    )
}

/// The prismhook hosts sharing this host's ledger; `null` for a host alone.
async fn hosts(State(shared): Admin) -> Json<Option<Membership>> {
    Json(shared.state.ledger.membership())
}

/// Reconciles now and waits, so the operator sees each plugin's summary.
async fn reconcile(
    State(shared): Admin,
    body: Option<Json<ReconcileRequest>>,
) -> Result<Json<Vec<ReconcileResult>>, ApiError> {
    let cluster = body.and_then(|Json(b)| b.cluster);
    let reports = shared.state.source.reconcile(cluster.as_deref()).await?;
    Ok(Json(
        reports
            .into_iter()
            .map(|r| ReconcileResult {
                cluster: r.endpoint,
                plugins: r.plugins,
                error: r.error,
            })
            .collect(),
    ))
}

async fn dlq_list(
    State(shared): Admin,
    Query(q): Query<DlqQuery>,
) -> Result<Json<DeadLetters>, ApiError> {
    Ok(Json(
        dead_letter_page(&shared.state.ledger, &q, DLQ_PAGE_BYTES).await?,
    ))
}

/// One page of `GET /api/dlq`: up to the query's limit, and ending after the
/// letter whose body and reason reach `max_bytes`.
async fn dead_letter_page(
    ledger: &SharedLedger,
    q: &DlqQuery,
    max_bytes: usize,
) -> Result<DeadLetters, ApiError> {
    let limit = q.limit.unwrap_or(100).min(DLQ_LIMIT_MAX);
    let mut after = match (&q.after_plugin, q.after_event) {
        (Some(plugin), Some(event_id)) => Some(DeadLetterCursor {
            plugin: plugin.clone(),
            event_id,
        }),
        (None, None) => None,
        _ => {
            return Err(ApiError::BadRequest(
                "`after_plugin` and `after_event` go together: pass both (the last page's `next`) or neither".into(),
            ))
        }
    };
    let bodies = q.bodies.unwrap_or(true);
    let total = ledger
        .backlog()?
        .iter()
        .filter(|b| q.plugin.as_deref().is_none_or(|p| b.plugin == p))
        .map(|b| b.dead)
        .sum();
    let mut dead_letters = Vec::new();
    let mut bytes = 0;
    let mut cut = false;
    while !cut && dead_letters.len() < limit {
        let want = (limit - dead_letters.len()).min(DLQ_READ_CHUNK);
        let chunk = ledger
            .dead_letters(q.plugin.as_deref(), after.as_ref(), want)
            .await?;
        if chunk.is_empty() {
            break;
        }
        for mut letter in chunk {
            if !bodies {
                letter.event.body = String::new();
                letter.event.vm = None;
            }
            bytes += letter.event.body.len() + letter.reason.len();
            after = Some(letter.cursor());
            dead_letters.push(letter);
            if bytes >= max_bytes {
                cut = true;
                break;
            }
        }
    }
    // A page cut short, or full, may have more after it; a page that ran out
    // has none.
    let next = if cut || dead_letters.len() == limit {
        after
    } else {
        None
    };
    Ok(DeadLetters {
        total,
        dead_letters,
        next,
    })
}

async fn dlq_replay(
    State(shared): Admin,
    Json(sel): Json<DlqSelection>,
) -> Result<Json<Count>, ApiError> {
    let n = shared
        .state
        .ledger
        .replay_dead(sel.plugin.as_deref(), sel.ids.as_deref())
        .await?;
    tracing::info!(
        plugin = sel.plugin.as_deref().unwrap_or("*"),
        replayed = n,
        "dead letters replayed from the admin API"
    );
    Ok(Json(Count { count: n }))
}

async fn dlq_drop(
    State(shared): Admin,
    Json(sel): Json<DlqSelection>,
) -> Result<Json<Count>, ApiError> {
    // Dropping is final: an empty selection must not mean "everything" by
    // accident.
    if sel.plugin.is_none() && sel.ids.is_none() && !sel.all {
        return Err(ApiError::BadRequest(
            "name a `plugin`, event `ids`, or set `all: true` to drop every dead letter".into(),
        ));
    }
    let n = shared
        .state
        .ledger
        .drop_dead(sel.plugin.as_deref(), sel.ids.as_deref())
        .await?;
    tracing::warn!(
        plugin = sel.plugin.as_deref().unwrap_or("*"),
        dropped = n,
        "dead letters dropped from the admin API"
    );
    Ok(Json(Count { count: n }))
}

async fn replay(
    State(shared): Admin,
    Json(req): Json<ReplayRequest>,
) -> Result<Json<Count>, ApiError> {
    let state = &shared.state;
    // Deliveries for a plugin that is not loaded would wait for nobody.
    let Some(plugin) = state.registry.get(&req.plugin).and_then(|e| e.plugin) else {
        return Err(ApiError::NotFound(format!(
            "plugin `{}` is not loaded",
            req.plugin
        )));
    };
    let wanted = replayed_types(&plugin.info().subscriptions, req.event_types.as_deref())
        .map_err(|e| ApiError::BadRequest(format!("plugin `{}` {e}", req.plugin)))?;
    let n = state
        .ledger
        .replay_since(&req.plugin, req.since_ms, &wanted)
        .await?;
    Ok(Json(Count { count: n }))
}

/// What a replay gives a plugin: the types asked for that its
/// subscriptions cover, or all they cover. A plugin is never handed an event
/// it did not subscribe to (other kinds, other plugins' types).
fn replayed_types(
    subscriptions: &[String],
    asked: Option<&[String]>,
) -> Result<Vec<String>, String> {
    let Some(asked) = asked else {
        return match subscriptions {
            [] => Err("subscribes to no event types".into()),
            _ => Ok(subscriptions.to_vec()),
        };
    };
    // Either may be the narrower: `VM.ON` asked of a `VM.*` plugin, or
    // `VM.*` asked of a plugin of `VM.ON` and `VM.OFF`.
    let mut wanted: Vec<String> = Vec::new();
    for a in asked {
        for s in subscriptions {
            let narrower = if matches(s, a) {
                a
            } else if matches(a, s) {
                s
            } else {
                continue;
            };
            if !wanted.contains(narrower) {
                wanted.push(narrower.clone());
            }
        }
    }
    if wanted.is_empty() {
        return Err(format!(
            "subscribes to none of {}: it subscribes to {}",
            asked.join(", "),
            subscriptions.join(", ")
        ));
    }
    Ok(wanted)
}

/// Where a client reaches an admin listener bound to `listen`: the
/// loopback address of the same family when bound to all addresses.
pub fn reachable_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_gives_a_plugin_only_the_types_its_subscriptions_cover() {
        let subs = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let vm = subs(&["VM.ON", "VM.OFF"]);
        assert_eq!(replayed_types(&vm, None).unwrap(), vm);
        assert_eq!(
            replayed_types(&vm, Some(&subs(&["VM.OFF", "IMAGE.CREATE"]))).unwrap(),
            ["VM.OFF"]
        );
        assert_eq!(replayed_types(&vm, Some(&subs(&["VM.*"]))).unwrap(), vm);
        assert_eq!(
            replayed_types(&subs(&["VM.*"]), Some(&subs(&["vm.on"]))).unwrap(),
            ["vm.on"]
        );
        let e = replayed_types(&vm, Some(&subs(&["IMAGE.CREATE"]))).unwrap_err();
        assert_eq!(
            e,
            "subscribes to none of IMAGE.CREATE: it subscribes to VM.ON, VM.OFF"
        );
        assert!(replayed_types(&[], None).is_err());
    }

    #[test]
    fn the_bearer_scheme_is_read_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&h).as_deref(), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn the_page_token_is_read_from_the_query() {
        let uri: Uri = "/?x=1&token=a%2Bb".parse().unwrap();
        assert_eq!(query_token(&uri).as_deref(), Some("a+b"));
        assert_eq!(query_token(&"/".parse().unwrap()), None);
    }

    #[test]
    fn an_unspecified_bind_address_is_reached_on_loopback() {
        assert_eq!(
            reachable_addr("0.0.0.0:9100".parse().unwrap()),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            reachable_addr("[::]:9100".parse().unwrap()),
            "[::1]:9100".parse().unwrap()
        );
        assert_eq!(
            reachable_addr("10.1.2.3:9100".parse().unwrap()),
            "10.1.2.3:9100".parse().unwrap()
        );
    }

    /// A ledger holding one dead letter for `fw` per body, and one for
    /// `siem` of the last.
    async fn ledger_with_dead_letters(dir: &tempfile::TempDir, bodies: &[usize]) -> SharedLedger {
        use crate::ledger::{LedgerOptions, NewEvent, Outcome, RedbLedger};
        let ledger: SharedLedger =
            Arc::new(RedbLedger::open(LedgerOptions::new(dir.path().join("l.redb"))).unwrap());
        for (i, &len) in bodies.iter().enumerate() {
            let to = if i + 1 == bodies.len() {
                vec!["fw".to_owned(), "siem".to_owned()]
            } else {
                vec!["fw".to_owned()]
            };
            let event = NewEvent {
                cluster: "c1".into(),
                event_type: "VM.ON".into(),
                entity_kind: "vm".into(),
                entity_uuid: format!("vm-{i}"),
                dedupe_key: None,
                received_at_ms: 1,
                body: "x".repeat(len),
                vm: None,
            };
            ledger.append(event, to).await.unwrap();
        }
        for plugin in ["fw", "siem"] {
            let claimed = ledger.claim(plugin, 100).await.unwrap();
            let reject = Outcome::Reject {
                reason: "no".into(),
            };
            let results = claimed.iter().map(|d| (d.event.id, reject.clone()));
            ledger.complete(plugin, results.collect()).await.unwrap();
        }
        ledger
    }

    fn listed(page: &DeadLetters) -> Vec<(&str, u64, usize)> {
        page.dead_letters
            .iter()
            .map(|d| (d.plugin.as_str(), d.event.id, d.event.body.len()))
            .collect()
    }

    #[tokio::test]
    async fn a_page_of_dead_letters_ends_at_its_bytes_and_the_next_starts_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with_dead_letters(&dir, &[300, 300, 300, 300, 10]).await;
        let mut q = DlqQuery::default();

        // 1,000 bytes: the fourth letter reaches it (each reason is 2 bytes).
        let page = dead_letter_page(&ledger, &q, 1_000).await.unwrap();
        assert_eq!(page.total, 6);
        assert_eq!(
            listed(&page),
            [
                ("fw", 1, 300),
                ("fw", 2, 300),
                ("fw", 3, 300),
                ("fw", 4, 300)
            ]
        );
        let next = page
            .next
            .clone()
            .expect("a page cut short says where to go on");
        assert_eq!((next.plugin.as_str(), next.event_id), ("fw", 4));

        (q.after_plugin, q.after_event) = (Some(next.plugin), Some(next.event_id));
        let page = dead_letter_page(&ledger, &q, 1_000).await.unwrap();
        assert_eq!(listed(&page), [("fw", 5, 10), ("siem", 5, 10)]);
        assert_eq!(page.next, None, "the end");

        // At its limit a page says where the next starts; without bodies
        // the same page is smaller but lists the same letters.
        let q = DlqQuery {
            limit: Some(2),
            bodies: Some(false),
            ..Default::default()
        };
        let page = dead_letter_page(&ledger, &q, 1_000).await.unwrap();
        assert_eq!(listed(&page), [("fw", 1, 0), ("fw", 2, 0)]);
        assert_eq!(page.next.map(|n| n.event_id), Some(2));

        // Of one plugin only.
        let q = DlqQuery {
            plugin: Some("siem".into()),
            ..Default::default()
        };
        let page = dead_letter_page(&ledger, &q, 1_000).await.unwrap();
        assert_eq!((page.total, listed(&page)), (1, vec![("siem", 5, 10)]));
    }

    #[tokio::test]
    async fn a_dead_letter_cursor_needs_both_its_plugin_and_its_event() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with_dead_letters(&dir, &[10]).await;
        let q = DlqQuery {
            after_event: Some(1),
            ..Default::default()
        };
        let e = dead_letter_page(&ledger, &q, 1_000).await.unwrap_err();
        assert!(
            matches!(&e, ApiError::BadRequest(m) if m.contains("after_plugin")),
            "{e}"
        );
    }
}
