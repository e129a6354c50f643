//! The JSON the admin API speaks, shared by the server and [`super::client`].
//!
//! These are wire types, kept apart from the host's internal structs so that
//! a refactoring inside the host does not silently change what scripts and
//! the CLI read.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dispatch::{Counters, Quarantine};
use crate::ledger::{DeadLetter, DeadLetterCursor, PluginBacklog};
use crate::registry::{PluginState, PluginStatus};
use crate::runtime::Tier;
use crate::source::EndpointStatus;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Error {
    pub error: String,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why not ready; empty when ready.
    pub reasons: Vec<String>,
}

/// One plugin in `GET /api/plugins`: what is loaded, how its deliveries went
/// since the host started, and what the ledger holds for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginReport {
    pub name: String,
    /// `active`, `quarantined` or `failed`; `unloaded` for a plugin that
    /// only the ledger still knows (it has dead letters or old deliveries).
    pub state: String,
    /// Why quarantined or failed.
    pub reason: Option<String>,
    /// When a quarantine ends.
    pub until_ms: Option<u64>,
    /// The component's own name when this plugin is an instance of it
    /// (`[plugin.fw-dc1] component = "paloalto.wasm"`).
    #[serde(default)]
    pub component: Option<String>,
    pub version: Option<String>,
    pub file: Option<PathBuf>,
    pub sha256: Option<String>,
    /// Which compiler's code serves: `baseline` (Winch, until Cranelift's
    /// is ready) or `optimized`.
    #[serde(default)]
    pub tier: Option<Tier>,
    /// Whether its calls start from a snapshot of its instance after
    /// `init` instead of running `init` (docs/plugins.md, "The contract").
    #[serde(default)]
    pub pre_initialised: Option<bool>,
    /// Why its calls run `init`, when its snapshot could not be made (its
    /// `init` calls the host, …).
    #[serde(default)]
    pub init_every_call: Option<String>,
    /// Why the newest file could not be loaded while an older version serves.
    pub load_error: Option<String>,
    pub subscriptions: Vec<String>,
    pub counters: PluginCounters,
    pub backlog: PluginBacklog,
}

/// Delivery counts since the host started (the ledger's `delivered` is the
/// all-time count).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginCounters {
    pub calls: u64,
    pub failed_calls: u64,
    pub delivered: u64,
    pub retried: u64,
    pub rejected: u64,
    pub consecutive_failures: u32,
    pub quarantines: u32,
    /// Calls failed by a kv conflict, made again (also in
    /// `failed_calls`); absent from hosts before it.
    #[serde(default)]
    pub kv_conflicts: u64,
    /// Total time spent in `handle`.
    pub handle_seconds: f64,
}

impl From<&Counters> for PluginCounters {
    fn from(c: &Counters) -> Self {
        PluginCounters {
            calls: c.calls,
            failed_calls: c.failed_calls,
            delivered: c.delivered,
            retried: c.retried,
            rejected: c.rejected,
            consecutive_failures: c.consecutive_failures,
            quarantines: c.quarantines,
            kv_conflicts: c.kv_conflicts,
            handle_seconds: c.handle_time.as_secs_f64(),
        }
    }
}

/// The lower-case name of a plugin's state, as in the API and the metrics:
/// its load (from the registry) and whether its deliveries are paused
/// (from the dispatcher).
pub fn state_name(state: &PluginState, quarantined: bool) -> &'static str {
    match state {
        PluginState::Failed { .. } => "failed",
        PluginState::Active if quarantined => "quarantined",
        PluginState::Active => "active",
    }
}

