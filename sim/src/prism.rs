//! A loopback simulator of Nutanix Prism's v3 API, for prismhook's tests and
//! demo.
//!
//! Run with: `prismhook sim prism --listen 127.0.0.1:9440`
//!
//! It imitates what prismhook depends on, including the awkward parts a real
//! cluster shows:
//!
//! - `/api/nutanix/v3/...` behind HTTP Basic auth. A wrong or missing password
//!   gets a 401 with an HTML body, not the JSON error shape, because that is
//!   what Prism sends and a client must not choke on it.
//! - Webhook intents that start `PENDING` and turn `COMPLETE` only after
//!   [`PrismConfig::pending_ms`]; `spec_version` checked on every `PUT` (409
//!   when stale); a create with a body identical to an existing webhook makes
//!   a second webhook, so a client that registers blindly gets duplicates.
//! - A VM inventory (`POST /vms/list`) whose intents have the same shape as
//!   the notifications, so reconciling and event handling can be compared.
//! - Notifications POSTed to every webhook whose filter matches, with the
//!   webhook's credentials, from a background task. Prism promises nothing
//!   about delivery, so the simulator can drop, duplicate, delay and reorder
//!   deliveries from a seeded RNG ([`PrismFaults`]), emit the payloads of
//!   older AOS releases, or make the whole API unavailable.
//!
//! A control API under `/_sim/` (no auth) drives the VMs, injects faults and
//! exposes what happened; [`PrismSim`] offers the same as Rust methods.
//!
//! This module shares no code with the production client in the `prismhook`
//! crate on purpose: a misreading of the API written once and used on both
//! sides would pass every test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where `prismhook sim prism` listens unless told otherwise (Prism's port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9440";

const API_PREFIX: &str = "/api/nutanix/v3";
const API_VERSION: &str = "3.1";
const DEFAULT_PAGE: usize = 20;
const MAX_PAGE: usize = 500;
const DEFAULT_HOST: &str = "sim-host-1";
const DEFAULT_SUBNET: &str = "vlan0";
const ADMIN_UUID: &str = "00000000-0000-0000-0000-000000000000";
/// How long one delivery POST may take before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between retries when [`PrismFaults::retries`] asks for them.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How the simulated cluster is set up.
#[derive(Clone, Debug)]
pub struct PrismConfig {
    /// Basic-auth user the v3 API accepts.
    pub user: String,
    /// Basic-auth password the v3 API accepts.
    pub password: String,
    /// How long a created or updated webhook stays `PENDING`.
    pub pending_ms: u64,
}

impl Default for PrismConfig {
    fn default() -> Self {
        Self {
            user: "admin".to_owned(),
            password: "nutanix/4u".to_owned(),
            pending_ms: 50,
        }
    }
}

/// Misbehaviour to inject; the default is a well-behaved cluster.
///
/// Setting faults reseeds the RNG from `seed`, so the same faults followed by
/// the same calls drop and duplicate the same deliveries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrismFaults {
    /// Probability that a delivery to a webhook is silently not made.
    pub drop_rate: f64,
    /// Probability that a delivery is made twice.
    pub duplicate_rate: f64,
    /// Hold deliveries until [`PrismSim::flush`], which sends them shuffled.
    pub reorder: bool,
    /// Wait before every delivery POST.
    pub delay_ms: u64,
    /// Seed of the RNG behind `drop_rate`, `duplicate_rate` and `reorder`.
    pub seed: u64,
    /// Emit older AOS payloads: `state: "kComplete"`, `memory_size_mb`,
    /// `POWERED_ON`/`POWERED_OFF`, an empty `spec`, a numeric
    /// `entity_version` and a null `owner_reference`.
    pub legacy_payloads: bool,
    /// The whole v3 API answers 503; notifications still flow.
    pub unavailable: bool,
    /// `VM.DELETE` carries `data.metadata: {}` instead of the last intent.
    pub empty_delete_metadata: bool,
    /// Retry a failed delivery (connection error or non-2xx) this many times.
    pub retries: u32,
    /// `POST /vms/list` answers 500 from this offset on, as a Prism that
    /// fails partway through a long listing.
    pub vms_list_fails_from: Option<usize>,
    /// A new webhook sends nothing until it is `COMPLETE` (Prism's
    /// documentation does not say whether a `PENDING` one does).
    pub silent_while_pending: bool,
    /// The webhook list shows each updated webhook one update behind (its
    /// `spec_version` less one), as a list read before another client's
    /// update: a `PUT` with it gets 409.
    pub list_lags_one_update: bool,
}

/// A registered webhook as the simulator knows it, credentials included,
/// which the v3 API never reveals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimWebhook {
    pub uuid: String,
    pub name: String,
    pub description: Option<String>,
    pub post_url: String,
    pub events_filter_list: Vec<String>,
    pub credentials: Option<SimCredentials>,
    /// `PENDING` or `COMPLETE`.
    pub state: String,
    pub spec_version: u64,
}

/// The Basic-auth pair Prism sends to a webhook's `post_url`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimCredentials {
    pub username: String,
    pub password: String,
}

/// A simulated VM: the truth convergence tests compare against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimVm {
    pub uuid: String,
    pub name: String,
    /// `ON` or `OFF`.
    pub power_state: String,
    pub categories: BTreeMap<String, String>,
    pub nics: Vec<SimNic>,
    pub host_name: String,
    pub host_uuid: String,
    pub spec_version: u64,
    pub entity_version: u64,
    pub creation_time: String,
    pub last_update_time: String,
}

/// A NIC of a [`SimVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimNic {
    pub uuid: String,
    pub mac_address: String,
    pub ips: Vec<String>,
    pub subnet_name: String,
    pub subnet_uuid: String,
}

/// What `POST /_sim/vms` and [`PrismSim::create_vm`] take.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewVm {
    pub name: String,
    /// `ON` or `OFF` (default).
    pub power_state: Option<String>,
    pub categories: BTreeMap<String, String>,
    pub nics: Vec<NewNic>,
    /// Host name; a default host when absent.
    pub host: Option<String>,
}

impl NewVm {
    /// A powered-off VM without categories or NICs.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Create it powered on (emits `VM.ON` after `VM.CREATE`).
    pub fn powered_on(mut self) -> Self {
        self.power_state = Some("ON".to_owned());
        self
    }

    pub fn category(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.categories.insert(key.into(), value.into());
        self
    }

    /// Add a NIC with these IPs on the default subnet.
    pub fn nic<I, S>(mut self, ips: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nics.push(NewNic::with_ips(ips));
        self
    }
}

/// A NIC to create or plug.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewNic {
    pub ips: Vec<String>,
    /// Subnet name; a default subnet when absent.
    pub subnet: Option<String>,
}

