//! `handle` and `reconcile`: from VM events and inventories to the
//! firewall's registrations.
//!
//! A batch is coalesced to the final wanted state of each VM, diffed against
//! what `kv` says the firewall holds, and sent as one change. Records are
//! written only after the firewall accepted it, so a retried or redelivered
//! batch recomputes the diff, and sending it again is harmless (PAN-OS
//! answers duplicates with `already exists, ignore`). A batch delivered again
//! can hold later events of a VM than the attempt that reached the firewall
//! did; that attempt's state is one the VM passed through in this batch, so
//! the diff also unregisters what was passed and is no longer wanted
//! ([`Ledger::plan`]).

use std::collections::BTreeMap;

use crate::config::Config;
use crate::firewall::{self, Refused};
use crate::host::{Event, Host, Keys, Level, Outcome, Vm};
use crate::response::Failure;
use crate::state::{self, Diff, IpRecord, Ledger, Plan, VmKey};
use crate::tags::{self, IpTags};

/// Whether a VM counts as powered on. `VM.ON`/`VM.OFF` decide themselves;
/// otherwise only an explicit `OFF` is off, as an absent state most likely
/// comes from a payload that simply does not say.
pub(crate) fn powered_on(event_type: Option<&str>, power_state: Option<&str>) -> bool {
    match event_type {
        Some("VM.ON") => true,
        Some("VM.OFF") => false,
        _ => !power_state.is_some_and(|s| s.trim().eq_ignore_ascii_case("OFF")),
    }
}

/// The tags a VM should contribute, given its power.
pub(crate) fn contribution(
    config: &Config,
    host: &mut impl Host,
    cluster: &str,
    vm: &Vm,
    on: bool,
) -> IpTags {
    if !on {
        return IpTags::new();
    }
    let invalid = tags::invalid_ips(vm);
    if !invalid.is_empty() {
        host.log(
            Level::Warn,
            &format!(
                "VM {} ({cluster}): skipping values that are not IPs: {invalid:?}",
                vm.uuid
            ),
        );
    }
    tags::wanted(config, cluster, vm)
}

/// What one event asks for: the VM's new contribution, or `None` when the
/// event carries nothing to act on.
fn intended(config: &Config, host: &mut impl Host, event: &Event) -> Option<IpTags> {
    match event.event_type.as_str() {
        "VM.DELETE" | "VM.OFF" => Some(IpTags::new()),
        kind => {
            let Some(vm) = &event.vm else {
                host.log(
                    Level::Warn,
                    &format!(
                        "{kind} for VM {} ({}) carries no VM body; nothing to do until the next reconcile",
                        event.entity_uuid, event.cluster
                    ),
                );
                return None;
            };
            let on = powered_on(Some(kind), vm.power_state.as_deref());
            Some(contribution(config, host, &event.cluster, vm, on))
        }
    }
}

/// Reads a record, treating an unreadable one as empty: refusing every
/// future event over one bad record would be worse, and reconcile rewrites it.
pub(crate) fn load<T>(host: &mut impl Host, key: &str) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + Default,
{
    match host
        .kv_get(key)
        .map_err(|e| format!("reading kv `{key}`: {e}"))?
    {
        None => Ok(T::default()),
        Some(bytes) => Ok(state::decode(&bytes).unwrap_or_else(|e| {
            host.log(
                Level::Warn,
                &format!("kv `{key}` is unreadable ({e}); treating it as empty"),
            );
            T::default()
        })),
    }
}

pub(crate) fn store<T: serde::Serialize>(
    host: &mut impl Host,
    key: &str,
    record: &T,
    empty: bool,
) -> Result<(), String> {
    let result = if empty {
        host.kv_delete(key)
    } else {
        host.kv_set(key, &state::encode(record))
    };
    result.map_err(|e| format!("writing kv `{key}`: {e}"))
}

/// Records an accepted plan. IP records go first: if a write fails
/// half-way, the retry then finds the IPs already right and only the VM
/// record still to fix, rather than a VM record claiming IPs the index lacks.
fn write(host: &mut impl Host, plan: &Plan) -> Result<(), String> {
    for (ip, record) in &plan.ip_writes {
        store(host, &state::ip_record_key(ip), record, record.is_empty())?;
    }
    for (key, contribution) in &plan.vm_writes {
        store(
            host,
            &state::vm_record_key(key),
            contribution,
            contribution.is_empty(),
        )?;
    }
    Ok(())
}

