//! A loopback simulator of Cisco Secure Firewall Management Center's REST API,
//! limited to dynamic objects and their IP mappings, for the end-to-end tests
//! of the `cisco-fmc` plugin and the demo.
//!
//! It models what a dynamic-object sync relies on, with the answers a client
//! must survive. Wire formats come from Cisco's own documents and from the
//! clients that run against real FMCs; where neither pins a detail down the
//! choice is marked UNCONFIRMED.
//!
//! Sources:
//! - Cisco's OpenAPI for the `/api/fmc_config/v1` model (cdFMC copy):
//!   `api-evangelist/cisco-secure-firewall`
//!   `openapi/cisco-secure-firewall-object-api-openapi.yml` (from
//!   CiscoDevNet/scc-public-api-docs `cdo/cdfmc-openapi.yaml`): schemas
//!   `DynamicObject`, `DynamicObjectMappings`, `ErrorResponse`,
//!   `PagingContainer`; dynamic-object paths;
//! - the FMC Ansible documentation generated from the FMC spec:
//!   `CiscoDevNet/secure-firewall`
//!   `FMC/fmcansible_doc_latest_downloaded/{operations,components}/` (also
//!   `operations/get_all_domain.md` and `components/domain.md` for
//!   `info/domain`);
//! - the FMC REST API Quick Start Guide 6.2.2, "Connecting with a client"
//!   (token lifetime, three refreshes), and Cisco TechNote 215918 (a `curl`
//!   of `generatetoken` answering `HTTP/1.1 204`);
//! - Cisco DevNet's labs `CiscoDevNet/fmc-rest-api`
//!   `labs/firepower-restapi-{102,104,105}` (tokens, 120 requests a minute
//!   answered 429, 404 and 422 meanings);
//! - clients: `netascode/go-fmc` `client.go` (204 with an empty body on
//!   login and refresh, `DOMAIN_UUID` and `DOMAINS` headers, `items.0.
//!   serverVersion`, paging on `paging.next.0`, a missing `items` is an
//!   error); `CiscoDevNet/terraform-provider-fmc` (201 on create, 200 on
//!   delete, bulk mappings with only `dynamicObject.id`); `kaisero/fireREST`
//!   `fireREST/utils.py`, `fireREST/defaults.py` ("Access token invalid",
//!   400 "Duplicate Name", payload limit 2,048,000 bytes, page limit 1000);
//!   `daxm/fmcapi` `fmcapi/fmc.py` (follows `paging.next[0]` as an absolute
//!   URL, reads `DOMAINS` as JSON, 422 on an oversized payload);
//!   `CiscoDevNet/FMCAnsible` `plugins/httpapi/{client,fmc}.py` and issue
//!   #58 ("Access token invalid.", "Invalid refresh token", the `global`
//!   header); `aaronhackney/pycsfw` `pycsfw/models.py` (`DomainModel`:
//!   `uuid`, `name`, `type: "Domain"`).
//!
//! What it answers:
//! - `POST /api/fmc_platform/v1/auth/generatetoken` with HTTP Basic and an
//!   empty body: 204 with `X-auth-access-token`, `X-auth-refresh-token`,
//!   `DOMAIN_UUID` (the first configured domain, Global), `global` and
//!   `DOMAINS` (a JSON array of `{"name","uuid"}`); bad credentials 401
//!   "User authentication failed" (text as fireREST matches it). A second
//!   login does not end the first session (UNCONFIRMED).
//! - Access tokens serve for `token_lifetime` (30 min, as documented) or
//!   until `POST /_sim/tokens/expire`; then every `/api/` request with one
//!   gets 401 "Access token invalid.".
//! - `POST /api/fmc_platform/v1/auth/refreshtoken` with the latest
//!   access-refresh pair of a session (the access token may be expired):
//!   204 with a new pair, at most `max_refreshes` (3) times per login, then
//!   401 "Invalid refresh token". A refresh token serves for two token
//!   lifetimes from its issue (UNCONFIRMED: Cisco only says it ends with the
//!   session), and survives `/_sim/tokens/expire`, which models the access
//!   token's expiry, for which refreshing is the documented remedy.
//! - `GET /api/fmc_platform/v1/info/serverversion` ([`SERVER_VERSION`]; note
//!   go-fmc paces itself at 300 requests a minute for 7.4.1 and later, while
//!   the simulator's default limit is the documented 120) and
//!   `GET /api/fmc_platform/v1/info/domain` (and `.../info/domain/{uuid}`):
//!   `{"items":[{"uuid","name","type":"Domain"}], "links", "paging"}`. The
//!   item fields are FMC's `Domain` schema (Ansible `components/domain.md`)
//!   as clients read them (`items[].uuid`, `items[].name`); no captured
//!   answer of a real FMC was found, so the exact shape is UNCONFIRMED.
//! - Dynamic objects under `/api/fmc_config/v1/domain/{domainUUID}/object/`:
//!   `dynamicobjects` (list with `offset`, `limit` (default 25, capped at
//!   1000), `expanded`, `name=` exact and case-sensitive, `filter=
//!   nameStartsWith:X` / `ids:a,b` / `unusedOnly:true`, `includeCount`;
//!   POST one object 201, or a JSON array with `?bulk=true` 201
//!   `{"items":[...]}`; DELETE `?bulk=true&filter=ids:...` 200
//!   `{"items":[...]}`), `dynamicobjects/{objectId}` (id or name; GET, PUT
//!   200, DELETE 200 with the deleted object), `.../{objectId}/mappings`
//!   (GET `{"items":[{"mapping":"10.0.0.1"}]}` paged like lists; PUT
//!   `?action=add|remove|remove_all` 200 echoing the body) and
//!   `dynamicobjectmappings` (POST `{"add":[...],"remove":[...]}` 201 echoing
//!   the body). Lists always carry `items` (`[]` when empty), `links.self`
//!   and `paging {offset, limit, count, pages}`, plus `paging.next`, the
//!   absolute URLs of the remaining pages, except on the last page.
//!   Non-expanded items carry `id`, `name`, `type`, `links` only.
//! - Errors use FMC's envelope `{"error":{"category","messages":[{
//!   "description"}],"severity":"ERROR"}}`.
//!
//! Choices where the sources are silent (UNCONFIRMED), made to surface client
//! bugs rather than hide them:
//! - a duplicate name answers 400 VALIDATION `"Duplicate Name: <name>"`
//!   (fireREST maps 400 + "Duplicate Name" to "already exists");
//! - a name outside `^[a-zA-Z0-9_.+-]{1,128}$` (Cisco's Network-as-Code
//!   model), a description over 255 characters, a `type` other than
//!   `DynamicObject` or an `objectType` other than `IP` answer 400
//!   VALIDATION; an array without `bulk=true` too;
//! - malformed JSON answers 422 "Unprocessable Entity" (lab 105), and so does
//!   a body over [`MAX_PAYLOAD`] bytes, as fmcapi reports FMC doing;
//! - an unknown domain UUID answers 404 (FRAMEWORK) `"Domain <uuid> does not
//!   exist"` (the lab says 404 means a wrong URL; 403 is for domains a user
//!   may not use, which the simulator does not model);
//! - an unknown object answers 404 `Dynamic object "<x>" not found`; an
//!   unknown route 404 "Resource not found"; a wrong method 405;
//! - bulk mappings are validated as a whole first: an unknown object or a
//!   mapping that is not an IPv4/IPv6 address or CIDR answers 400 naming it
//!   and applies nothing; then adds are applied before removes;
//! - mappings are a set per object, stored canonically (`2001:DB8::1` reads
//!   back `2001:db8::1`, a CIDR keeps its address and length, so
//!   `10.0.0.5/24` stays `10.0.0.5/24` and `10.0.0.1/32` differs from
//!   `10.0.0.1`), listed sorted as text; adding one twice or removing an
//!   absent one is not an error;
//! - 429 (sliding 60-second window over every `/api/` request, counted once
//!   admitted) carries `Retry-After` with the seconds until the window frees
//!   and the description "Too Many Requests";
//! - unknown query parameters are ignored; each domain has its own objects
//!   (Global's objects are not inherited by child domains);
//! - header names go out in lower case (`domain_uuid`, as hyper writes them;
//!   FMC writes `DOMAIN_UUID`): HTTP header names are case-insensitive, and a
//!   client that looks them up otherwise has a bug worth finding.
//!
//! Not modelled: `DELETE .../object/dynamicobjectmappings` (bulk unmapping
//! by filter, 405), `POST .../object/bulkdynamicobjects` (404), objects in
//! use by policies, `agentId`/`topicName` semantics (stored and echoed
//! only), and the 10-connection cap.
//!
//! `/_sim/` routes control it and are never authenticated, rate-limited or
//! faulted. Faults (latency, failing statuses, dropped connections) are
//! injected per `/api/` request as in the BIG-IP and PAN-OS simulators. It
//! shares no code with the plugin.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, HOST};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
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