impl NewNic {
    pub fn with_ips<I, S>(ips: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            ips: ips.into_iter().map(Into::into).collect(),
            subnet: None,
        }
    }
}

/// A partial change of a VM (`PUT /_sim/vms/{uuid}`); absent fields stay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmPatch {
    pub name: Option<String>,
    pub power_state: Option<String>,
    /// Replaces all categories.
    pub categories: Option<BTreeMap<String, String>>,
}

/// What a VM-changing call did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmChange {
    pub uuid: String,
    /// The NIC created by a plug.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nic_uuid: Option<String>,
    /// Event types emitted, in order.
    pub events: Vec<String>,
    /// Deliveries made, summed over the events (see [`PrismSim::notify`]).
    pub delivered: usize,
}

/// One delivery attempt, or a delivery deliberately dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub event_type: String,
    pub entity_uuid: String,
    /// The entity's version the notification carried (`entity_version` of
    /// its intent): which change of the entity this delivery was about.
    pub entity_version: Option<u64>,
    pub webhook_uuid: String,
    pub post_url: String,
    /// HTTP status answered; `None` when dropped or not answered.
    pub status: Option<u16>,
    pub dropped: bool,
    /// The second copy of a duplicated delivery.
    pub duplicate: bool,
    /// 1 for the first attempt, higher for retries.
    pub attempt: u32,
    pub error: Option<String>,
}

