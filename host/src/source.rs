//! Where events come from: the seam between the host and a system that
//! sends notifications.
//!
//! An [`EventSource`] is shaped like a Spin trigger: it has a kind, reads
//! its own part of the configuration, serves the HTTP routes its
//! notifications arrive on, decodes each one once at ingest into the host's
//! model ([`crate::event`]), keeps its registration with the upstream system
//! (webhooks) in step with what the plugins subscribe to, hands the plugins
//! the upstream inventory now and then (reconcile), and reports its status.
//! Nutanix Prism ([`crate::nutanix::NutanixSource`]) is the first; the rest
//! of the host (listener, ledger, dispatcher, admin API) knows only this
//! interface.
//!
//! An *endpoint* is one upstream system a source talks to: for Nutanix, a
//! cluster. Its name is what the ledger stores as an event's `cluster` and
//! what the operator names in `reconcile --cluster`.

use async_trait::async_trait;
use axum::Router;
use futures_util::stream::BoxStream;
use serde::Serialize;
use tokio::sync::watch;

use crate::event::Vm;
use crate::listener::Ingest;

/// One upstream system's state, as operators see it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointStatus {
    pub name: String,
    /// Where the source reaches it (for Nutanix, the Prism URL).
    pub url: String,
    /// Whether this host's registration (webhook) is in place.
    pub registered: bool,
    /// The upstream system's id of that registration.
    pub registration: Option<String>,
    pub registered_events: Vec<String>,
    pub last_error: Option<String>,
    pub last_sync_ms: Option<u64>,
    pub last_reconcile_ms: Option<u64>,
    /// Each plugin's summary of the last reconcile.
    pub last_reconcile: Vec<String>,
}

/// One endpoint's reconcile, run on request.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    pub endpoint: String,
    /// `plugin: summary` per plugin.
    pub plugins: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("no {kind} endpoint named `{name}` is configured")]
    UnknownEndpoint { kind: &'static str, name: String },
}

/// An endpoint's whole inventory, a page at a time, read when the sink is
/// ready for it. It ends after the last page, or with an error; an
/// inventory is whole only when it ended without one.
pub type Listing<'a> = BoxStream<'a, anyhow::Result<Vec<Vm>>>;

/// Where a source hands an endpoint's whole inventory: every plugin that
/// keeps state about VMs gets it (the dispatcher implements this).
#[async_trait]
pub trait InventorySink: Send + Sync {
    /// Reads the inventory with `listing` and hands it to those plugins,
    /// with no delivery to them running meanwhile on this host or on any
    /// host sharing its ledger: an event applied between the reading and
    /// the hand-over would be undone by the older inventory. Plugins that
    /// take it a page at a time are handed each page as it is read.
    async fn reconcile(
        &self,
        endpoint: &str,
        listing: Listing<'_>,
    ) -> Result<Reconciled, InventoryError>;
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading the inventory: {0:#}")]
    Listing(anyhow::Error),
    #[error("pausing the deliveries for the reconcile: {0}")]
    Pause(String),
}

/// What handing an inventory to the plugins did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconciled {
    /// One `plugin: summary` (or `plugin: failed: reason`) line per plugin
    /// that was handed the inventory.
    pub lines: Vec<String>,
    /// How many of those plugins failed: a source tries again with backoff
    /// rather than at its next interval.
    pub failed: usize,
}

/// What a source's background work is given when the host starts it.
#[derive(Clone)]
pub struct SourceContext {
    /// The union of the loaded plugins' subscriptions; changes only when it
    /// does (see `Registry::watch_subscriptions`).
    pub subscriptions: watch::Receiver<crate::registry::Subscriptions>,
    pub inventory: std::sync::Arc<dyn InventorySink>,
    /// Whether this host leads the hosts that share its ledger (always, for a host alone):
    /// periodic reconciles run on the leader only, so that a firewall is not reconciled by
    /// every host at once.
    pub leadership: watch::Receiver<bool>,
}

/// A system that sends the host notifications.
#[async_trait]
pub trait EventSource: Send + Sync + 'static {
    /// A short name for logs and status: `nutanix`.
    fn kind(&self) -> &'static str;

    /// The routes notifications arrive on. Each handler authenticates the
    /// sender, decodes the body, and hands the event to `ingest`, which
    /// stores it before answering.
    fn routes(&self, ingest: Ingest) -> Router;

    /// Starts the background work (registration, reconcile timers). Called
    /// once, after the listener accepts, so that nothing the upstream
    /// system sends after registration is lost.
    fn start(&self, ctx: SourceContext) -> anyhow::Result<()>;

    /// Every endpoint's state.
    fn status(&self) -> Vec<EndpointStatus>;

    /// Reconciles one endpoint, or all, now, and waits for the plugins'
    /// summaries.
    async fn reconcile(&self, endpoint: Option<&str>) -> Result<Vec<ReconcileReport>, SourceError>;

    /// Stops the background work; with `deregister`, also removes this
    /// host's registrations upstream.
    async fn stop(&self, deregister: bool);
}