fn retry(reason: impl Into<String>) -> Outcome {
    Outcome::Retry {
        reason: reason.into(),
        delay_ms: None,
    }
}

fn outcome_of(failure: Failure) -> Outcome {
    match failure {
        Failure::Retry { reason, delay_ms } => Outcome::Retry { reason, delay_ms },
        Failure::Reject(reason) => Outcome::Reject(reason),
    }
}

/// Handles one batch; returns one outcome per event, in order.
pub fn handle(config: &Config, host: &mut impl Host, events: &[Event]) -> Vec<Outcome> {
    // Which VM each event belongs to, and the last state each VM asked for.
    let mut owners: Vec<Result<Option<VmKey>, String>> = Vec::with_capacity(events.len());
    let mut changes: BTreeMap<VmKey, IpTags> = BTreeMap::new();
    // What each VM's earlier events in the batch wanted.
    let mut passed: BTreeMap<VmKey, IpTags> = BTreeMap::new();
    for event in events {
        if !event.event_type.starts_with("VM.") {
            host.log(
                Level::Debug,
                &format!("ignoring {} (not a VM event)", event.event_type),
            );
            owners.push(Ok(None));
            continue;
        }
        let uuid = match (&event.entity_uuid, &event.vm) {
            (uuid, _) if !uuid.is_empty() => uuid.as_str(),
            (_, Some(vm)) if !vm.uuid.is_empty() => vm.uuid.as_str(),
            _ => {
                owners.push(Err(format!(
                    "{} event {} names no VM",
                    event.event_type, event.id
                )));
                continue;
            }
        };
        let key = state::vm_key(&event.cluster, uuid);
        if let Some(wanted) = intended(config, host, event) {
            if let Some(earlier) = changes.insert(key.clone(), wanted) {
                let through = passed.entry(key.clone()).or_default();
                for (ip, tags) in earlier {
                    through.entry(ip).or_default().extend(tags);
                }
            }
        }
        owners.push(Ok(Some(key)));
    }

    let outcomes = if changes.is_empty() {
        BTreeMap::new()
    } else if config.compare {
        // Compare mode writes nothing; reconcile does the comparing.
        host.log(
            Level::Debug,
            &format!("compare mode: {} VM change(s) not applied", changes.len()),
        );
        BTreeMap::new()
    } else {
        apply(config, host, &changes, &passed)
    };
    owners
        .into_iter()
        .map(|owner| match owner {
            Ok(Some(key)) => outcomes.get(&key).cloned().unwrap_or(Outcome::Done),
            Ok(None) => Outcome::Done,
            Err(reason) => Outcome::Reject(reason),
        })
        .collect()
}

/// Loads the records the changes touch.
fn load_ledger(
    host: &mut impl Host,
    changes: &BTreeMap<VmKey, IpTags>,
    passed: &BTreeMap<VmKey, IpTags>,
) -> Result<Ledger, String> {
    // Both maps are built from keys in order (collected, not inserted one
    // by one): a B-tree built in bulk compares each key once or twice, where
    // an insert searches from the root, and every compare of these long
    // keys costs several times as much in Wasm as natively.
    let mut ledger = Ledger {
        vms: changes
            .keys()
            .map(|key| Ok((key.clone(), load(host, &state::vm_record_key(key))?)))
            .collect::<Result<_, String>>()?,
        ips: BTreeMap::new(),
    };
    ledger.ips = ledger
        .affected_ips(changes, passed)
        .into_iter()
        .map(|ip| {
            let record: IpRecord = load(host, &state::ip_record_key(&ip))?;
            Ok((ip, record))
        })
        .collect::<Result<_, String>>()?;
    Ok(ledger)
}