/// A running simulator; stop it with [`PrismSim::shutdown`].
pub struct PrismSim {
    sim: Sim,
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl PrismSim {
    /// Bind `addr` (port 0 for any) and serve in the background.
    pub async fn start(addr: SocketAddr, cfg: PrismConfig) -> anyhow::Result<PrismSim> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the Prism simulator to {addr}"))?;
        let addr = listener.local_addr()?;
        // Prism is not known to verify listener certificates, and tests and
        // the demo run listeners with self-signed ones; proxies from the
        // environment must not catch loopback traffic.
        let http = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .timeout(DELIVERY_TIMEOUT)
            .build()
            .context("building the simulator's delivery client")?;
        let sim = Sim::new(cfg, http);
        let app = router(sim.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::debug!(%addr, "prism simulator listening");
        Ok(PrismSim {
            sim,
            addr,
            stop,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the base URL a client is configured with.
    pub fn base_url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            "127.0.0.1".parse().expect("literal IP")
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Every registered webhook, in creation order, with credentials.
    pub fn webhooks(&self) -> Vec<SimWebhook> {
        self.sim.webhooks()
    }

    /// Puts a webhook in the `ERROR` state, as Prism leaves an intent it
    /// could not apply, until its next update; false if there is none.
    pub fn fail_webhook(&self, uuid: &str) -> bool {
        let mut st = self.sim.lock();
        let found = st.webhooks.iter_mut().find(|h| h.uuid == uuid);
        found.map(|h| h.failed = true).is_some()
    }

    /// Deliver a raw notification body to every webhook whose filter has its
    /// `event_type`; returns to how many webhooks it was sent (dropped and
    /// held deliveries not counted) once the POSTs are done.
    pub async fn notify(&self, body: Value) -> usize {
        self.sim.dispatch(body).await.delivered
    }

    /// Replace the faults in force and reseed the RNG.
    pub fn set_faults(&self, faults: PrismFaults) {
        self.sim.set_faults(faults);
    }

    /// Send the deliveries held by [`PrismFaults::reorder`], shuffled, and
    /// wait for them.
    pub async fn flush(&self) -> usize {
        self.sim.flush().await
    }

    /// Every delivery attempt so far, in the order they finished.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.sim.lock().log.clone()
    }

    pub async fn create_vm(&self, vm: NewVm) -> anyhow::Result<VmChange> {
        Ok(self.sim.create_vm(vm).await?)
    }

    pub async fn set_power(&self, uuid: &str, on: bool) -> anyhow::Result<VmChange> {
        let patch = VmPatch {
            power_state: Some(if on { "ON" } else { "OFF" }.to_owned()),
            ..VmPatch::default()
        };
        Ok(self.sim.patch_vm(uuid, patch).await?)
    }

    pub async fn set_categories(
        &self,
        uuid: &str,
        categories: BTreeMap<String, String>,
    ) -> anyhow::Result<VmChange> {
        let patch = VmPatch {
            categories: Some(categories),
            ..VmPatch::default()
        };
        Ok(self.sim.patch_vm(uuid, patch).await?)
    }

    pub async fn rename_vm(&self, uuid: &str, name: &str) -> anyhow::Result<VmChange> {
        let patch = VmPatch {
            name: Some(name.to_owned()),
            ..VmPatch::default()
        };
        Ok(self.sim.patch_vm(uuid, patch).await?)
    }

    /// Any combination of name, power and categories, as `PUT /_sim/vms/{uuid}`.
    pub async fn patch_vm(&self, uuid: &str, patch: VmPatch) -> anyhow::Result<VmChange> {
        Ok(self.sim.patch_vm(uuid, patch).await?)
    }

    /// Emits `VM.NIC_PLUG`; the new NIC's uuid is in [`VmChange::nic_uuid`].
    pub async fn plug_nic(&self, uuid: &str, nic: NewNic) -> anyhow::Result<VmChange> {
        Ok(self.sim.plug_nic(uuid, nic).await?)
    }

    pub async fn unplug_nic(&self, uuid: &str, nic_uuid: &str) -> anyhow::Result<VmChange> {
        Ok(self.sim.unplug_nic(uuid, nic_uuid).await?)
    }

    /// Replace a NIC's IPs; emits `VM.UPDATE`.
    pub async fn set_nic_ips(
        &self,
        uuid: &str,
        nic_uuid: &str,
        ips: Vec<String>,
    ) -> anyhow::Result<VmChange> {
        Ok(self.sim.set_nic_ips(uuid, nic_uuid, ips).await?)
    }

    pub async fn migrate(&self, uuid: &str, host: &str) -> anyhow::Result<VmChange> {
        Ok(self.sim.migrate(uuid, host).await?)
    }

    /// Emits `VM.DELETE` with the last intent, or `{}` when
    /// [`PrismFaults::empty_delete_metadata`] is set.
    pub async fn delete_vm(&self, uuid: &str) -> anyhow::Result<VmChange> {
        Ok(self.sim.delete_vm(uuid, None).await?)
    }

    /// The VMs as they are now, in creation order.
    pub fn vms(&self) -> Vec<SimVm> {
        self.sim.lock().vms.clone()
    }

    /// Stop serving and wait for the server task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let mut server = self.server;
        // Graceful shutdown waits for open connections; a client keeping one
        // open must not hang a test.
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

/// Serve until ctrl-c: the `prismhook sim prism` command.
pub async fn run(addr: SocketAddr, cfg: PrismConfig) -> anyhow::Result<()> {
    let user = cfg.user.clone();
    let sim = PrismSim::start(addr, cfg).await?;
    println!(
        "Prism simulator at {} (v3 API user `{user}`, control API under /_sim/); ctrl-c stops it",
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

#[derive(Clone)]
struct Sim {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: PrismConfig,
    http: reqwest::Client,
    state: Mutex<SimState>,
}

struct SimState {
    webhooks: Vec<WebhookRec>,
    vms: Vec<SimVm>,
    faults: PrismFaults,
    /// Only fault decisions draw from this, so they depend on nothing else.
    fault_rng: StdRng,
    names: Names,
    held: Vec<Send>,
    log: Vec<DeliveryRecord>,
}

/// Identifiers, and the hosts and subnets they name.
struct Names {
    rng: StdRng,
    hosts: BTreeMap<String, String>,
    subnets: BTreeMap<String, String>,
}

impl Names {
    fn uuid(&mut self) -> String {
        let mut b = [0u8; 16];
        self.rng.fill_bytes(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn mac(&mut self) -> String {
        let mut b = [0u8; 3];
        self.rng.fill_bytes(&mut b);
        format!("50:6b:8d:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
    }

    fn host(&mut self, name: &str) -> String {
        if let Some(uuid) = self.hosts.get(name) {
            return uuid.clone();
        }
        let uuid = self.uuid();
        self.hosts.insert(name.to_owned(), uuid.clone());
        uuid
    }

    fn subnet(&mut self, name: &str) -> String {
        if let Some(uuid) = self.subnets.get(name) {
            return uuid.clone();
        }
        let uuid = self.uuid();
        self.subnets.insert(name.to_owned(), uuid.clone());
        uuid
    }

    fn nic(&mut self, nic: NewNic) -> SimNic {
        let subnet_name = nic.subnet.unwrap_or_else(|| DEFAULT_SUBNET.to_owned());
        SimNic {
            uuid: self.uuid(),
            mac_address: self.mac(),
            ips: nic.ips,
            subnet_uuid: self.subnet(&subnet_name),
            subnet_name,
        }
    }
}

struct WebhookRec {
    uuid: String,
    name: String,
    description: Option<String>,
    post_url: String,
    events: Vec<String>,
    credentials: Option<SimCredentials>,
    spec_version: u64,
    pending_until: Instant,
    /// Set by [`PrismSim::fail_webhook`]; the next update clears it.
    failed: bool,
    creation_time: String,
    last_update_time: String,
}

impl WebhookRec {
    fn state(&self) -> &'static str {
        if self.failed {
            "ERROR"
        } else if Instant::now() < self.pending_until {
            "PENDING"
        } else {
            "COMPLETE"
        }
    }

    /// Whether it sends anything: a new webhook once Prism has applied it
    /// (`COMPLETE`), one updated since with the spec it has now.
    fn in_effect(&self) -> bool {
        self.spec_version > 0 || Instant::now() >= self.pending_until
    }

    fn to_sim(&self) -> SimWebhook {
        SimWebhook {
            uuid: self.uuid.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            post_url: self.post_url.clone(),
            events_filter_list: self.events.clone(),
            credentials: self.credentials.clone(),
            state: self.state().to_owned(),
            spec_version: self.spec_version,
        }
    }

    /// The intent as `GET` and list answer it: no password, and the status
    /// resources only once the intent is `COMPLETE`.
    fn intent(&self) -> Value {
        let mut resources = json!({
            "post_url": self.post_url,
            "events_filter_list": self.events,
        });
        let status_resources = resources.clone();
        if let Some(c) = &self.credentials {
            resources["credentials"] = json!({ "username": c.username });
        }
        let mut spec = json!({ "name": self.name, "resources": resources });
        let state = self.state();
        let mut status = json!({ "state": state });
        if let Some(d) = &self.description {
            spec["description"] = json!(d);
        }
        if state == "COMPLETE" {
            status["name"] = json!(self.name);
            status["resources"] = status_resources;
            if let Some(d) = &self.description {
                status["description"] = json!(d);
            }
        }
        json!({
            "api_version": API_VERSION,
            "metadata": {
                "kind": "webhook",
                "uuid": self.uuid,
                "spec_version": self.spec_version,
                "categories": {},
                "creation_time": self.creation_time,
                "last_update_time": self.last_update_time,
            },
            "spec": spec,
            "status": status,
        })
    }
}

/// One POST to make.
struct Send {
    event_type: String,
    entity_uuid: String,
    entity_version: Option<u64>,
    webhook_uuid: String,
    post_url: String,
    credentials: Option<SimCredentials>,
    body: Arc<Vec<u8>>,
    duplicate: bool,
}

#[derive(Debug, Default, Serialize)]
struct Dispatched {
    /// Webhooks whose filter matched.
    matched: usize,
    /// Webhooks POSTed to now.
    delivered: usize,
    dropped: usize,
    /// Webhooks whose delivery is held for a flush.
    held: usize,
}

/// Errors of the control API and the Rust methods behind it.
#[derive(Debug)]
enum SimError {
    NotFound(String),
    BadRequest(String),
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimError::NotFound(m) | SimError::BadRequest(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for SimError {}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let status = match self {
            SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

impl Sim {
    fn new(cfg: PrismConfig, http: reqwest::Client) -> Self {
        let state = SimState {
            webhooks: Vec::new(),
            vms: Vec::new(),
            faults: PrismFaults::default(),
            fault_rng: StdRng::seed_from_u64(0),
            names: Names {
                rng: StdRng::from_os_rng(),
                hosts: BTreeMap::new(),
                subnets: BTreeMap::new(),
            },
            held: Vec::new(),
            log: Vec::new(),
        };
        Sim {
            inner: Arc::new(Inner {
                cfg,
                http,
                state: Mutex::new(state),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic elsewhere must not turn every later request into a panic.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn faults(&self) -> PrismFaults {
        self.lock().faults.clone()
    }

    fn set_faults(&self, faults: PrismFaults) {
        let mut st = self.lock();
        st.fault_rng = StdRng::seed_from_u64(faults.seed);
        st.faults = faults;
    }

    fn webhooks(&self) -> Vec<SimWebhook> {
        self.lock()
            .webhooks
            .iter()
            .map(WebhookRec::to_sim)
            .collect()
    }

    fn pending_until(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.inner.cfg.pending_ms)
    }

    // --- deliveries -------------------------------------------------------

    async fn dispatch(&self, body: Value) -> Dispatched {
        let event_type = body
            .get("event_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let entity_uuid = body
            .pointer("/entity_reference/uuid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        // A string since AOS 5.x, a number before (`legacy_payloads`).
        let entity_version = body
            .pointer("/data/metadata/metadata/entity_version")
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()));
        let bytes = Arc::new(serde_json::to_vec(&body).expect("a Value serialises"));
        let mut summary = Dispatched::default();
        let mut now = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let faults = st.faults.clone();
            for hook in st
                .webhooks
                .iter()
                .filter(|h| !faults.silent_while_pending || h.in_effect())
                .filter(|h| h.events.contains(&event_type))
            {
                summary.matched += 1;
                if roll(&mut st.fault_rng, faults.drop_rate) {
                    summary.dropped += 1;
                    st.log.push(DeliveryRecord {
                        event_type: event_type.clone(),
                        entity_uuid: entity_uuid.clone(),
                        entity_version,
                        webhook_uuid: hook.uuid.clone(),
                        post_url: hook.post_url.clone(),
                        status: None,
                        dropped: true,
                        duplicate: false,
                        attempt: 0,
                        error: None,
                    });
                    continue;
                }
                let copies = if roll(&mut st.fault_rng, faults.duplicate_rate) {
                    2
                } else {
                    1
                };
                let queue = if faults.reorder {
                    summary.held += 1;
                    &mut st.held
                } else {
                    summary.delivered += 1;
                    &mut now
                };
                for copy in 0..copies {
                    queue.push(Send {
                        event_type: event_type.clone(),
                        entity_uuid: entity_uuid.clone(),
                        entity_version,
                        webhook_uuid: hook.uuid.clone(),
                        post_url: hook.post_url.clone(),
                        credentials: hook.credentials.clone(),
                        body: bytes.clone(),
                        duplicate: copy > 0,
                    });
                }
            }
        }
        tracing::debug!(%event_type, %entity_uuid, ?summary, "prism simulator dispatching");
        self.send_all(now).await;
        summary
    }

    async fn flush(&self) -> usize {
        let held = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let mut held = std::mem::take(&mut st.held);
            held.shuffle(&mut st.fault_rng);
            held
        };
        let n = held.len();
        self.send_all(held).await;
        n
    }

    /// POST one after another on a task of their own, so a caller that goes
    /// away does not cut deliveries short, and wait for them.
    async fn send_all(&self, sends: Vec<Send>) {
        if sends.is_empty() {
            return;
        }
        let sim = self.clone();
        let task = tokio::spawn(async move {
            for send in sends {
                sim.send_one(send).await;
            }
        });
        let _ = task.await;
    }

    async fn send_one(&self, send: Send) {
        let faults = self.faults();
        for attempt in 1..=faults.retries.saturating_add(1) {
            if faults.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
            }
            let mut req = self
                .inner
                .http
                .post(&send.post_url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(send.body.as_ref().clone());
            if let Some(c) = &send.credentials {
                req = req.basic_auth(&c.username, Some(&c.password));
            }
            let (status, error) = match req.send().await {
                Ok(resp) => (Some(resp.status().as_u16()), None),
                Err(e) => (None, Some(error_chain(&e.without_url()))),
            };
            let ok = status.is_some_and(|s| (200..300).contains(&s));
            self.lock().log.push(DeliveryRecord {
                event_type: send.event_type.clone(),
                entity_uuid: send.entity_uuid.clone(),
                entity_version: send.entity_version,
                webhook_uuid: send.webhook_uuid.clone(),
                post_url: send.post_url.clone(),
                status,
                dropped: false,
                duplicate: send.duplicate,
                attempt,
                error,
            });
            if ok {
                return;
            }
            if attempt <= faults.retries {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    // --- VMs --------------------------------------------------------------

    async fn create_vm(&self, new: NewVm) -> Result<VmChange, SimError> {
        if new.name.trim().is_empty() {
            return Err(SimError::BadRequest("a VM needs a `name`".to_owned()));
        }
        let power_on = match new.power_state.as_deref() {
            None => false,
            Some(p) => parse_power(p)?,
        };
        // Like Prism, a VM is created off and then powered on: two events.
        let (uuid, envelope) = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let now = rfc3339(SystemTime::now());
            let host_name = new.host.unwrap_or_else(|| DEFAULT_HOST.to_owned());
            let vm = SimVm {
                uuid: st.names.uuid(),
                name: new.name,
                power_state: "OFF".to_owned(),
                categories: new.categories,
                nics: new.nics.into_iter().map(|n| st.names.nic(n)).collect(),
                host_uuid: st.names.host(&host_name),
                host_name,
                spec_version: 0,
                entity_version: 1,
                creation_time: now.clone(),
                last_update_time: now,
            };
            let envelope = notification(
                "VM.CREATE",
                &vm.uuid,
                vm_intent(&vm, st.faults.legacy_payloads),
            );
            let uuid = vm.uuid.clone();
            st.vms.push(vm);
            (uuid, envelope)
        };
        let mut change = VmChange {
            uuid: uuid.clone(),
            ..VmChange::default()
        };
        change.record("VM.CREATE", self.dispatch(envelope).await.delivered);
        if power_on {
            let delivered = self
                .mutate(&uuid, "VM.ON", |vm, _| {
                    vm.power_state = "ON".to_owned();
                    Ok(())
                })
                .await?;
            change.record("VM.ON", delivered);
        }
        Ok(change)
    }

    /// Name and categories first (`VM.UPDATE`), then power (`VM.ON`/`VM.OFF`);
    /// a field already at the wanted value emits nothing.
    async fn patch_vm(&self, uuid: &str, patch: VmPatch) -> Result<VmChange, SimError> {
        let power = patch.power_state.as_deref().map(parse_power).transpose()?;
        let current = self.vm(uuid)?;
        let mut change = VmChange {
            uuid: uuid.to_owned(),
            ..VmChange::default()
        };
        let rename = patch.name.filter(|n| *n != current.name);
        let recategorise = patch.categories.filter(|c| *c != current.categories);
        if rename.is_some() || recategorise.is_some() {
            let delivered = self
                .mutate(uuid, "VM.UPDATE", |vm, _| {
                    if let Some(name) = rename {
                        vm.name = name;
                    }
                    if let Some(categories) = recategorise {
                        vm.categories = categories;
                    }
                    Ok(())
                })
                .await?;
            change.record("VM.UPDATE", delivered);
        }
        if let Some(on) = power.filter(|on| *on != (current.power_state == "ON")) {
            let event = if on { "VM.ON" } else { "VM.OFF" };
            let delivered = self
                .mutate(uuid, event, |vm, _| {
                    vm.power_state = if on { "ON" } else { "OFF" }.to_owned();
                    Ok(())
                })
                .await?;
            change.record(event, delivered);
        }
        Ok(change)
    }

    async fn plug_nic(&self, uuid: &str, nic: NewNic) -> Result<VmChange, SimError> {
        let mut nic_uuid = String::new();
        let delivered = self
            .mutate(uuid, "VM.NIC_PLUG", |vm, names| {
                let nic = names.nic(nic);
                nic_uuid = nic.uuid.clone();
                vm.nics.push(nic);
                Ok(())
            })
            .await?;
        let mut change = VmChange {
            uuid: uuid.to_owned(),
            nic_uuid: Some(nic_uuid),
            ..VmChange::default()
        };
        change.record("VM.NIC_PLUG", delivered);
        Ok(change)
    }

    async fn unplug_nic(&self, uuid: &str, nic_uuid: &str) -> Result<VmChange, SimError> {
        let delivered = self
            .mutate(uuid, "VM.NIC_UNPLUG", |vm, _| {
                let before = vm.nics.len();
                vm.nics.retain(|n| n.uuid != nic_uuid);
                if vm.nics.len() == before {
                    return Err(SimError::NotFound(format!(
                        "VM {} has no NIC {nic_uuid}",
                        vm.uuid
                    )));
                }
                Ok(())
            })
            .await?;
        Ok(VmChange::one(uuid, "VM.NIC_UNPLUG", delivered))
    }

    async fn set_nic_ips(
        &self,
        uuid: &str,
        nic_uuid: &str,
        ips: Vec<String>,
    ) -> Result<VmChange, SimError> {
        let delivered = self
            .mutate(uuid, "VM.UPDATE", |vm, _| {
                let vm_uuid = vm.uuid.clone();
                let nic = vm
                    .nics
                    .iter_mut()
                    .find(|n| n.uuid == nic_uuid)
                    .ok_or_else(|| {
                        SimError::NotFound(format!("VM {vm_uuid} has no NIC {nic_uuid}"))
                    })?;
                nic.ips = ips;
                Ok(())
            })
            .await?;
        Ok(VmChange::one(uuid, "VM.UPDATE", delivered))
    }

    async fn migrate(&self, uuid: &str, host: &str) -> Result<VmChange, SimError> {
        if host.trim().is_empty() {
            return Err(SimError::BadRequest("migrate needs a `host`".to_owned()));
        }
        let delivered = self
            .mutate(uuid, "VM.MIGRATE", |vm, names| {
                vm.host_uuid = names.host(host);
                vm.host_name = host.to_owned();
                Ok(())
            })
            .await?;
        Ok(VmChange::one(uuid, "VM.MIGRATE", delivered))
    }

    async fn delete_vm(&self, uuid: &str, empty: Option<bool>) -> Result<VmChange, SimError> {
        let envelope = {
            let mut st = self.lock();
            let at = st
                .vms
                .iter()
                .position(|v| v.uuid == uuid)
                .ok_or_else(|| no_vm(uuid))?;
            let mut vm = st.vms.remove(at);
            bump(&mut vm);
            let metadata = if empty.unwrap_or(st.faults.empty_delete_metadata) {
                json!({})
            } else {
                vm_intent(&vm, st.faults.legacy_payloads)
            };
            notification("VM.DELETE", uuid, metadata)
        };
        let delivered = self.dispatch(envelope).await.delivered;
        Ok(VmChange::one(uuid, "VM.DELETE", delivered))
    }

    fn vm(&self, uuid: &str) -> Result<SimVm, SimError> {
        self.lock()
            .vms
            .iter()
            .find(|v| v.uuid == uuid)
            .cloned()
            .ok_or_else(|| no_vm(uuid))
    }

    /// Change a VM, bump its versions and emit `event` with the new intent;
    /// returns the number of webhooks delivered to.
    async fn mutate<F>(&self, uuid: &str, event: &str, change: F) -> Result<usize, SimError>
    where
        F: FnOnce(&mut SimVm, &mut Names) -> Result<(), SimError>,
    {
        let envelope = {
            let mut guard = self.lock();
            let st = &mut *guard;
            // From the newest: a VM being created is powered on at once,
            // which keeps filling an inventory of 200,000 linear.
            let vm = st
                .vms
                .iter_mut()
                .rev()
                .find(|v| v.uuid == uuid)
                .ok_or_else(|| no_vm(uuid))?;
            let mut next = vm.clone();
            change(&mut next, &mut st.names)?;
            bump(&mut next);
            *vm = next;
            notification(event, uuid, vm_intent(vm, st.faults.legacy_payloads))
        };
        Ok(self.dispatch(envelope).await.delivered)
    }
}

impl VmChange {
    fn one(uuid: &str, event: &str, delivered: usize) -> Self {
        let mut change = VmChange {
            uuid: uuid.to_owned(),
            ..VmChange::default()
        };
        change.record(event, delivered);
        change
    }

    fn record(&mut self, event: &str, delivered: usize) {
        self.events.push(event.to_owned());
        self.delivered += delivered;
    }
}

fn no_vm(uuid: &str) -> SimError {
    SimError::NotFound(format!("no VM {uuid}"))
}

fn bump(vm: &mut SimVm) {
    vm.spec_version += 1;
    vm.entity_version += 1;
    vm.last_update_time = rfc3339(SystemTime::now());
}

fn parse_power(p: &str) -> Result<bool, SimError> {
    match p.to_ascii_uppercase().as_str() {
        "ON" => Ok(true),
        "OFF" => Ok(false),
        other => Err(SimError::BadRequest(format!(
            "`power_state` must be ON or OFF, found {other:?}"
        ))),
    }
}

fn roll(rng: &mut StdRng, probability: f64) -> bool {
    probability > 0.0 && rng.random_bool(probability.min(1.0))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------------------
// Payloads

fn notification(event_type: &str, uuid: &str, metadata: Value) -> Value {
    let kind = event_type
        .split_once('.')
        .map_or(event_type, |(kind, _)| kind)
        .to_ascii_lowercase();
    json!({
        "entity_reference": { "kind": kind, "uuid": uuid },
        "data": { "metadata": metadata },
        "version": "1.0",
        "event_type": event_type,
    })
}

/// A VM's v3 intent, in the shape of a Prism Central answer or, with
/// `legacy`, of an older AOS release.
fn vm_intent(vm: &SimVm, legacy: bool) -> Value {
    let on = vm.power_state == "ON";
    let nic_list: Vec<Value> = vm
        .nics
        .iter()
        .map(|n| {
            json!({
                "uuid": n.uuid,
                "nic_type": "NORMAL_NIC",
                "mac_address": n.mac_address,
                "ip_endpoint_list": n.ips.iter().map(|ip| json!({ "ip": ip, "type": "ASSIGNED" })).collect::<Vec<_>>(),
                "subnet_reference": { "kind": "subnet", "name": n.subnet_name, "uuid": n.subnet_uuid },
                "is_connected": true,
            })
        })
        .collect();
    let power = match (legacy, on) {
        (false, true) => "ON",
        (false, false) => "OFF",
        (true, true) => "POWERED_ON",
        (true, false) => "POWERED_OFF",
    };
    let memory_key = if legacy {
        "memory_size_mb"
    } else {
        "memory_size_mib"
    };
    let mut resources = json!({
        "num_sockets": 1,
        "num_vcpus_per_socket": 1,
        memory_key: 1024,
        "power_state": power,
        "nic_list": nic_list,
        "disk_list": [],
    });
    let spec = if legacy {
        json!({})
    } else {
        json!({
            "name": vm.name,
            "resources": resources.clone(),
            "cluster_reference": cluster_reference(),
        })
    };
    resources["hypervisor_type"] = json!("AHV");
    // A powered-off VM runs on no host; Prism omits the reference then.
    if on {
        resources["host_reference"] =
            json!({ "kind": "host", "uuid": vm.host_uuid, "name": vm.host_name });
    }
    let categories_mapping: BTreeMap<&String, [&String; 1]> =
        vm.categories.iter().map(|(k, v)| (k, [v])).collect();
    json!({
        "api_version": API_VERSION,
        "metadata": {
            "kind": "vm",
            "uuid": vm.uuid,
            "spec_version": vm.spec_version,
            "entity_version": if legacy { json!(vm.entity_version) } else { json!(vm.entity_version.to_string()) },
            "categories": vm.categories,
            "categories_mapping": categories_mapping,
            "owner_reference": if legacy { Value::Null } else { json!({ "kind": "user", "name": "admin", "uuid": ADMIN_UUID }) },
            "creation_time": vm.creation_time,
            "last_update_time": vm.last_update_time,
        },
        "spec": spec,
        "status": {
            "name": vm.name,
            "state": if legacy { "kComplete" } else { "COMPLETE" },
            "resources": resources,
            "cluster_reference": cluster_reference(),
        },
    })
}

fn cluster_reference() -> Value {
    json!({ "kind": "cluster", "name": "sim-cluster", "uuid": "0005b0f1-0000-0000-0000-00000000c1a5" })
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the form Prism uses.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------
// HTTP

fn router(sim: Sim) -> Router {
    let v3 = Router::new()
        .route("/users/me", get(users_me))
        .route("/webhooks/list", post(webhooks_list))
        .route("/webhooks", post(webhook_create))
        .route(
            "/webhooks/{uuid}",
            get(webhook_get).put(webhook_put).delete(webhook_delete),
        )
        .route("/vms/list", post(vms_list))
        .layer(middleware::from_fn_with_state(sim.clone(), v3_gate));
    let control = Router::new()
        .route("/_sim/notify", post(sim_notify))
        .route("/_sim/webhooks", get(sim_webhooks))
        .route("/_sim/vms", get(sim_vms).post(sim_create_vm))
        .route("/_sim/vms/{uuid}", put(sim_patch_vm).delete(sim_delete_vm))
        .route("/_sim/vms/{uuid}/nics", post(sim_plug_nic))
        .route(
            "/_sim/vms/{uuid}/nics/{nic_uuid}",
            put(sim_set_nic_ips).delete(sim_unplug_nic),
        )
        .route("/_sim/vms/{uuid}/migrate", post(sim_migrate))
        .route("/_sim/faults", get(sim_get_faults).post(sim_set_faults))
        .route("/_sim/flush", post(sim_flush))
        .route("/_sim/deliveries", get(sim_deliveries));
    Router::new()
        .nest(API_PREFIX, v3)
        .merge(control)
        .with_state(sim)
}

/// Availability, then Basic auth, in front of every v3 route.
async fn v3_gate(State(sim): State<Sim>, req: Request, next: Next) -> Response {
    if sim.faults().unavailable {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>503 Service Unavailable</h1></body></html>",
        )
            .into_response();
    }
    if !authorised(req.headers(), &sim.inner.cfg) {
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::CONTENT_TYPE, "text/html;charset=utf-8"),
                (
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"Intent Gateway Login Required\"",
                ),
            ],
            "<!doctype html><html><head><title>HTTP Status 401 – Unauthorized</title></head>\
             <body><h1>HTTP Status 401 – Unauthorized</h1></body></html>",
        )
            .into_response();
    }
    next.run(req).await
}

fn authorised(headers: &HeaderMap, cfg: &PrismConfig) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{}:{}", cfg.user, cfg.password);
    decoded == expected.as_bytes()
}

/// A v3 error, answered as `{api_version, code, kind, message_list, state}`.
struct V3Error {
    status: StatusCode,
    kind: &'static str,
    reason: &'static str,
    message: String,
}

impl IntoResponse for V3Error {
    fn into_response(self) -> Response {
        let body = json!({
            "api_version": API_VERSION,
            "code": self.status.as_u16(),
            "kind": self.kind,
            "message_list": [{ "message": self.message, "reason": self.reason, "details": {} }],
            "state": "ERROR",
        });
        (self.status, Json(body)).into_response()
    }
}

fn bad_request(kind: &'static str, message: impl Into<String>) -> V3Error {
    V3Error {
        status: StatusCode::BAD_REQUEST,
        kind,
        reason: "INVALID_REQUEST",
        message: message.into(),
    }
}

fn webhook_not_found(uuid: &str) -> V3Error {
    V3Error {
        status: StatusCode::NOT_FOUND,
        kind: "webhook",
        reason: "ENTITY_NOT_FOUND",
        message: format!("ENTITY_NOT_FOUND: webhook : {uuid} does not exist."),
    }
}

fn parse_body(body: &Bytes, kind: &'static str) -> Result<Value, V3Error> {
    serde_json::from_slice::<Value>(body)
        .map_err(|e| bad_request(kind, format!("request body is not valid JSON: {e}")))
}

async fn users_me(State(sim): State<Sim>) -> Response {
    let user = &sim.inner.cfg.user;
    Json(json!({
        "api_version": API_VERSION,
        "metadata": { "kind": "user", "uuid": ADMIN_UUID },
        "spec": {},
        "status": {
            "state": "COMPLETE",
            "name": user,
            "resources": {
                "display_name": user,
                "user_type": "LOCAL",
                "access_control_policy_reference_list": [],
            },
        },
    }))
    .into_response()
}

struct ListRequest {
    offset: usize,
    length: usize,
    /// `(field, value)` of a `field==value` filter.
    filter: Option<(String, String)>,
}

fn parse_list_request(body: &Bytes, kind: &'static str) -> Result<ListRequest, V3Error> {
    let body = if body.is_empty() {
        json!({})
    } else {
        parse_body(body, kind)?
    };
    match body.get("kind").and_then(Value::as_str) {
        Some(k) if k == kind => {}
        other => {
            return Err(bad_request(
                kind,
                format!("`kind` must be \"{kind}\", found {other:?}"),
            ))
        }
    }
    let number = |key: &str| body.get(key).and_then(Value::as_u64).map(|n| n as usize);
    let filter = match body.get("filter").and_then(Value::as_str).map(str::trim) {
        None | Some("") => None,
        Some(f) => match f.split_once("==") {
            Some((field, value)) if !field.is_empty() && !field.contains([';', ',']) => {
                Some((field.to_owned(), value.to_owned()))
            }
            _ => {
                return Err(bad_request(
                    kind,
                    format!("unsupported filter {f:?}: the simulator knows only `field==value`"),
                ))
            }
        },
    };
    Ok(ListRequest {
        offset: number("offset").unwrap_or(0),
        length: number("length")
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_PAGE)
            .min(MAX_PAGE),
        filter,
    })
}

/// One page of a list answer: only the page's entities are built, so
/// reading a large inventory page by page stays linear.
fn list_response<T>(
    kind: &str,
    req: &ListRequest,
    matching: impl Iterator<Item = T>,
    entity: impl Fn(T) -> Value,
) -> Response {
    let mut total = 0;
    let mut page = Vec::new();
    for (n, item) in matching.enumerate() {
        total += 1;
        if n >= req.offset && page.len() < req.length {
            page.push(entity(item));
        }
    }
    Json(json!({
        "api_version": API_VERSION,
        "metadata": {
            "total_matches": total,
            "kind": kind,
            "length": page.len(),
            "offset": req.offset,
        },
        "entities": page,
    }))
    .into_response()
}

async fn webhooks_list(State(sim): State<Sim>, body: Bytes) -> Result<Response, V3Error> {
    let req = parse_list_request(&body, "webhook")?;
    let st = sim.lock();
    let matching = st.webhooks.iter().filter(|h| match &req.filter {
        None => true,
        Some((field, value)) if field == "name" => h.name == *value,
        Some(_) => false,
    });
    let lagging = st.faults.list_lags_one_update;
    Ok(list_response("webhook", &req, matching, |h| {
        let mut intent = h.intent();
        if lagging && h.spec_version > 0 {
            intent["metadata"]["spec_version"] = json!(h.spec_version - 1);
        }
        intent
    }))
}

async fn vms_list(State(sim): State<Sim>, body: Bytes) -> Result<Response, V3Error> {
    let req = parse_list_request(&body, "vm")?;
    let st = sim.lock();
    if st
        .faults
        .vms_list_fails_from
        .is_some_and(|from| req.offset >= from)
    {
        return Err(V3Error {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "vm",
            reason: "INTERNAL_ERROR",
            message: format!("INTERNAL_ERROR: listing VMs from offset {}", req.offset),
        });
    }
    let legacy = st.faults.legacy_payloads;
    let matching = st.vms.iter().filter(|vm| match &req.filter {
        None => true,
        Some((field, value)) if field == "vm_name" => vm.name == *value,
        Some(_) => false,
    });
    Ok(list_response("vm", &req, matching, |vm| {
        vm_intent(vm, legacy)
    }))
}

/// The fields of a create or update body that the simulator keeps.
struct WebhookInput {
    name: String,
    description: Option<String>,
    post_url: String,
    events: Vec<String>,
    credentials: Option<SimCredentials>,
}

fn parse_webhook_input(body: &Value) -> Result<WebhookInput, V3Error> {
    let fail = |m: &str| Err(bad_request("webhook", m));
    if body.pointer("/metadata/kind").and_then(Value::as_str) != Some("webhook") {
        return fail("metadata.kind: must be \"webhook\"");
    }
    let name = body
        .pointer("/spec/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name.trim().is_empty() {
        return fail("spec.name: This field may not be blank.");
    }
    let post_url = body
        .pointer("/spec/resources/post_url")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !(post_url.starts_with("http://") || post_url.starts_with("https://")) {
        return fail("spec.resources.post_url: must be an http or https URL");
    }
    let events: Vec<String> = match body
        .pointer("/spec/resources/events_filter_list")
        .and_then(Value::as_array)
    {
        Some(list) if !list.is_empty() => {
            let names: Option<Vec<String>> = list
                .iter()
                .map(|e| e.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
                .collect();
            match names {
                Some(names) => names,
                None => {
                    return fail("spec.resources.events_filter_list: entries must be event names")
                }
            }
        }
        _ => return fail("spec.resources.events_filter_list: This list may not be empty."),
    };
    let credentials = match body.pointer("/spec/resources/credentials") {
        None | Some(Value::Null) => None,
        Some(c) => match (
            c.get("username").and_then(Value::as_str),
            c.get("password").and_then(Value::as_str),
        ) {
            (Some(u), Some(p)) => Some(SimCredentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }),
            _ => return fail("spec.resources.credentials: needs `username` and `password`"),
        },
    };
    Ok(WebhookInput {
        name: name.to_owned(),
        description: body
            .pointer("/spec/description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        post_url: post_url.to_owned(),
        events,
        credentials,
    })
}

/// The 202 of a create or update: the spec without credentials and a task.
fn accepted(rec: &WebhookRec, names: &mut Names) -> Response {
    let mut spec = json!({
        "name": rec.name,
        "resources": { "post_url": rec.post_url, "events_filter_list": rec.events },
    });
    if let Some(d) = &rec.description {
        spec["description"] = json!(d);
    }
    let body = json!({
        "api_version": API_VERSION,
        "metadata": { "kind": "webhook", "uuid": rec.uuid, "spec_version": rec.spec_version },
        "spec": spec,
        "status": { "state": "PENDING", "execution_context": { "task_uuid": names.uuid() } },
    });
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

async fn webhook_create(State(sim): State<Sim>, body: Bytes) -> Result<Response, V3Error> {
    let input = parse_webhook_input(&parse_body(&body, "webhook")?)?;
    let pending_until = sim.pending_until();
    let mut guard = sim.lock();
    let st = &mut *guard;
    let now = rfc3339(SystemTime::now());
    let rec = WebhookRec {
        uuid: st.names.uuid(),
        name: input.name,
        description: input.description,
        post_url: input.post_url,
        events: input.events,
        credentials: input.credentials,
        spec_version: 0,
        pending_until,
        failed: false,
        creation_time: now.clone(),
        last_update_time: now,
    };
    let resp = accepted(&rec, &mut st.names);
    st.webhooks.push(rec);
    Ok(resp)
}

async fn webhook_get(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, V3Error> {
    let st = sim.lock();
    let hook = st.webhooks.iter().find(|h| h.uuid == uuid);
    hook.map(|h| Json(h.intent()))
        .ok_or_else(|| webhook_not_found(&uuid))
}

async fn webhook_put(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
    body: Bytes,
) -> Result<Response, V3Error> {
    let body = parse_body(&body, "webhook")?;
    let input = parse_webhook_input(&body)?;
    if let Some(other) = body.pointer("/metadata/uuid").and_then(Value::as_str) {
        if other != uuid {
            return Err(bad_request(
                "webhook",
                format!("metadata.uuid {other} does not match the URL's {uuid}"),
            ));
        }
    }
    let Some(spec_version) = body
        .pointer("/metadata/spec_version")
        .and_then(Value::as_u64)
    else {
        return Err(bad_request(
            "webhook",
            "metadata.spec_version: This field is required.",
        ));
    };
    let pending_until = sim.pending_until();
    let mut guard = sim.lock();
    let st = &mut *guard;
    let Some(rec) = st.webhooks.iter_mut().find(|h| h.uuid == uuid) else {
        return Err(webhook_not_found(&uuid));
    };
    if spec_version != rec.spec_version {
        return Err(V3Error {
            status: StatusCode::CONFLICT,
            kind: "webhook",
            reason: "SPEC_VERSION_MISMATCH",
            message: format!(
                "spec_version mismatch: request has {spec_version}, webhook {uuid} is at {}",
                rec.spec_version
            ),
        });
    }
    // Like Prism, the spec is replaced whole: credentials left out are gone.
    rec.name = input.name;
    rec.description = input.description;
    rec.post_url = input.post_url;
    rec.events = input.events;
    rec.credentials = input.credentials;
    rec.spec_version += 1;
    rec.pending_until = pending_until;
    rec.failed = false;
    rec.last_update_time = rfc3339(SystemTime::now());
    Ok(accepted(rec, &mut st.names))
}

async fn webhook_delete(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
) -> Result<Response, V3Error> {
    let mut guard = sim.lock();
    let st = &mut *guard;
    let Some(at) = st.webhooks.iter().position(|h| h.uuid == uuid) else {
        return Err(webhook_not_found(&uuid));
    };
    st.webhooks.remove(at);
    let body = json!({
        "api_version": API_VERSION,
        "metadata": { "kind": "webhook" },
        "spec": "",
        "status": { "state": "DELETE_PENDING", "execution_context": { "task_uuid": st.names.uuid() } },
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

// --- control API -------------------------------------------------------------

async fn sim_notify(State(sim): State<Sim>, Json(body): Json<Value>) -> Response {
    if body.get("event_type").and_then(Value::as_str).is_none() {
        return SimError::BadRequest("the notification has no string `event_type`".to_owned())
            .into_response();
    }
    Json(sim.dispatch(body).await).into_response()
}

async fn sim_webhooks(State(sim): State<Sim>) -> Json<Vec<SimWebhook>> {
    Json(sim.webhooks())
}

async fn sim_vms(State(sim): State<Sim>) -> Json<Vec<SimVm>> {
    Json(sim.lock().vms.clone())
}

async fn sim_create_vm(
    State(sim): State<Sim>,
    Json(vm): Json<NewVm>,
) -> Result<Json<VmChange>, SimError> {
    sim.create_vm(vm).await.map(Json)
}

async fn sim_patch_vm(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
    Json(patch): Json<VmPatch>,
) -> Result<Json<VmChange>, SimError> {
    sim.patch_vm(&uuid, patch).await.map(Json)
}

#[derive(Deserialize)]
struct DeleteQuery {
    /// `empty` or `full`; the faults' setting when absent.
    metadata: Option<String>,
}

async fn sim_delete_vm(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Json<VmChange>, SimError> {
    let empty = match q.metadata.as_deref() {
        None => None,
        Some("empty") => Some(true),
        Some("full") => Some(false),
        Some(other) => {
            return Err(SimError::BadRequest(format!(
                "`metadata` must be empty or full, found {other:?}"
            )))
        }
    };
    sim.delete_vm(&uuid, empty).await.map(Json)
}

async fn sim_plug_nic(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
    Json(nic): Json<NewNic>,
) -> Result<Json<VmChange>, SimError> {
    sim.plug_nic(&uuid, nic).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NicIps {
    ips: Vec<String>,
}

async fn sim_set_nic_ips(
    State(sim): State<Sim>,
    Path((uuid, nic_uuid)): Path<(String, String)>,
    Json(body): Json<NicIps>,
) -> Result<Json<VmChange>, SimError> {
    sim.set_nic_ips(&uuid, &nic_uuid, body.ips).await.map(Json)
}

async fn sim_unplug_nic(
    State(sim): State<Sim>,
    Path((uuid, nic_uuid)): Path<(String, String)>,
) -> Result<Json<VmChange>, SimError> {
    sim.unplug_nic(&uuid, &nic_uuid).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateTo {
    host: String,
}

async fn sim_migrate(
    State(sim): State<Sim>,
    Path(uuid): Path<String>,
    Json(to): Json<MigrateTo>,
) -> Result<Json<VmChange>, SimError> {
    sim.migrate(&uuid, &to.host).await.map(Json)
}

async fn sim_get_faults(State(sim): State<Sim>) -> Json<PrismFaults> {
    Json(sim.faults())
}

async fn sim_set_faults(State(sim): State<Sim>, Json(faults): Json<PrismFaults>) -> StatusCode {
    sim.set_faults(faults);
    StatusCode::NO_CONTENT
}

async fn sim_flush(State(sim): State<Sim>) -> Json<Value> {
    Json(json!({ "delivered": sim.flush().await }))
}

async fn sim_deliveries(State(sim): State<Sim>) -> Json<Vec<DeliveryRecord>> {
    Json(sim.lock().log.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_749_320_632);
        assert_eq!(rfc3339(t), "2025-06-07T18:23:52Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn uuids_have_the_v4_layout() {
        let mut names = Names {
            rng: StdRng::seed_from_u64(7),
            hosts: BTreeMap::new(),
            subnets: BTreeMap::new(),
        };
        let uuid = names.uuid();
        let parts: Vec<&str> = uuid.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert_ne!(uuid, names.uuid());
    }
}