/// Where `prismhook sim fmc` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9446";
/// The Global domain's UUID, the same on every FMC.
pub const GLOBAL_DOMAIN: &str = "e276abec-e0f2-11e3-8169-6d9ed49b625f";
/// What `GET /api/fmc_platform/v1/info/serverversion` reports.
pub const SERVER_VERSION: &str = "7.4.2 (build 172)";
/// The largest request body FMC takes, in bytes (fireREST, fmcapi and the
/// Terraform provider all use this figure).
pub const MAX_PAYLOAD: usize = 2_048_000;

/// Bodies are read up to this size so that an oversized one still gets an
/// answer instead of a connection reset mid-upload.
const BODY_READ_CAP: usize = 4 * MAX_PAYLOAD;
const DEFAULT_PAGE: usize = 25;
const MAX_PAGE: usize = 1000;
const MAX_NAME_LEN: usize = 128;
const MAX_DESCRIPTION_LEN: usize = 255;
const RATE_WINDOW: Duration = Duration::from_secs(60);
const OBJECT_TYPE: &str = "DynamicObject";
const MAPPINGS_TYPE: &str = "DynamicObjectMappings";
const API_CONFIG: &str = "/api/fmc_config/v1/domain";
const LOGIN_PATH: &str = "/api/fmc_platform/v1/auth/generatetoken";
const REFRESH_PATH: &str = "/api/fmc_platform/v1/auth/refreshtoken";

/// Credentials, token rules, the rate limit and the domains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FmcConfig {
    /// User name `generatetoken` expects.
    pub user: String,
    /// Password `generatetoken` expects.
    pub password: String,
    /// How long an access token serves.
    pub token_lifetime: Duration,
    /// How many times one login's tokens can be refreshed.
    pub max_refreshes: u32,
    /// Requests admitted per sliding 60 s window over all `/api/` requests;
    /// 0 means unlimited.
    pub rate_limit_per_minute: u32,
    /// `(name, uuid)`; the first is Global and the login domain, children
    /// are named `Global/<child>`.
    pub domains: Vec<(String, String)>,
}

impl Default for FmcConfig {
    fn default() -> Self {
        Self {
            user: "admin".to_owned(),
            password: "admin".to_owned(),
            token_lifetime: Duration::from_secs(30 * 60),
            max_refreshes: 3,
            rate_limit_per_minute: 120,
            domains: vec![("Global".to_owned(), GLOBAL_DOMAIN.to_owned())],
        }
    }
}

impl FmcConfig {
    fn validate(&self) -> Result<(), String> {
        if self.domains.is_empty() {
            return Err("at least one domain (Global) is required".to_owned());
        }
        let mut names = BTreeSet::new();
        let mut uuids = BTreeSet::new();
        for (name, uuid) in &self.domains {
            // Both travel in the `DOMAINS` header and in URLs.
            let header_safe =
                |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
            if !header_safe(name) || !header_safe(uuid) || uuid.contains(['/', ' ', '?', '#']) {
                return Err(format!(
                    "domain ({name:?}, {uuid:?}) needs a printable ASCII name and a UUID without spaces or /?#"
                ));
            }
            if !names.insert(name.as_str()) || !uuids.insert(uuid.to_ascii_lowercase()) {
                return Err(format!("domain ({name:?}, {uuid:?}) is configured twice"));
            }
        }
        Ok(())
    }
}

/// Counters since start or the last reset, as served by `GET /_sim/stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct FmcStats {
    /// Every `/api/` request received, faulted and refused ones included.
    pub requests: u64,
    /// Successful `generatetoken` calls.
    pub logins: u64,
    /// Successful `refreshtoken` calls.
    pub refreshes: u64,
    /// 401 answers of any kind.
    pub unauthorized: u64,
    /// Requests refused for an unknown or expired access token (counted in
    /// `unauthorized` too).
    pub expired_tokens: u64,
    /// 429 answers from the rate limit (the window or `rate_limit_next`), not
    /// injected faults.
    pub rate_limited: u64,
    /// Dynamic objects created through the API.
    pub objects_created: u64,
    /// Dynamic objects deleted through the API.
    pub objects_deleted: u64,
    /// Mappings that were not there before an API add.
    pub mappings_added: u64,
    /// Mappings that were there before an API remove.
    pub mappings_removed: u64,
    /// Authenticated `POST .../object/dynamicobjectmappings` requests,
    /// refused ones included.
    pub bulk_mapping_posts: u64,
    /// Non-2xx answers of any kind and dropped connections.
    pub errors: u64,
    /// Dynamic objects in all domains right now.
    pub objects: u64,
    /// Mappings of all dynamic objects right now.
    pub mappings: u64,
}