/// Sends the batch's change and returns each VM's outcome.
fn apply(
    config: &Config,
    host: &mut impl Host,
    changes: &BTreeMap<VmKey, IpTags>,
    passed: &BTreeMap<VmKey, IpTags>,
) -> BTreeMap<VmKey, Outcome> {
    let every = |outcome: Outcome| {
        changes
            .keys()
            .map(|k| (k.clone(), outcome.clone()))
            .collect()
    };
    let mut ledger = match load_ledger(host, changes, passed) {
        Ok(ledger) => ledger,
        Err(reason) => return every(retry(reason)),
    };
    let plan = ledger.plan(changes, passed);
    let (register, unregister) = plan.diff.counts();
    host.log(
        if plan.diff.is_empty() {
            Level::Debug
        } else {
            Level::Info
        },
        &format!(
            "{} VM(s) in batch: registering {register} and unregistering {unregister} IP tag(s)",
            changes.len()
        ),
    );
    let sent = if plan.diff.is_empty() {
        Ok(())
    } else {
        firewall::send_diff(config, host, &plan.diff)
    };
    match sent {
        Ok(()) => match write(host, &plan) {
            Ok(()) => every(Outcome::Done),
            Err(reason) => every(retry(format!("the firewall took the change but {reason}"))),
        },
        Err(Failure::Reject(reason)) if changes.len() > 1 => {
            host.log(
                Level::Warn,
                &format!(
                    "firewall refused the batch ({reason}); resending VM by VM to find the bad one"
                ),
            );
            isolate(config, host, &mut ledger, changes, passed)
        }
        Err(failure) => {
            host.log(
                Level::Warn,
                &format!("firewall change failed: {}", failure.reason()),
            );
            every(outcome_of(failure))
        }
    }
}

/// Sends each VM's change on its own, so one bad VM does not hold back the
/// rest of its batch.
fn isolate(
    config: &Config,
    host: &mut impl Host,
    ledger: &mut Ledger,
    changes: &BTreeMap<VmKey, IpTags>,
    passed: &BTreeMap<VmKey, IpTags>,
) -> BTreeMap<VmKey, Outcome> {
    let mut outcomes = BTreeMap::new();
    let mut unavailable: Option<Outcome> = None;
    for (key, wanted) in changes {
        if let Some(outcome) = &unavailable {
            outcomes.insert(key.clone(), outcome.clone());
            continue;
        }
        let plan = ledger.plan(&BTreeMap::from([(key.clone(), wanted.clone())]), passed);
        let sent = if plan.diff.is_empty() {
            Ok(())
        } else {
            firewall::send_diff(config, host, &plan.diff)
        };
        let outcome = match sent {
            Ok(()) => {
                ledger.commit(&plan);
                match write(host, &plan) {
                    Ok(()) => Outcome::Done,
                    Err(reason) => retry(format!("the firewall took the change but {reason}")),
                }
            }
            Err(Failure::Reject(reason)) => {
                host.log(
                    Level::Warn,
                    &format!("firewall refused the change for VM {key}: {reason}"),
                );
                Outcome::Reject(reason)
            }
            // The firewall became unavailable: the rest waits too.
            Err(failure) => {
                let outcome = outcome_of(failure);
                unavailable = Some(outcome.clone());
                outcome
            }
        };
        outcomes.insert(key.clone(), outcome);
    }
    outcomes
}

