//! Waking a plugin's dispatcher when the ledger has something for it, the same way in every
//! backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::ledger::Wake;

/// One `Notify` per plugin, with a stored permit (`notify_one`), so that a signal raised while
/// nobody waits wakes the next wait at once.
#[derive(Debug, Default)]
pub(crate) struct Notifiers(Mutex<HashMap<String, Arc<Notify>>>);

impl Notifiers {
    pub fn get(&self, plugin: &str) -> Arc<Notify> {
        let mut notifiers = self.0.lock().expect("ledger notifier lock poisoned");
        if let Some(n) = notifiers.get(plugin) {
            return n.clone();
        }
        notifiers
            .entry(plugin.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    pub fn wake(&self, plugin: &str) {
        self.get(plugin).notify_one();
    }

    /// Wakes every plugin's dispatcher (work that was there all along became this host's).
    pub fn wake_all(&self) {
        let notifiers = self.0.lock().expect("ledger notifier lock poisoned");
        for notify in notifiers.values() {
            notify.notify_one();
        }
    }

    /// Waits for a signal, for the due time (`next_due_ms` from the index), or for `limit`.
    pub async fn wait(&self, plugin: &str, next_due_ms: Option<u64>, limit: Duration) -> Wake {
        let notify = self.get(plugin);
        let due = next_due_ms.map(|due| Duration::from_millis(due.saturating_sub(now_ms())));
        let (sleep, wake) = match due {
            Some(due) if due <= limit => (due, Wake::Due),
            _ => (limit, Wake::TimedOut),
        };
        tokio::select! {
            _ = notify.notified() => Wake::Signalled,
            _ = tokio::time::sleep(sleep) => wake,
        }
    }
}

/// A due time from the index (ms since the epoch) as an [`Instant`] to sleep until.
pub(crate) fn instant_of(due_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms()))
}