/// Joins the registry's view, the dispatcher's counters and quarantines and
/// the ledger's backlog by plugin name, loaded plugins first.
pub(super) fn plugin_reports(
    statuses: BTreeMap<String, PluginStatus>,
    counters: BTreeMap<String, Counters>,
    quarantined: BTreeMap<String, Quarantine>,
    backlog: Vec<PluginBacklog>,
) -> Vec<PluginReport> {
    let mut backlog: BTreeMap<String, PluginBacklog> =
        backlog.into_iter().map(|b| (b.plugin.clone(), b)).collect();
    let counters_of = |name: &str| {
        counters
            .get(name)
            .map(PluginCounters::from)
            .unwrap_or_default()
    };
    let mut reports: Vec<PluginReport> = statuses
        .into_values()
        .map(|s| {
            let quarantine = quarantined.get(&s.name);
            let (reason, until_ms) = match (&s.state, quarantine) {
                (PluginState::Failed { reason }, _) => (Some(reason.clone()), None),
                (PluginState::Active, Some(q)) => (Some(q.reason.clone()), Some(q.until_ms)),
                (PluginState::Active, None) => (None, None),
            };
            PluginReport {
                state: state_name(&s.state, quarantine.is_some()).to_owned(),
                reason,
                until_ms,
                counters: counters_of(&s.name),
                backlog: backlog
                    .remove(&s.name)
                    .unwrap_or_else(|| PluginBacklog::empty(&s.name)),
                component: s.component,
                version: s.version,
                file: s.file,
                sha256: s.sha256,
                tier: s.tier,
                pre_initialised: s.pre_initialised,
                init_every_call: s.init_every_call,
                load_error: s.load_error,
                subscriptions: s.subscriptions,
                name: s.name,
            }
        })
        .collect();
    // Removed plugins still matter while the ledger holds their dead letters.
    reports.extend(backlog.into_values().map(|b| PluginReport {
        name: b.plugin.clone(),
        state: "unloaded".into(),
        reason: None,
        until_ms: None,
        component: None,
        version: None,
        file: None,
        sha256: None,
        tier: None,
        pre_initialised: None,
        init_every_call: None,
        load_error: None,
        subscriptions: Vec::new(),
        counters: counters_of(&b.plugin),
        backlog: b,
    }));
    reports
}

/// One cluster in `GET /api/clusters`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterReport {
    pub name: String,
    pub prism_url: String,
    /// Whether this host's webhook is registered in Prism.
    pub registered: bool,
    pub webhook_uuid: Option<String>,
    pub registered_events: Vec<String>,
    pub last_error: Option<String>,
    pub last_sync_ms: Option<u64>,
    pub last_reconcile_ms: Option<u64>,
    /// Each plugin's summary of the last reconcile.
    pub last_reconcile: Vec<String>,
}

impl From<EndpointStatus> for ClusterReport {
    fn from(s: EndpointStatus) -> Self {
        ClusterReport {
            name: s.name,
            prism_url: s.url,
            registered: s.registered,
            webhook_uuid: s.registration,
            registered_events: s.registered_events,
            last_error: s.last_error,
            last_sync_ms: s.last_sync_ms,
            last_reconcile_ms: s.last_reconcile_ms,
            last_reconcile: s.last_reconcile,
        }
    }
}

/// The query of `GET /api/dlq`: one page of the dead letters, by plugin and
/// event id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DlqQuery {
    pub plugin: Option<String>,
    /// At most this many (default 100, at most 10,000).
    pub limit: Option<usize>,
    /// The page starts after this plugin's letter of `after_event` (the
    /// previous page's `next`); both or neither.
    pub after_plugin: Option<String>,
    pub after_event: Option<u64>,
    /// `false` leaves each event's body and decoded VM out (default `true`).
    pub bodies: Option<bool>,
}

/// `GET /api/dlq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetters {
    /// All dead letters of the selection; `dead_letters` lists a page of
    /// them by plugin and event id.
    pub total: u64,
    pub dead_letters: Vec<DeadLetter>,
    /// Where the next page starts, when this one ended at its `limit` or at
    /// the bytes a page may hold (see the API's docs); absent at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<DeadLetterCursor>,
}

/// The body of `POST /api/dlq/replay` and `POST /api/dlq/drop`: the dead
/// letters of one plugin, of some events, or both. An unknown field is
/// refused: a misspelt `ids` would otherwise select all of the plugin's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqSelection {
    pub plugin: Option<String>,
    /// Event ids.
    pub ids: Option<Vec<u64>>,
    /// Required by drop to select every dead letter, so that an empty body
    /// never drops everything by accident. Replay needs no such guard.
    #[serde(default)]
    pub all: bool,
}

/// How many deliveries an action touched.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Count {
    pub count: u64,
}

/// The body of `POST /api/replay`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    pub plugin: String,
    /// Events received at or after this time (ms since the Unix epoch).
    pub since_ms: u64,
    /// Only these event types (or subscriptions, `VM.*`) of those the plugin
    /// subscribes to; every one it subscribes to when absent.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
}

/// The body of `POST /api/reconcile`; absent or without `cluster` = all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    pub cluster: Option<String>,
}

/// One cluster's reconcile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileResult {
    pub cluster: String,
    /// `plugin: summary` per plugin.
    pub plugins: Vec<String>,
    /// Why the cluster's inventory could not be read.
    pub error: Option<String>,
}