/// A running simulator. Dropping it stops the server too, but only
/// [`FmcSim::shutdown`] waits for that to finish.
pub struct FmcSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl FmcSim {
    /// Binds `addr` (port 0 picks a free port) and serves in a background task.
    pub async fn start(addr: SocketAddr, config: FmcConfig) -> anyhow::Result<FmcSim> {
        config
            .validate()
            .map_err(|problem| anyhow::anyhow!("FMC simulator configuration: {problem}"))?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the FMC simulator to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("reading the FMC simulator's bound address")?;
        let shared = Arc::new(Shared::new(config, addr));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            router(Arc::clone(&shared)),
            shutdown_rx,
            "FMC",
        ));
        debug!(%addr, "FMC simulator started");
        Ok(FmcSim {
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
        format!("http://{}", loopback(self.addr))
    }

    /// Every dynamic object with its sorted mappings, as `GET /_sim/mappings`:
    /// keyed by name in Global, `<domain name>:<name>` in other domains.
    pub fn mappings(&self) -> BTreeMap<String, Vec<String>> {
        self.shared.lock().mappings_view()
    }

    /// Global's dynamic objects, name -> id, as `GET /_sim/objects`.
    pub fn objects(&self) -> BTreeMap<String, String> {
        self.shared.lock().objects_view()
    }

    /// Counters, as `GET /_sim/stats`.
    pub fn stats(&self) -> FmcStats {
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
            panic!("FmcSim::set_faults: {problem}");
        }
        self.shared.lock().faults = faults;
    }

    /// Ends every access token issued so far, as `POST /_sim/tokens/expire`:
    /// the next request with one gets 401 "Access token invalid.", as after
    /// the token's 30 minutes. Refresh tokens keep serving.
    pub fn expire_tokens(&self) {
        self.shared.lock().expire_access_tokens();
    }

    /// Every access token issued (by login or refresh) since start or the
    /// last reset, expired or not, oldest first.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Every refresh token issued since start or the last reset, oldest first.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.shared.lock().issued_refresh.clone()
    }

    /// The next `n` `/api/` requests answer 429 with `Retry-After:
    /// <retry_after_secs>`, as `POST /_sim/ratelimit`.
    pub fn rate_limit_next(&self, n: u32, retry_after_secs: u64) {
        self.shared.lock().forced_limit = (n, retry_after_secs);
    }

    /// Creates an empty dynamic object in Global (if missing) and returns its
    /// id, like an object an administrator made by hand. Counts nothing.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid dynamic object name.
    pub fn create_object_directly(&self, name: &str) -> String {
        if let Err(problem) = check_name(name) {
            panic!("FmcSim::create_object_directly: {problem}");
        }
        self.shared.lock().create_direct(name)
    }

    /// Maps `ip` to Global's object `object` behind the API's back. Counts
    /// nothing.
    ///
    /// # Panics
    ///
    /// If the object does not exist or `ip` is not an address or CIDR.
    pub fn add_mapping_directly(&self, object: &str, ip: &str) {
        let mapping = canonical_mapping(ip)
            .unwrap_or_else(|problem| panic!("FmcSim::add_mapping_directly: {problem}"));
        let mut state = self.shared.lock();
        let Some(found) = state.domains[0].by_name_mut(object) else {
            panic!("FmcSim::add_mapping_directly: no dynamic object {object:?} in Global");
        };
        found.mappings.insert(mapping);
    }

    /// Unmaps `ip` from Global's object `object` behind the API's back.
    /// Counts nothing.
    ///
    /// # Panics
    ///
    /// If the object does not exist or `ip` is not an address or CIDR.
    pub fn remove_mapping_directly(&self, object: &str, ip: &str) {
        let mapping = canonical_mapping(ip)
            .unwrap_or_else(|problem| panic!("FmcSim::remove_mapping_directly: {problem}"));
        let mut state = self.shared.lock();
        let Some(found) = state.domains[0].by_name_mut(object) else {
            panic!("FmcSim::remove_mapping_directly: no dynamic object {object:?} in Global");
        };
        found.mappings.remove(&mapping);
    }

    /// The last `n` `/api/` requests, oldest first, as `GET /_sim/requests?n=`.
    pub fn requests(&self, n: usize) -> Vec<RequestRecord> {
        self.shared.lock().log.recent(n)
    }

    /// Back to no objects, sessions, stats, faults or log, as `POST /_sim/reset`.
    pub fn reset(&self) {
        let mut state = self.shared.lock();
        *state = SimState::initial(&self.shared.config);
    }

    /// Stops accepting, lets in-flight requests finish (up to a few seconds)
    /// and returns once the server task has ended.
    pub async fn shutdown(self) {
        // The receiver is gone only if the server already stopped.
        let _ = self.shutdown.send(true);
        if let Err(error) = self.server.await {
            warn!(%error, "FMC simulator task ended abnormally");
        }
    }
}

/// Serves until ctrl-c: `prismhook sim fmc --listen ADDR`.
pub async fn run(addr: SocketAddr, config: FmcConfig) -> anyhow::Result<()> {
    let user = config.user.clone();
    let sim = FmcSim::start(addr, config).await?;
    println!(
        "Cisco FMC REST simulator listening on {} (log in with POST {}{LOGIN_PATH}, Basic auth as {user}; \
         dynamic objects under {}{API_CONFIG}/{GLOBAL_DOMAIN}/object/dynamicobjects); \
         create objects with POST {}/_sim/objects/<name>; ctrl-c stops it",
        sim.addr(),
        sim.base_url(),
        sim.base_url(),
        sim.base_url()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    sim.shutdown().await;
    Ok(())
}

fn loopback(addr: SocketAddr) -> SocketAddr {
    let host = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(host, addr.port())
}

// ---------------------------------------------------------------------------
// Names and mappings

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "Invalid name {name:?}: a dynamic object name is 1 to {MAX_NAME_LEN} letters, digits, `_`, `.`, `+` or `-`"
        ))
    }
}

/// `2001:DB8::1` -> `2001:db8::1`; `10.0.0.5/24` stays as written (FMC's own
/// example keeps a host address with a prefix length).
fn canonical_mapping(raw: &str) -> Result<String, String> {
    let invalid = || format!("Invalid mapping {raw:?}: expected an IPv4 or IPv6 address or CIDR");
    let (address, length) = match raw.split_once('/') {
        Some((address, length)) => (address, Some(length)),
        None => (raw, None),
    };
    let address: IpAddr = address.parse().map_err(|_| invalid())?;
    match length {
        None => Ok(address.to_string()),
        Some(length) => {
            // `parse::<u8>` accepts a leading `+`, which is not CIDR.
            if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let length: u8 = length.parse().map_err(|_| invalid())?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            if length > max {
                return Err(invalid());
            }
            Ok(format!("{address}/{length}"))
        }
    }
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        rng.random::<u32>(),
        rng.random::<u16>(),
        rng.random_range(0..0x1000u16),
        rng.random_range(0x8000..0xc000u16),
        rng.random::<u64>() & 0xffff_ffff_ffff
    )
}

// ---------------------------------------------------------------------------
// State

struct Shared {
    config: FmcConfig,
    /// For absolute URLs when a request has no usable `Host`.
    addr: SocketAddr,
    state: Mutex<SimState>,
}

impl Shared {
    fn new(config: FmcConfig, addr: SocketAddr) -> Self {
        let state = SimState::initial(&config);
        Self {
            config,
            addr,
            state: Mutex::new(state),
        }
    }

    /// A panic while holding the lock cannot leave the state half-updated in a
    /// way that matters more than losing the simulator, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct DynObject {
    id: String,
    name: String,
    description: Option<String>,
    agent_id: Option<String>,
    topic_name: Option<String>,
    mappings: BTreeSet<String>,
}

struct DomainState {
    name: String,
    uuid: String,
    /// Id -> object; ids grow with creation, so this is creation order.
    objects: BTreeMap<String, DynObject>,
}

impl DomainState {
    fn by_name(&self, name: &str) -> Option<&DynObject> {
        self.objects.values().find(|o| o.name == name)
    }

    fn by_name_mut(&mut self, name: &str) -> Option<&mut DynObject> {
        self.objects.values_mut().find(|o| o.name == name)
    }

    /// An `{objectId}` path segment: an id, else a name.
    fn resolve(&self, id_or_name: &str) -> Option<String> {
        if self.objects.contains_key(id_or_name) {
            return Some(id_or_name.to_owned());
        }
        self.by_name(id_or_name).map(|o| o.id.clone())
    }

    fn metadata(&self) -> Value {
        json!({ "id": self.uuid, "name": self.name, "type": "Domain" })
    }
}

/// One login: its current token pair.
struct Session {
    access: String,
    access_expires: Instant,
    access_revoked: bool,
    refresh: String,
    refresh_expires: Instant,
    refreshes: u32,
}

