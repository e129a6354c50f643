//! The set of loaded plugins, swapped as a whole by the reload task.
//!
//! Readers (the listener routing an event, a dispatcher worker starting a
//! batch) take a snapshot; a batch keeps the plugin version it started with,
//! so a replaced plugin finishes its in-flight batches while new batches go
//! to the new version.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::watch;

use crate::runtime::{Plugin, Tier};

/// What operators see of one plugin.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum PluginState {
    /// Loaded and serving. Whether its deliveries are paused after
    /// repeated failed calls is the dispatcher's to say (its quarantine).
    Active,
    /// The file could not be loaded; the previous version (if any) serves.
    Failed { reason: String },
}

#[derive(Clone)]
pub struct Entry {
    /// `None` when the plugin's file failed to load and no earlier version
    /// exists.
    pub plugin: Option<Plugin>,
    pub state: PluginState,
    pub coalesce: bool,
    /// Why the newest file could not be loaded, while an older version
    /// (if `plugin` is set) keeps serving.
    pub load_error: Option<String>,
}

impl Entry {
    /// Subscriptions of the serving version.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.plugin.as_ref().is_some_and(|p| {
            p.info()
                .subscriptions
                .iter()
                .any(|s| matches(s, event_type))
        })
    }
}

pub use crate::event::matches;

pub type Snapshot = Arc<BTreeMap<String, Entry>>;

/// What `plugins list` shows of one plugin's load.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    pub name: String,
    /// The component's own name (its `init`'s) when this plugin is an
    /// instance of it.
    pub component: Option<String>,
    pub version: Option<String>,
    pub file: Option<PathBuf>,
    pub sha256: Option<String>,
    pub tier: Option<Tier>,
    /// Whether its calls start from the snapshot after `init`.
    pub pre_initialised: Option<bool>,
    /// Why they run `init` instead, when a snapshot was tried.
    pub init_every_call: Option<String>,
    #[serde(flatten)]
    pub state: PluginState,
    pub load_error: Option<String>,
    pub subscriptions: Vec<String>,
}

/// What the webhook's event list is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscriptions {
    /// Every serving plugin's subscriptions (sorted, without repeats;
    /// patterns kept as patterns, the registrar expands them).
    pub union: Vec<String>,
    /// Some plugin's file failed to load and no earlier version of it
    /// serves: what it subscribes to is not known, so `union` may lack it.
    pub incomplete: bool,
}

#[derive(Clone)]
pub struct Registry {
    current: Arc<RwLock<Snapshot>>,
    changed: watch::Sender<u64>,
    subscriptions: watch::Sender<Subscriptions>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            current: Arc::default(),
            changed: watch::channel(0).0,
            subscriptions: watch::channel(Subscriptions::default()).0,
        }
    }
}

impl Registry {
    pub fn snapshot(&self) -> Snapshot {
        self.current.read().expect("registry lock").clone()
    }

    pub fn get(&self, name: &str) -> Option<Entry> {
        self.snapshot().get(name).cloned()
    }

    /// Names of the plugins an event of this type goes to. Quarantined
    /// plugins still get deliveries queued: quarantine pauses delivery, it
    /// does not drop events.
    pub fn subscribers(&self, event_type: &str) -> Vec<String> {
        self.snapshot()
            .iter()
            .filter(|(_, e)| e.subscribes_to(event_type))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The union of every plugin's subscriptions, for the webhook's event
    /// list.
    pub fn subscriptions(&self) -> Subscriptions {
        self.subscriptions.borrow().clone()
    }

    /// Replaces the whole set in one step and tells watchers.
    pub fn update(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>)) {
        let mut guard = self.current.write().expect("registry lock");
        let mut next = (**guard).clone();
        f(&mut next);
        let union = Subscriptions {
            union: union_of(&next),
            incomplete: next.values().any(|e| e.plugin.is_none()),
        };
        *guard = Arc::new(next);
        drop(guard);
        self.changed.send_modify(|v| *v += 1);
        self.subscriptions.send_if_modified(|current| {
            let changed = *current != union;
            if changed {
                *current = union;
            }
            changed
        });
    }

    /// Fires after every `update`.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// [`Registry::subscriptions`]; fires only when they change.
    pub fn watch_subscriptions(&self) -> watch::Receiver<Subscriptions> {
        self.subscriptions.subscribe()
    }

    /// Each plugin's load as operators see it, by name.
    pub fn status(&self) -> BTreeMap<String, PluginStatus> {
        self.snapshot()
            .iter()
            .map(|(name, e)| {
                let p = e.plugin.as_ref();
                let status = PluginStatus {
                    name: name.clone(),
                    component: p
                        .filter(|p| p.instance().is_some())
                        .map(|p| p.info().name.clone()),
                    version: p.map(|p| p.info().version.clone()),
                    file: p.map(|p| p.file().to_owned()),
                    sha256: p.map(|p| p.sha256().to_owned()),
                    tier: p.map(|p| p.tier()),
                    pre_initialised: p.map(|p| p.pre_initialised()),
                    init_every_call: p.and_then(|p| p.init_every_call().map(str::to_owned)),
                    state: e.state.clone(),
                    load_error: e.load_error.clone(),
                    subscriptions: p
                        .map(|p| p.info().subscriptions.clone())
                        .unwrap_or_default(),
                };
                (name.clone(), status)
            })
            .collect()
    }
}

fn union_of(plugins: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut all: Vec<String> = plugins
        .values()
        .filter_map(|e| e.plugin.as_ref())
        .flat_map(|p| p.info().subscriptions.iter().cloned())
        .collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn subscriptions_match_exact_kind_and_all_patterns() {
        assert!(matches("VM.ON", "VM.ON"));
        assert!(matches("vm.on", "VM.ON"));
        assert!(!matches("VM.ON", "VM.OFF"));
        assert!(matches("VM.*", "VM.NIC_PLUG"));
        assert!(!matches("VM.*", "SUBNET.CREATE"));
        assert!(matches("*", "SUBNET.CREATE"));
    }
}
