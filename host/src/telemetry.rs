//! Counters the event path keeps for the admin API's metrics.
//!
//! They are defined here, below the listener and the dispatcher that feed
//! them, so that the admin module reads them without anything on the event
//! path depending on the admin module.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds (seconds) of the `handle` duration buckets: from a trivial
/// batch to the longest deadline worth configuring.
const HANDLE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub type PluginLabel = [(&'static str, String); 1];

/// Durations of `handle` calls per plugin. Cheap to clone; clones share the
/// histograms. A distribution cannot be rebuilt from a total at scrape
/// time, so the dispatcher records every call, successful or not.
#[derive(Clone, Debug)]
pub struct HandleDurations {
    family: Family<PluginLabel, Histogram, fn() -> Histogram>,
}

impl Default for HandleDurations {
    fn default() -> Self {
        HandleDurations {
            family: Family::new_with_constructor(|| Histogram::new(HANDLE_BUCKETS)),
        }
    }
}

impl HandleDurations {
    pub fn observe(&self, plugin: &str, elapsed: Duration) {
        self.family
            .get_or_create(&[("plugin", plugin.to_owned())])
            .observe(elapsed.as_secs_f64());
    }

    /// The histograms, for registering with a metrics registry.
    pub fn family(&self) -> Family<PluginLabel, Histogram, fn() -> Histogram> {
        self.family.clone()
    }
}

/// Event type → status → count.
type ByType = HashMap<String, HashMap<u16, u64>>;

/// Distinct event types counted per endpoint; the rest count as
/// [`OTHER_EVENT_TYPES`].
pub const MAX_EVENT_TYPES: usize = 64;
pub const OTHER_EVENT_TYPES: &str = "other";

/// Counts of what the listener answered, by endpoint (cluster), event type
/// and HTTP status.
#[derive(Default)]
pub struct ListenerStats {
    /// Endpoint → event type → status → count: nested so that counting a
    /// request allocates nothing once its endpoint and type have been seen.
    by_key: Mutex<HashMap<String, ByType>>,
    /// Events stored that no loaded plugin subscribed to.
    pub unsubscribed: AtomicU64,
}

impl ListenerStats {
    pub fn count(&self, endpoint: &str, event_type: &str, status: u16) {
        let mut by_key = self.by_key.lock().expect("stats lock");
        let by_type = match by_key.get_mut(endpoint) {
            Some(m) => m,
            None => by_key.entry(endpoint.to_owned()).or_default(),
        };
        // Senders choose event types: past a bound, new ones share a label
        // instead of adding series to every scrape forever.
        let event_type = if by_type.len() >= MAX_EVENT_TYPES && !by_type.contains_key(event_type) {
            OTHER_EVENT_TYPES
        } else {
            event_type
        };
        let by_status = match by_type.get_mut(event_type) {
            Some(m) => m,
            None => by_type.entry(event_type.to_owned()).or_default(),
        };
        *by_status.entry(status).or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<((String, String, u16), u64)> {
        let by_key = self.by_key.lock().expect("stats lock");
        let mut v: Vec<_> = by_key
            .iter()
            .flat_map(|(endpoint, by_type)| {
                by_type.iter().flat_map(move |(event_type, by_status)| {
                    by_status.iter().map(move |(status, n)| {
                        ((endpoint.clone(), event_type.clone(), *status), *n)
                    })
                })
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_past_the_bound_share_one_label() {
        let stats = ListenerStats::default();
        for i in 0..(MAX_EVENT_TYPES + 10) {
            stats.count("lab", &format!("KIND.A{i}"), 202);
        }
        stats.count("lab", "KIND.A0", 202);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.len(), MAX_EVENT_TYPES + 1);
        let count = |t: &str| {
            snapshot
                .iter()
                .find(|((_, et, _), _)| et == t)
                .map(|(_, n)| *n)
        };
        assert_eq!(count(OTHER_EVENT_TYPES), Some(10));
        assert_eq!(
            count("KIND.A0"),
            Some(2),
            "a type already counted keeps its label"
        );
    }
}