#[derive(Default)]
struct SimState {
    domains: Vec<DomainState>,
    /// Makes object ids unique across domains.
    next_object: u64,
    stats: FmcStats,
    faults: Faults,
    log: RequestLog<RequestRecord>,
    sessions: Vec<Session>,
    issued: Vec<String>,
    issued_refresh: Vec<String>,
    /// When admitted `/api/` requests arrived, within the last window.
    window: VecDeque<Instant>,
    /// `(requests left, Retry-After)` from `rate_limit_next`.
    forced_limit: (u32, u64),
}

impl SimState {
    fn initial(config: &FmcConfig) -> Self {
        SimState {
            domains: config
                .domains
                .iter()
                .map(|(name, uuid)| DomainState {
                    name: name.clone(),
                    uuid: uuid.clone(),
                    objects: BTreeMap::new(),
                })
                .collect(),
            // FMC's object ids end in a 12-digit counter above 2^32.
            next_object: 4_294_967_296,
            ..SimState::default()
        }
    }

    fn domain_index(&self, uuid: &str) -> Option<usize> {
        self.domains
            .iter()
            .position(|d| d.uuid.eq_ignore_ascii_case(uuid))
    }

    fn new_object_id(&mut self) -> String {
        self.next_object += 1;
        format!("005056AB-931D-0ed3-0000-{:012}", self.next_object)
    }

    fn create_direct(&mut self, name: &str) -> String {
        if let Some(found) = self.domains[0].by_name(name) {
            return found.id.clone();
        }
        let id = self.new_object_id();
        self.domains[0].objects.insert(
            id.clone(),
            DynObject {
                id: id.clone(),
                name: name.to_owned(),
                description: None,
                agent_id: None,
                topic_name: None,
                mappings: BTreeSet::new(),
            },
        );
        id
    }

    fn mappings_view(&self) -> BTreeMap<String, Vec<String>> {
        let mut view = BTreeMap::new();
        for (index, domain) in self.domains.iter().enumerate() {
            for object in domain.objects.values() {
                let key = if index == 0 {
                    object.name.clone()
                } else {
                    format!("{}:{}", domain.name, object.name)
                };
                view.insert(key, object.mappings.iter().cloned().collect());
            }
        }
        view
    }

    fn objects_view(&self) -> BTreeMap<String, String> {
        self.domains[0]
            .objects
            .values()
            .map(|o| (o.name.clone(), o.id.clone()))
            .collect()
    }

    fn stats_view(&self) -> FmcStats {
        let objects = self.domains.iter().map(|d| d.objects.len()).sum::<usize>();
        let mappings = self
            .domains
            .iter()
            .flat_map(|d| d.objects.values())
            .map(|o| o.mappings.len())
            .sum::<usize>();
        FmcStats {
            objects: u64::try_from(objects).unwrap_or(u64::MAX),
            mappings: u64::try_from(mappings).unwrap_or(u64::MAX),
            ..self.stats.clone()
        }
    }

    fn expire_access_tokens(&mut self) {
        for session in &mut self.sessions {
            session.access_revoked = true;
        }
    }

    /// Admits a request into the window, or says how many seconds to wait.
    fn take_rate_limit(&mut self, per_minute: u32, now: Instant) -> Option<u64> {
        if self.forced_limit.0 > 0 {
            self.forced_limit.0 -= 1;
            return Some(self.forced_limit.1);
        }
        if per_minute == 0 {
            return None;
        }
        while self
            .window
            .front()
            .is_some_and(|at| now.duration_since(*at) >= RATE_WINDOW)
        {
            self.window.pop_front();
        }
        let full = u32::try_from(self.window.len()).unwrap_or(u32::MAX) >= per_minute;
        match self.window.front() {
            Some(oldest) if full => {
                let frees = RATE_WINDOW.saturating_sub(now.duration_since(*oldest));
                // Rounded up: a client that waits exactly this long gets in.
                let secs = frees.as_secs() + u64::from(frees.subsec_nanos() > 0);
                Some(secs.max(1))
            }
            _ => {
                self.window.push_back(now);
                None
            }
        }
    }

    fn new_session(&mut self, config: &FmcConfig, refreshes: u32) -> (String, String) {
        let now = Instant::now();
        let access = random_token();
        let refresh = random_token();
        self.sessions
            .retain(|s| s.refresh_expires > now || s.access_expires > now);
        // A lifetime too long for the clock means "never" in a test.
        let later = |by: Duration| {
            now.checked_add(by)
                .unwrap_or(now + Duration::from_secs(1 << 32))
        };
        self.sessions.push(Session {
            access: access.clone(),
            access_expires: later(config.token_lifetime),
            access_revoked: false,
            refresh: refresh.clone(),
            refresh_expires: later(config.token_lifetime.saturating_mul(2)),
            refreshes,
        });
        self.issued.push(access.clone());
        self.issued_refresh.push(refresh.clone());
        (access, refresh)
    }
}

// ---------------------------------------------------------------------------
// Serving

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/{*rest}", any(api))
        .route("/_sim/mappings", get(sim_mappings))
        .route("/_sim/objects", get(sim_objects))
        .route(
            "/_sim/objects/{name}",
            post(sim_create_object).delete(sim_delete_object),
        )
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/tokens/expire", post(sim_expire_tokens))
        .route("/_sim/faults", post(sim_faults))
        .route("/_sim/ratelimit", post(sim_ratelimit))
        .route("/_sim/reset", post(sim_reset))
        .route("/_sim/requests", get(sim_requests))
        .fallback(|| async { Reply::not_found("Resource not found").into_response() })
        .with_state(shared)
}

/// An FMC answer: status, JSON body (`None` for an empty body) and headers.
struct Reply {
    status: StatusCode,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
    retry_after: Option<u64>,
}

impl Reply {
    fn with(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            headers: Vec::new(),
            retry_after: None,
        }
    }

    fn ok(body: Value) -> Self {
        Self::with(StatusCode::OK, body)
    }

    fn created(body: Value) -> Self {
        Self::with(StatusCode::CREATED, body)
    }

    /// FMC's error envelope.
    fn error(status: StatusCode, category: &str, description: impl Into<String>) -> Self {
        Self::with(
            status,
            json!({
                "error": {
                    "category": category,
                    "messages": [{ "description": description.into() }],
                    "severity": "ERROR",
                }
            }),
        )
    }

    fn not_found(description: impl Into<String>) -> Self {
        Self::error(StatusCode::NOT_FOUND, "FRAMEWORK", description)
    }

    fn invalid(description: impl Into<String>) -> Self {
        Self::error(StatusCode::BAD_REQUEST, "VALIDATION", description)
    }

    fn unauthorized(description: &str) -> Self {
        Self::error(StatusCode::UNAUTHORIZED, "FRAMEWORK", description)
    }

    fn unprocessable(description: impl Into<String>) -> Self {
        Self::error(StatusCode::UNPROCESSABLE_ENTITY, "OTHER", description)
    }

    fn method_not_allowed(method: &Method, path: &str) -> Self {
        Self::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "FRAMEWORK",
            format!("Method {method} is not supported on {path}"),
        )
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Some(body) => (self.status, Json(body)).into_response(),
            None => self.status.into_response(),
        };
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        if let Some(secs) = self.retry_after {
            headers.insert("retry-after", secs.into());
        }
        response
    }
}

