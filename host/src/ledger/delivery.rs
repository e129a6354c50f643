//! One plugin's delivery of one event: the record a backend keeps while it is pending (after a
//! failure) or dead, and what a batch's outcomes do to it.
//!
//! Both backends decide outcomes here, so a retry, a dead letter or a held-back done means the
//! same whichever stores it; a backend only writes the records [`plan_complete`] returns.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, warn};

use crate::ledger::index::{Failure, LaneKey};
use crate::ledger::{Delivery, LedgerError, Outcome, RetryPolicy, StoredEvent};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DeliveryState {
    #[default]
    Pending,
    Dead,
}

/// What is kept of one plugin's delivery of one event while it is pending or dead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeliveryRecord {
    #[serde(default, skip_serializing_if = "is_default")]
    pub state: DeliveryState,
    /// Failed attempts so far (a dead letter: all attempts, the last one included).
    #[serde(default, skip_serializing_if = "is_default")]
    pub attempts: u32,
    /// Not before this time (ms since the epoch); 0 = now.
    #[serde(default, skip_serializing_if = "is_default")]
    pub due_at_ms: u64,
    /// When the first attempt failed; retries stop `max_age` after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure_ms: Option<u64>,
    /// The backoff chosen after the previous failure (decorrelated jitter grows from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delay_ms: Option<u64>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub died_at_ms: Option<u64>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl DeliveryRecord {
    /// A fresh pending record, as [`encode`](Self::encode) writes it.
    pub const PENDING: &'static [u8] = b"{}";

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a delivery record always serializes")
    }

    pub fn decode(plugin: &str, id: u64, bytes: &[u8]) -> Result<Self, LedgerError> {
        serde_json::from_slice(bytes).map_err(|e| LedgerError::Corrupt {
            what: format!("delivery of event {id} to plugin `{plugin}`"),
            detail: e.to_string(),
        })
    }

    pub fn die(&mut self, attempts: u32, reason: String, now_ms: u64) {
        self.state = DeliveryState::Dead;
        self.attempts = attempts;
        self.due_at_ms = 0;
        self.reason = Some(reason);
        self.died_at_ms = Some(now_ms);
    }

    /// The failures the index schedules by, for a pending record that has failed before.
    pub fn failure(&self) -> Option<Failure> {
        (self.state == DeliveryState::Pending && self.attempts > 0).then_some(Failure {
            attempts: self.attempts,
            due_at_ms: self.due_at_ms,
        })
    }
}

/// What an outcome does to a delivery in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Done,
    Retry(Failure),
    Dead,
    /// Back to pending as it was, no attempt counted, nothing stored: a done behind a retry of
    /// its own entity in the same results (see [`plan_complete`]).
    HeldBack,
}

/// One outcome as decided: the change, and the record the delivery keeps from now on (`None`:
/// no record — done, or held back as it was).
#[derive(Debug)]
pub(crate) struct Planned {
    pub id: u64,
    pub change: Change,
    pub record: Option<DeliveryRecord>,
}

/// Where a delivery stood when its outcome came: whether it is in flight for this plugin, and
/// the lane of its event (read from the index in one lock, before any storage is touched).
pub(crate) type Standing = (bool, Option<LaneKey>);

/// One event as a backend read it, or why it could not.
pub(crate) type EventRead = Result<StoredEvent, LedgerError>;

/// Outcomes by event id, as [`crate::ledger::Ledger::complete`] takes them.
pub(crate) type Outcomes = Vec<(u64, Outcome)>;

/// A claim's reads, sorted: the deliveries whose event was read, and an outcome for each one whose
/// event can never be read (corrupt, or missing under its delivery) that makes it a dead letter
/// saying why. One such event used to fail every later claim of its plugin, stalling them all.
/// Any other failure (storage out of reach) fails the claim as a whole, to be tried again.
pub(crate) fn sort_reads(
    plugin: &str,
    claimed: Vec<(u64, u32)>,
    reads: Vec<EventRead>,
) -> Result<(Vec<Delivery>, Outcomes), LedgerError> {
    let mut deliveries = Vec::with_capacity(claimed.len());
    let mut unreadable = Vec::new();
    for ((id, attempt), read) in claimed.into_iter().zip(reads) {
        match read {
            Ok(event) => deliveries.push(Delivery { event, attempt }),
            Err(failure @ LedgerError::Corrupt { .. }) => {
                error!(
                    plugin,
                    event_id = id,
                    error = %failure,
                    "an event due for delivery cannot be read; its delivery is a dead letter"
                );
                let reason = format!("the host cannot read this event: {failure}");
                unreadable.push((id, Outcome::Abandon { reason }));
            }
            Err(failure) => return Err(failure),
        }
    }
    Ok((deliveries, unreadable))
}