/// Brings the firewall and the records in step with one cluster's inventory.
/// Compare mode's reconcile: says how the firewall differs from what the
/// plugin would register, with a few examples, and changes nothing.
fn compared(host: &mut impl Host, cluster: &str, diff: &Diff, vms: usize) -> String {
    let (missing, extra) = diff.counts();
    let examples = |side: &IpTags| {
        side.iter()
            .flat_map(|(ip, tags)| tags.iter().map(move |tag| format!("{ip} {tag}")))
            .take(10)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if missing > 0 {
        host.log(
            Level::Info,
            &format!(
                "compare {cluster}: missing on the firewall: {}",
                examples(&diff.register)
            ),
        );
    }
    if extra > 0 {
        host.log(
            Level::Info,
            &format!(
                "compare {cluster}: on the firewall but not wanted: {}",
                examples(&diff.unregister)
            ),
        );
    }
    format!("compare mode: {missing} missing, {extra} extra, {vms} VMs (nothing sent)")
}

pub fn reconcile(
    config: &Config,
    host: &mut impl Host,
    cluster: &str,
    vms: &[Vm],
) -> Result<String, String> {
    let mut own: BTreeMap<VmKey, IpTags> = BTreeMap::new();
    for vm in vms.iter().filter(|vm| !vm.uuid.is_empty()) {
        let on = powered_on(None, vm.power_state.as_deref());
        let wanted = contribution(config, host, cluster, vm, on);
        own.insert(state::vm_key(cluster, &vm.uuid), wanted);
    }

    // Other clusters are known only from what their events left in kv.
    let own_prefix = state::cluster_prefix(cluster);
    let mut stale_own = Vec::new();
    let mut contributions = own.clone();
    let mut vm_keys = Keys::new(state::VM_PREFIX);
    while let Some(record_key) = vm_keys.next(host)? {
        let Some(key) = record_key.strip_prefix(state::VM_PREFIX) else {
            continue;
        };
        if record_key.starts_with(&own_prefix) {
            if !own.contains_key(key) {
                stale_own.push(record_key.clone());
            }
            continue;
        }
        let record: IpTags = load(host, &record_key)?;
        contributions.insert(key.to_owned(), record);
    }

    let ips = state::index(&contributions);
    let wanted = state::wanted_union(&ips);
    let actual = firewall::registered(config, host).map_err(|f| f.reason().to_owned())?;
    let mut diff = Diff::between(&actual, &wanted);
    let (registered, unregistered) = diff.counts();
    if config.compare {
        return Ok(compared(host, cluster, &diff, own.len()));
    }
    // Registrations with a timeout lapse unless registered again: a
    // reconcile is the refresh, so a live VM's tags never lapse while
    // prismhook runs, and a VM deleted while it was stopped lets its go.
    let refreshed = if config.registration_timeout > 0 {
        diff.refresh(&wanted)
    } else {
        0
    };
    let refused = if diff.is_empty() {
        Refused::new()
    } else {
        firewall::send_diff_around_refusals(config, host, &diff)
            .map_err(|f| f.reason().to_owned())?
    };

    // Rewrite this cluster's records and the whole IP index; write only what
    // changed, to keep the call's kv writes small.
    for (key, contribution) in &own {
        let record_key = state::vm_record_key(key);
        let current: IpTags = load(host, &record_key)?;
        if &current != contribution {
            store(host, &record_key, contribution, contribution.is_empty())?;
        }
    }
    for record_key in stale_own {
        store(host, &record_key, &IpTags::new(), true)?;
    }
    let mut ip_keys = Keys::new(state::IP_PREFIX);
    while let Some(record_key) = ip_keys.next(host)? {
        let known = record_key
            .strip_prefix(state::IP_PREFIX)
            .is_some_and(|ip| ips.contains_key(ip));
        if !known {
            store(host, &record_key, &IpRecord::new(), true)?;
        }
    }
    for (ip, record) in &ips {
        let record_key = state::ip_record_key(ip);
        let current: IpRecord = load(host, &record_key)?;
        if &current != record {
            store(host, &record_key, record, false)?;
        }
    }

    Ok(summarise(
        config,
        host,
        cluster,
        (registered, refreshed, unregistered),
        own.len(),
        &refused,
    ))
}

/// A reconcile's summary, logged and returned: the pairs registered that
/// were missing, those registered again to restart their timeout (with a
/// `registration_timeout`), and those unregistered, the last two counts
/// including the pairs of IPs the firewall refused, which are named.
pub(crate) fn summarise(
    config: &Config,
    host: &mut impl Host,
    cluster: &str,
    (registered, refreshed, unregistered): (usize, usize, usize),
    vms: usize,
    refused: &Refused,
) -> String {
    let refreshed = if config.registration_timeout > 0 {
        format!(" ({refreshed} refreshed)")
    } else {
        String::new()
    };
    let mut summary =
        format!("{registered} registered{refreshed}, {unregistered} unregistered, {vms} VMs");
    if !refused.is_empty() {
        // Each refusal is logged, at most ten of them: a firewall that
        // refuses thousands says so once in the count.
        for (ip, reason) in refused.iter().take(10) {
            host.log(
                Level::Warn,
                &format!("reconcile {cluster}: the firewall refused the change for {ip}: {reason}"),
            );
        }
        summary.push_str(&format!(
            "; the firewall refused the change for {} IPs, tried again at the next reconcile",
            refused.len()
        ));
    }
    host.log(Level::Info, &format!("reconciled {cluster}: {summary}"));
    summary
}

#[cfg(test)]
mod tests;