async fn api(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnectionKill>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (body, oversize) = match axum::body::to_bytes(body, BODY_READ_CAP).await {
        Ok(body) => {
            let oversize = body.len() > MAX_PAYLOAD;
            (body, oversize)
        }
        Err(_) => (Bytes::new(), true),
    };
    let mut record = RequestRecord::new(&method, &uri, &body, !oversize);

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
            debug!(path = %record.path, "FMC simulator dropping an /api/ request");
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
                "OTHER",
                format!(
                    "simulated failure: HTTP {} injected by the FMC simulator",
                    status.as_u16()
                ),
            );
            reply.retry_after = retry_after;
            reply
        }
        None => {
            let limited = shared
                .lock()
                .take_rate_limit(shared.config.rate_limit_per_minute, Instant::now());
            match limited {
                Some(secs) => {
                    shared.lock().stats.rate_limited += 1;
                    let mut reply =
                        Reply::error(StatusCode::TOO_MANY_REQUESTS, "OTHER", "Too Many Requests");
                    reply.retry_after = Some(secs);
                    reply
                }
                None if oversize => Reply::unprocessable(format!(
                    "Payload too large: the request body exceeds {MAX_PAYLOAD} bytes"
                )),
                None => answer(&shared, &method, &uri, &headers, &body),
            }
        }
    };

    record.status_code = Some(reply.status.as_u16());
    debug!(
        method = %record.method,
        path = %record.path,
        http_status = reply.status.as_u16(),
        "FMC simulator answered an /api/ request"
    );
    {
        let mut state = shared.lock();
        if !reply.status.is_success() {
            state.stats.errors += 1;
        }
        if reply.status == StatusCode::UNAUTHORIZED {
            state.stats.unauthorized += 1;
        }
        state.log.record(record);
    }
    reply.into_response()
}

/// Authentication, then the route.
fn answer(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Reply {
    let path = uri.path();
    if path == LOGIN_PATH {
        return if method == Method::POST {
            sign_in(shared, headers)
        } else {
            Reply::method_not_allowed(method, path)
        };
    }
    if path == REFRESH_PATH {
        return if method == Method::POST {
            refresh(shared, headers)
        } else {
            Reply::method_not_allowed(method, path)
        };
    }
    let token = headers
        .get("x-auth-access-token")
        .map(|v| v.to_str().unwrap_or_default());
    let Some(token) = token else {
        return Reply::unauthorized("Access token invalid.");
    };
    {
        let mut state = shared.lock();
        let now = Instant::now();
        let valid = state
            .sessions
            .iter()
            .any(|s| s.access == token && !s.access_revoked && s.access_expires > now);
        if !valid {
            state.stats.expired_tokens += 1;
            return Reply::unauthorized("Access token invalid.");
        }
    }
    let request = Request {
        shared,
        method,
        uri,
        base: base_url(shared, headers),
        query: form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect(),
        body,
    };
    dispatch(&request)
}

/// `http://host:port` as the client addressed the simulator, for the
/// absolute URLs in `links` and `paging.next`.
fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@', ' ']));
    match host {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", loopback(shared.addr)),
    }
}

fn basic_matches(config: &FmcConfig, headers: &HeaderMap) -> bool {
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

/// The headers `generatetoken` and `refreshtoken` answer with.
fn token_headers(
    config: &FmcConfig,
    access: String,
    refresh: String,
) -> Vec<(&'static str, String)> {
    let domains: Vec<Value> = config
        .domains
        .iter()
        .map(|(name, uuid)| json!({ "name": name, "uuid": uuid }))
        .collect();
    let global = config.domains[0].1.clone();
    vec![
        ("x-auth-access-token", access),
        ("x-auth-refresh-token", refresh),
        ("domain_uuid", global.clone()),
        ("global", global),
        ("domains", Value::Array(domains).to_string()),
    ]
}

fn no_content(headers: Vec<(&'static str, String)>) -> Reply {
    Reply {
        status: StatusCode::NO_CONTENT,
        body: None,
        headers,
        retry_after: None,
    }
}

fn sign_in(shared: &Shared, headers: &HeaderMap) -> Reply {
    let config = &shared.config;
    if !basic_matches(config, headers) {
        return Reply::unauthorized("User authentication failed");
    }
    let (access, refresh) = {
        let mut state = shared.lock();
        state.stats.logins += 1;
        state.new_session(config, 0)
    };
    no_content(token_headers(config, access, refresh))
}

fn refresh(shared: &Shared, headers: &HeaderMap) -> Reply {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (access, refresh) = (
        header("x-auth-access-token"),
        header("x-auth-refresh-token"),
    );
    let config = &shared.config;
    let mut state = shared.lock();
    let now = Instant::now();
    let found = state.sessions.iter().position(|s| {
        !refresh.is_empty() && s.refresh == refresh && s.access == access && s.refresh_expires > now
    });
    let Some(index) = found else {
        return Reply::unauthorized("Invalid refresh token");
    };
    let refreshes = state.sessions[index].refreshes;
    if refreshes >= config.max_refreshes {
        return Reply::unauthorized("Invalid refresh token");
    }
    // The old pair ends with the refresh.
    state.sessions.remove(index);
    state.stats.refreshes += 1;
    let (access, refresh) = state.new_session(config, refreshes + 1);
    no_content(token_headers(config, access, refresh))
}

// ---------------------------------------------------------------------------
// Routes

struct Request<'a> {
    shared: &'a Shared,
    method: &'a Method,
    uri: &'a Uri,
    /// `http://host:port`.
    base: String,
    query: Vec<(String, String)>,
    body: &'a Bytes,
}

impl Request<'_> {
    /// The last value of a query parameter, as later ones win.
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.param(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    fn self_link(&self) -> String {
        let path = self
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or_else(|| self.uri.path());
        format!("{}{path}", self.base)
    }

    /// The body as JSON: 422 when it is not JSON at all.
    fn json(&self) -> Result<Value, Reply> {
        serde_json::from_slice(self.body).map_err(|error| {
            Reply::unprocessable(format!(
                "Unprocessable Entity: the body is not JSON ({error})"
            ))
        })
    }

    fn paging(&self) -> Result<Paging, Reply> {
        let number = |name: &str, default: usize| match self.param(name) {
            None | Some("") => Ok(default),
            Some(raw) => raw.parse::<usize>().map_err(|_| {
                Reply::invalid(format!("Invalid value {raw:?} for query parameter {name}"))
            }),
        };
        let offset = number("offset", 0)?;
        let limit = number("limit", DEFAULT_PAGE)?.clamp(1, MAX_PAGE);
        Ok(Paging { offset, limit })
    }

    /// A paged list answer: `items`, `links.self`, `paging` with `next`
    /// while pages remain.
    fn page(&self, items: Vec<Value>) -> Result<Reply, Reply> {
        let Paging { offset, limit } = self.paging()?;
        let count = items.len();
        let page: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
        let mut paging = json!({
            "offset": offset,
            "limit": limit,
            "count": count,
            "pages": count.div_ceil(limit),
        });
        let mut next = Vec::new();
        let mut at = offset.saturating_add(limit);
        while at < count {
            next.push(Value::String(self.url_with_page(at, limit)));
            at += limit;
        }
        if !next.is_empty() {
            paging["next"] = Value::Array(next);
        }
        Ok(Reply::ok(json!({
            "items": page,
            "links": { "self": self.self_link() },
            "paging": paging,
        })))
    }

    /// This request's URL with another page, keeping every other parameter
    /// so that following it keeps `expanded` and filters.
    fn url_with_page(&self, offset: usize, limit: usize) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in &self.query {
            if key != "offset" && key != "limit" {
                query.append_pair(key, value);
            }
        }
        query.append_pair("offset", &offset.to_string());
        query.append_pair("limit", &limit.to_string());
        format!("{}{}?{}", self.base, self.uri.path(), query.finish())
    }
}