/// Decides what each outcome does, in event id order.
///
/// Outcomes for deliveries not in flight (or twice in `results`) are ignored. `record_of` gives
/// the delivery's stored record: `Ok(None)` means the delivery has none and is ignored too.
pub(crate) fn plan_complete(
    plugin: &str,
    results: &[(u64, Outcome)],
    standing: &[Standing],
    mut record_of: impl FnMut(u64) -> Result<Option<DeliveryRecord>, LedgerError>,
    policy: &RetryPolicy,
    now: u64,
    rng: &mut impl Rng,
) -> Result<Vec<Planned>, LedgerError> {
    let mut seen = HashSet::new();
    let mut planned = Vec::new();
    // Entities with an event in these results that will be retried. A batch may carry several
    // consecutive events of one entity; when an earlier one is to be retried, a later one the
    // plugin says is done must not count as delivered ahead of it (the retry would then reach
    // the plugin after it, and a stale state would win). It goes back to pending, uncounted,
    // and comes again after the retry.
    let mut retrying: HashSet<LaneKey> = HashSet::new();
    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by_key(|&i| results[i].0);
    for i in order {
        let (id, outcome) = &results[i];
        let (id, (in_flight, lane)) = (*id, &standing[i]);
        if !in_flight || !seen.insert(id) {
            warn!(
                plugin,
                event_id = id,
                "ignoring an outcome for a delivery that is not in flight"
            );
            continue;
        }
        let Some(mut record) = record_of(id)? else {
            warn!(
                plugin,
                event_id = id,
                "ignoring an outcome for a delivery with no record"
            );
            continue;
        };
        let held = lane.as_ref().is_some_and(|l| retrying.contains(l));
        if held && matches!(outcome, Outcome::Done) {
            debug!(
                plugin,
                event_id = id,
                "held back: an earlier event of its entity will be retried"
            );
            planned.push(Planned {
                id,
                change: Change::HeldBack,
                record: None,
            });
            continue;
        }
        let attempts = record.attempts.saturating_add(1);
        let change = match outcome {
            Outcome::Done => {
                planned.push(Planned {
                    id,
                    change: Change::Done,
                    record: None,
                });
                continue;
            }
            Outcome::Reject { reason } => {
                warn!(
                    plugin,
                    event_id = id,
                    attempt = attempts,
                    reason,
                    "delivery rejected; it is a dead letter"
                );
                record.die(attempts, format!("rejected: {reason}"), now);
                Change::Dead
            }
            Outcome::Abandon { reason } => {
                warn!(
                    plugin,
                    event_id = id,
                    reason,
                    "delivery given up by the host; it is a dead letter"
                );
                record.die(record.attempts, reason.clone(), now);
                Change::Dead
            }
            Outcome::Retry { reason, delay } => {
                // Stamped ahead of now by a clock since stepped back: from now.
                let first = record.first_failure_ms.unwrap_or(now).min(now);
                let age = Duration::from_millis(now.saturating_sub(first));
                let verdict = if attempts >= policy.max_attempts.max(1) {
                    Some(format!("gave up after {attempts} attempts: {reason}"))
                } else if age >= policy.max_age {
                    Some(format!(
                        "gave up after {:.1}s of retries: {reason}",
                        age.as_secs_f64()
                    ))
                } else {
                    None
                };
                if let Some(verdict) = verdict {
                    warn!(
                        plugin,
                        event_id = id,
                        attempt = attempts,
                        reason = verdict,
                        "delivery is a dead letter"
                    );
                    record.die(attempts, verdict, now);
                    Change::Dead
                } else {
                    let previous = record.last_delay_ms.map(Duration::from_millis);
                    let backoff = policy.backoff(attempts, previous, rng);
                    let due_at_ms = policy.due_at_ms(now, first, backoff, *delay);
                    debug!(
                        plugin,
                        event_id = id,
                        attempt = attempts,
                        reason,
                        wait_ms = due_at_ms - now,
                        "delivery will be retried"
                    );
                    record.attempts = attempts;
                    record.first_failure_ms = Some(first);
                    record.last_delay_ms = Some(backoff.as_millis() as u64);
                    record.due_at_ms = due_at_ms;
                    record.reason = Some(reason.clone());
                    retrying.extend(lane.clone());
                    Change::Retry(Failure {
                        attempts,
                        due_at_ms,
                    })
                }
            }
        };
        planned.push(Planned {
            id,
            change,
            record: Some(record),
        });
    }
    Ok(planned)
}