struct Paging {
    offset: usize,
    limit: usize,
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

fn dispatch(request: &Request<'_>) -> Reply {
    let path = request.uri.path();
    let method = request.method;
    let Some(segments) = path
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect::<Option<Vec<String>>>()
    else {
        return Reply::invalid(format!("{path} is not valid UTF-8 once percent-decoded"));
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        ["api", "fmc_platform", "v1", "info", "serverversion"] => match *method {
            Method::GET => request.page(vec![json!({
                "serverVersion": SERVER_VERSION,
                "type": "ServerVersion",
            })]),
            _ => Err(Reply::method_not_allowed(method, path)),
        }
        .unwrap_or_else(|reply| reply),
        ["api", "fmc_platform", "v1", "info", "domain", rest @ ..] if rest.len() <= 1 => {
            if *method != Method::GET {
                return Reply::method_not_allowed(method, path);
            }
            domains(request, rest.first().copied())
        }
        ["api", "fmc_config", "v1", "domain", domain, "object", rest @ ..] => {
            let Some(domain) = request.shared.lock().domain_index(domain) else {
                return Reply::not_found(format!("Domain {domain} does not exist"));
            };
            objects(request, domain, rest)
        }
        ["api", "fmc_config", "v1", "domain", domain, ..] => {
            if request.shared.lock().domain_index(domain).is_none() {
                return Reply::not_found(format!("Domain {domain} does not exist"));
            }
            Reply::not_found("Resource not found")
        }
        _ => Reply::not_found("Resource not found"),
    }
}

fn domains(request: &Request<'_>, uuid: Option<&str>) -> Reply {
    let items: Vec<Value> = {
        let state = request.shared.lock();
        state
            .domains
            .iter()
            .filter(|d| uuid.is_none_or(|u| d.uuid.eq_ignore_ascii_case(u)))
            .map(|d| json!({ "uuid": d.uuid, "name": d.name, "type": "Domain" }))
            .collect()
    };
    match uuid {
        Some(uuid) => match items.into_iter().next() {
            Some(item) => Reply::ok(item),
            None => Reply::not_found(format!("Domain {uuid} does not exist")),
        },
        None => request.page(items).unwrap_or_else(|reply| reply),
    }
}

fn objects(request: &Request<'_>, domain: usize, rest: &[&str]) -> Reply {
    let method = request.method;
    let path = request.uri.path();
    let result = match (method, rest) {
        (&Method::GET, ["dynamicobjects"]) => list_objects(request, domain),
        (&Method::POST, ["dynamicobjects"]) => create_objects(request, domain),
        (&Method::DELETE, ["dynamicobjects"]) => delete_objects_bulk(request, domain),
        (&Method::GET, ["dynamicobjects", id]) => with_object(request, domain, id, |d, o| {
            Ok(Reply::ok(object_json(request, d, o, true)))
        }),
        (&Method::PUT, ["dynamicobjects", id]) => update_object(request, domain, id),
        (&Method::DELETE, ["dynamicobjects", id]) => delete_object(request, domain, id),
        (&Method::GET, ["dynamicobjects", id, "mappings"]) => {
            let items = with_object(request, domain, id, |_, o| {
                Ok(o.mappings
                    .iter()
                    .map(|m| json!({ "mapping": m }))
                    .collect::<Vec<_>>())
            });
            items.and_then(|items| request.page(items))
        }
        (&Method::PUT, ["dynamicobjects", id, "mappings"]) => put_mappings(request, domain, id),
        (&Method::POST, ["dynamicobjectmappings"]) => bulk_mappings(request, domain),
        (_, ["dynamicobjects" | "dynamicobjectmappings"])
        | (_, ["dynamicobjects", _])
        | (_, ["dynamicobjects", _, "mappings"]) => Err(Reply::method_not_allowed(method, path)),
        _ => Err(Reply::not_found("Resource not found")),
    };
    result.unwrap_or_else(|reply| reply)
}

fn unknown_object(id_or_name: &str) -> Reply {
    Reply::not_found(format!("Dynamic object \"{id_or_name}\" not found"))
}

/// Runs `f` on the object an `{objectId}` names, or answers 404.
fn with_object<T>(
    request: &Request<'_>,
    domain: usize,
    id_or_name: &str,
    f: impl FnOnce(&DomainState, &DynObject) -> Result<T, Reply>,
) -> Result<T, Reply> {
    let state = request.shared.lock();
    let domain = &state.domains[domain];
    let object = domain
        .resolve(id_or_name)
        .and_then(|id| domain.objects.get(&id))
        .ok_or_else(|| unknown_object(id_or_name))?;
    f(domain, object)
}

fn object_json(
    request: &Request<'_>,
    domain: &DomainState,
    object: &DynObject,
    full: bool,
) -> Value {
    let self_link = format!(
        "{}{API_CONFIG}/{}/object/dynamicobjects/{}",
        request.base, domain.uuid, object.id
    );
    let mut value = json!({
        "id": object.id,
        "name": object.name,
        "type": OBJECT_TYPE,
        "links": { "self": self_link },
    });
    if !full {
        return value;
    }
    value["objectType"] = json!("IP");
    if let Some(description) = &object.description {
        value["description"] = json!(description);
    }
    if let Some(agent_id) = &object.agent_id {
        value["agentId"] = json!(agent_id);
    }
    if let Some(topic_name) = &object.topic_name {
        value["topicName"] = json!(topic_name);
    }
    value["metadata"] = json!({ "domain": domain.metadata() });
    if request.flag("includeCount") {
        value["metadata"]["mappingsCount"] = json!(object.mappings.len());
    }
    value
}

/// The objects a `filter=` selects: `nameStartsWith:X`, `ids:a,b`,
/// `unusedOnly:true`, `;`-separated.
fn filtered<'d>(
    request: &Request<'_>,
    domain: &'d DomainState,
) -> Result<Vec<&'d DynObject>, Reply> {
    let mut selected: Vec<&DynObject> = domain.objects.values().collect();
    if let Some(name) = request.param("name") {
        selected.retain(|o| o.name == name);
    }
    let Some(filter) = request.param("filter") else {
        return Ok(selected);
    };
    for clause in filter.split(';').filter(|c| !c.is_empty()) {
        let Some((key, value)) = clause.split_once(':') else {
            return Err(Reply::invalid(format!(
                "Invalid filter {clause:?}: expected key:value"
            )));
        };
        if value.is_empty() {
            return Err(Reply::invalid(format!(
                "Invalid filter {clause:?}: empty value"
            )));
        }
        match key {
            "nameStartsWith" => selected.retain(|o| o.name.starts_with(value)),
            "ids" => {
                let ids: BTreeSet<&str> = value.split(',').map(str::trim).collect();
                selected.retain(|o| ids.contains(o.id.as_str()));
            }
            // Nothing refers to dynamic objects in the simulator.
            "unusedOnly" => {}
            _ => {
                return Err(Reply::invalid(format!(
                    "Invalid filter key {key:?}: dynamic objects filter on nameStartsWith, ids or unusedOnly"
                )))
            }
        }
    }
    Ok(selected)
}

fn list_objects(request: &Request<'_>, domain: usize) -> Result<Reply, Reply> {
    let expanded = request.flag("expanded");
    let items = {
        let state = request.shared.lock();
        let domain = &state.domains[domain];
        filtered(request, domain)?
            .into_iter()
            .map(|o| object_json(request, domain, o, expanded))
            .collect()
    };
    request.page(items)
}

/// A dynamic object as POST or PUT sends it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectBody {
    id: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    object_type: Option<String>,
    description: Option<String>,
    agent_id: Option<String>,
    topic_name: Option<String>,
}

impl ObjectBody {
    fn parse(value: Value) -> Result<ObjectBody, Reply> {
        let body: ObjectBody = serde_json::from_value(value)
            .map_err(|error| Reply::invalid(format!("Invalid dynamic object: {error}")))?;
        let Some(name) = &body.name else {
            return Err(Reply::invalid("Invalid dynamic object: name is required"));
        };
        check_name(name).map_err(Reply::invalid)?;
        if let Some(kind) = body.kind.as_deref().filter(|k| *k != OBJECT_TYPE) {
            return Err(Reply::invalid(format!(
                "Invalid type {kind:?}: expected {OBJECT_TYPE:?}"
            )));
        }
        if let Some(object_type) = body.object_type.as_deref().filter(|t| *t != "IP") {
            return Err(Reply::invalid(format!(
                "Invalid objectType {object_type:?}: only \"IP\" is supported"
            )));
        }
        if let Some(description) = &body.description {
            if description.chars().count() > MAX_DESCRIPTION_LEN {
                return Err(Reply::invalid(format!(
                    "Invalid description: at most {MAX_DESCRIPTION_LEN} characters"
                )));
            }
        }
        Ok(body)
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

fn duplicate(name: &str) -> Reply {
    Reply::invalid(format!("Duplicate Name: {name}"))
}

fn create_objects(request: &Request<'_>, domain: usize) -> Result<Reply, Reply> {
    let value = request.json()?;
    let bulk = request.flag("bulk");
    let (values, as_list) = match value {
        Value::Array(values) if bulk => (values, true),
        Value::Array(_) => {
            return Err(Reply::invalid(
                "A list of dynamic objects needs the query parameter bulk=true",
            ))
        }
        value => (vec![value], bulk),
    };
    if values.is_empty() {
        return Err(Reply::invalid("No dynamic objects to create"));
    }
    let bodies = values
        .into_iter()
        .map(ObjectBody::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let mut state = request.shared.lock();
    // All or nothing: every name is checked before anything is created.
    let mut names = BTreeSet::new();
    for body in &bodies {
        if state.domains[domain].by_name(body.name()).is_some() || !names.insert(body.name()) {
            return Err(duplicate(body.name()));
        }
    }
    let mut created = Vec::new();
    for body in bodies {
        let id = state.new_object_id();
        let object = DynObject {
            id: id.clone(),
            name: body.name().to_owned(),
            description: body.description.filter(|d| !d.is_empty()),
            agent_id: body.agent_id,
            topic_name: body.topic_name,
            mappings: BTreeSet::new(),
        };
        state.domains[domain].objects.insert(id.clone(), object);
        state.stats.objects_created += 1;
        created.push(id);
    }
    let domain = &state.domains[domain];
    let items: Vec<Value> = created
        .iter()
        .filter_map(|id| domain.objects.get(id))
        .map(|o| object_json(request, domain, o, true))
        .collect();
    if as_list {
        Ok(Reply::created(json!({
            "items": items,
            "links": { "self": request.self_link() },
        })))
    } else {
        Ok(Reply::created(items.into_iter().next().unwrap_or_default()))
    }
}

fn update_object(request: &Request<'_>, domain: usize, id_or_name: &str) -> Result<Reply, Reply> {
    let body = ObjectBody::parse(request.json()?)?;
    let mut state = request.shared.lock();
    let domain = &mut state.domains[domain];
    let id = domain
        .resolve(id_or_name)
        .ok_or_else(|| unknown_object(id_or_name))?;
    if let Some(body_id) = body.id.as_deref().filter(|b| *b != id) {
        return Err(Reply::invalid(format!(
            "The id {body_id:?} in the body does not match the object {id}"
        )));
    }
    if domain
        .by_name(body.name())
        .is_some_and(|other| other.id != id)
    {
        return Err(duplicate(body.name()));
    }
    let Some(object) = domain.objects.get_mut(&id) else {
        return Err(unknown_object(id_or_name));
    };
    // PUT replaces the object, mappings aside.
    object.name = body.name().to_owned();
    object.description = body.description.filter(|d| !d.is_empty());
    object.agent_id = body.agent_id;
    object.topic_name = body.topic_name;
    let domain = &*domain;
    let object = &domain.objects[&id];
    Ok(Reply::ok(object_json(request, domain, object, true)))
}

fn delete_object(request: &Request<'_>, domain: usize, id_or_name: &str) -> Result<Reply, Reply> {
    let mut state = request.shared.lock();
    let id = state.domains[domain]
        .resolve(id_or_name)
        .ok_or_else(|| unknown_object(id_or_name))?;
    let value = {
        let domain = &state.domains[domain];
        object_json(request, domain, &domain.objects[&id], true)
    };
    state.domains[domain].objects.remove(&id);
    state.stats.objects_deleted += 1;
    Ok(Reply::ok(value))
}

fn delete_objects_bulk(request: &Request<'_>, domain: usize) -> Result<Reply, Reply> {
    if !request.flag("bulk") {
        return Err(Reply::invalid(
            "Deleting dynamic objects in bulk needs the query parameter bulk=true",
        ));
    }
    if request.param("filter").is_none() {
        return Err(Reply::invalid(
            "Deleting dynamic objects in bulk needs a filter, such as ids:<id>,<id>",
        ));
    }
    let mut state = request.shared.lock();
    let (ids, items): (Vec<String>, Vec<Value>) = {
        let domain = &state.domains[domain];
        filtered(request, domain)?
            .into_iter()
            .map(|o| (o.id.clone(), object_json(request, domain, o, true)))
            .unzip()
    };
    for id in &ids {
        state.domains[domain].objects.remove(id);
        state.stats.objects_deleted += 1;
    }
    Ok(Reply::ok(json!({
        "items": items,
        "links": { "self": request.self_link() },
    })))
}

/// Every mapping of a list, canonical, or a 400 naming the first bad one.
fn parse_mappings(values: &[Value], object: &str) -> Result<Vec<String>, Reply> {
    values
        .iter()
        .map(|value| match value {
            Value::String(raw) => canonical_mapping(raw)
                .map_err(|problem| Reply::invalid(format!("{problem} (dynamic object {object})"))),
            other => Err(Reply::invalid(format!(
                "Invalid mapping {other} for dynamic object {object}: mappings are strings"
            ))),
        })
        .collect()
}

#[derive(Deserialize)]
struct MappingsBody {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    mappings: Vec<Value>,
}

fn put_mappings(request: &Request<'_>, domain: usize, id_or_name: &str) -> Result<Reply, Reply> {
    let value = request.json()?;
    let body: MappingsBody = serde_json::from_value(value.clone())
        .map_err(|error| Reply::invalid(format!("Invalid dynamic object mappings: {error}")))?;
    if let Some(kind) = body.kind.as_deref().filter(|k| *k != MAPPINGS_TYPE) {
        return Err(Reply::invalid(format!(
            "Invalid type {kind:?}: expected {MAPPINGS_TYPE:?}"
        )));
    }
    let action = request.param("action").unwrap_or("add");
    if !matches!(action, "add" | "remove" | "remove_all") {
        return Err(Reply::invalid(format!(
            "Invalid action {action:?}: expected add, remove or remove_all"
        )));
    }
    let mut state = request.shared.lock();
    let id = state.domains[domain]
        .resolve(id_or_name)
        .ok_or_else(|| unknown_object(id_or_name))?;
    if let Some(body_id) = body.id.as_deref().filter(|b| *b != id) {
        return Err(Reply::invalid(format!(
            "The id {body_id:?} in the body does not match the dynamic object {id}"
        )));
    }
    let mappings = parse_mappings(&body.mappings, id_or_name)?;
    let Some(object) = state.domains[domain].objects.get_mut(&id) else {
        return Err(unknown_object(id_or_name));
    };
    let (added, removed) = match action {
        "add" => (insert_all(object, mappings), 0),
        "remove" => (0, remove_all(object, &mappings)),
        _ => {
            let removed = object.mappings.len();
            object.mappings.clear();
            (0, removed)
        }
    };
    state.stats.mappings_added += added;
    state.stats.mappings_removed += u64::try_from(removed).unwrap_or(u64::MAX);
    Ok(Reply::ok(value))
}

fn insert_all(object: &mut DynObject, mappings: Vec<String>) -> u64 {
    mappings
        .into_iter()
        .map(|m| u64::from(object.mappings.insert(m)))
        .sum()
}

fn remove_all(object: &mut DynObject, mappings: &[String]) -> usize {
    mappings
        .iter()
        .filter(|m| object.mappings.remove(*m))
        .count()
}

#[derive(Deserialize)]
struct BulkMappings {
    #[serde(default)]
    add: Vec<BulkEntry>,
    #[serde(default)]
    remove: Vec<BulkEntry>,
}

#[derive(Deserialize)]
struct BulkEntry {
    #[serde(default)]
    mappings: Vec<Value>,
    #[serde(rename = "dynamicObject")]
    dynamic_object: ObjectRef,
}

#[derive(Deserialize)]
struct ObjectRef {
    id: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

fn bulk_mappings(request: &Request<'_>, domain: usize) -> Result<Reply, Reply> {
    request.shared.lock().stats.bulk_mapping_posts += 1;
    let value = request.json()?;
    let body: BulkMappings = serde_json::from_value(value.clone())
        .map_err(|error| Reply::invalid(format!("Invalid dynamic object mappings: {error}")))?;
    let mut state = request.shared.lock();
    // Everything is resolved and parsed before anything changes.
    let mut plan: Vec<(bool, String, Vec<String>)> = Vec::new();
    for (add, entry) in body
        .add
        .iter()
        .map(|e| (true, e))
        .chain(body.remove.iter().map(|e| (false, e)))
    {
        let reference = &entry.dynamic_object;
        if let Some(kind) = reference.kind.as_deref().filter(|k| *k != OBJECT_TYPE) {
            return Err(Reply::invalid(format!(
                "Invalid dynamicObject type {kind:?}: expected {OBJECT_TYPE:?}"
            )));
        }
        let domain = &state.domains[domain];
        let (id, named) = match (&reference.id, &reference.name) {
            (Some(id), _) => (
                domain.objects.contains_key(id).then(|| id.clone()),
                id.as_str(),
            ),
            (None, Some(name)) => (domain.by_name(name).map(|o| o.id.clone()), name.as_str()),
            (None, None) => {
                return Err(Reply::invalid(
                    "Invalid dynamicObject: an id or a name is required",
                ))
            }
        };
        let Some(id) = id else {
            return Err(Reply::invalid(format!(
                "Dynamic object \"{named}\" not found"
            )));
        };
        plan.push((add, id, parse_mappings(&entry.mappings, named)?));
    }
    let (mut added, mut removed) = (0u64, 0usize);
    for (add, id, mappings) in plan {
        let Some(object) = state.domains[domain].objects.get_mut(&id) else {
            continue;
        };
        if add {
            added += insert_all(object, mappings);
        } else {
            removed += remove_all(object, &mappings);
        }
    }
    state.stats.mappings_added += added;
    state.stats.mappings_removed += u64::try_from(removed).unwrap_or(u64::MAX);
    Ok(Reply::created(value))
}

// ---------------------------------------------------------------------------
// /_sim/ control endpoints

async fn sim_mappings(State(shared): State<Arc<Shared>>) -> Json<BTreeMap<String, Vec<String>>> {
    Json(shared.lock().mappings_view())
}

async fn sim_objects(State(shared): State<Arc<Shared>>) -> Json<BTreeMap<String, String>> {
    Json(shared.lock().objects_view())
}

async fn sim_create_object(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Response {
    if let Err(problem) = check_name(&name) {
        return (StatusCode::BAD_REQUEST, problem).into_response();
    }
    let (created, id) = {
        let mut state = shared.lock();
        let created = state.domains[0].by_name(&name).is_none();
        (created, state.create_direct(&name))
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(json!({ "id": id, "name": name }))).into_response()
}

async fn sim_delete_object(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Response {
    let mut state = shared.lock();
    let global = &mut state.domains[0];
    match global.by_name(&name).map(|o| o.id.clone()) {
        Some(id) => {
            global.objects.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        None => (StatusCode::NOT_FOUND, format!("no dynamic object {name}")).into_response(),
    }
}

async fn sim_stats(State(shared): State<Arc<Shared>>) -> Json<FmcStats> {
    Json(shared.lock().stats_view())
}

async fn sim_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> Response {
    if let Err(problem) = faults.validate() {
        return (StatusCode::BAD_REQUEST, problem).into_response();
    }
    debug!(?faults, "FMC simulator faults set");
    shared.lock().faults = faults;
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_expire_tokens(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().expire_access_tokens();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct RateLimitNext {
    next: u32,
    #[serde(default)]
    retry_after_secs: u64,
}

async fn sim_ratelimit(
    State(shared): State<Arc<Shared>>,
    Json(limit): Json<RateLimitNext>,
) -> StatusCode {
    shared.lock().forced_limit = (limit.next, limit.retry_after_secs);
    StatusCode::NO_CONTENT
}

/// Back to the configured domains, empty, with no sessions, stats, faults or
/// log.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_canonical_and_cidrs_keep_their_address() {
        assert_eq!(
            canonical_mapping("2001:DB8::1").as_deref(),
            Ok("2001:db8::1")
        );
        assert_eq!(
            canonical_mapping("10.0.0.5/24").as_deref(),
            Ok("10.0.0.5/24")
        );
        assert_eq!(canonical_mapping("::/0").as_deref(), Ok("::/0"));
        for bad in [
            "10.0.0.256",
            "10.0.0.1/33",
            "10.0.0.1/",
            "10.0.0.1/+8",
            "host",
            " 10.0.0.1",
        ] {
            assert!(canonical_mapping(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_follow_the_documented_pattern() {
        assert!(check_name("web_01.a+b-c").is_ok());
        assert!(check_name(&"a".repeat(128)).is_ok());
        for bad in ["", "a b", "a/b", "é", &"a".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_window_says_when_it_frees() {
        let mut state = SimState::default();
        let start = Instant::now();
        assert_eq!(state.take_rate_limit(2, start), None);
        assert_eq!(
            state.take_rate_limit(2, start + Duration::from_secs(10)),
            None
        );
        assert_eq!(
            state.take_rate_limit(2, start + Duration::from_millis(20_500)),
            Some(40)
        );
        assert_eq!(
            state.take_rate_limit(2, start + Duration::from_secs(60)),
            None
        );
    }
}
