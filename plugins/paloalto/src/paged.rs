//! The paged reconcile (`paged.reconcile`, host 0.1.2): the inventory a page
//! at a time, through the `kv` records, so that the plugin holds a page, a
//! few bytes per VM and IP, and the change to send, never the inventory.
//!
//! 1. Each page's VMs: their contributions go to their `vm/` records and to
//!    the `ip/` records of the IPs they had or have (writing only what
//!    differs). Then the cluster's VMs that were not listed lose theirs, and
//!    other clusters' VM records put back any `ip/` entry they lack.
//! 2. Every `ip/` record against the `vm/` records of its holders: an entry
//!    a VM no longer contributes goes, so a record a dead host left
//!    half-written is repaired.
//! 3. The firewall's registered IPs, a page of its answer at a time, against
//!    the `ip/` records; then the IPs the records want that the firewall does
//!    not list. The change is sent after the listing, so that it does not
//!    shift the firewall's pages under it.
//!
//! An error returns before anything is sent, or after part of it; the host
//! then discards the call's `kv` writes (the paged contract), so the
//! records never claim what the firewall did not take. IPs the firewall
//! refuses (not an error: see [`firewall::send_diff_around_refusals`]) keep
//! what the records want of them, so the next reconcile sends them again. Compare mode reads
//! the inventory whole and compares as [`handler::reconcile`] does.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashSet};
use std::hash::{Hash, Hasher};

use crate::config::Config;
use crate::firewall::{self, Refused};
use crate::handler::{self, contribution, load, powered_on, store};
use crate::host::{Host, Keys, Vm};
use crate::response::Failure;
use crate::state::{self, Diff, IpRecord, VmKey};
use crate::tags::IpTags;

/// IPs per User-ID message the change is cut into before
/// `max_message_bytes` cuts it further.
const SEND_IPS: usize = 5_000;

/// What stands for a VM or an IP across pages: 8 bytes rather than its
/// key. Two keys of one reconcile sharing a fingerprint (odds of about
/// 10⁻⁹ at 200,000 keys) would leave one stale record to the next
/// reconcile.
fn fingerprint(key: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// Makes VM `key`'s entry in the record of `ip` what the VM contributes to
/// the IP (no entry when nothing); whether the record changed.
fn set_entry(record: &mut IpRecord, ip: &str, key: &VmKey, contribution: &IpTags) -> bool {
    match contribution.get(ip).filter(|tags| !tags.is_empty()) {
        Some(tags) if record.get(key) == Some(tags) => false,
        Some(tags) => {
            record.insert(key.clone(), tags.clone());
            true
        }
        None => record.remove(key).is_some(),
    }
}

/// Sets a VM's contribution in its `vm/` record and in the `ip/` records of
/// every IP it had or has, writing only what differs.
fn set_contribution(host: &mut impl Host, key: &VmKey, wanted: &IpTags) -> Result<(), String> {
    let record_key = state::vm_record_key(key);
    let old: IpTags = load(host, &record_key)?;
    let ips: BTreeSet<&String> = old.keys().chain(wanted.keys()).collect();
    for ip in ips {
        let ip_key = state::ip_record_key(ip);
        let mut record: IpRecord = load(host, &ip_key)?;
        if set_entry(&mut record, ip, key, wanted) {
            store(host, &ip_key, &record, record.is_empty())?;
        }
    }
    if &old != wanted {
        store(host, &record_key, wanted, wanted.is_empty())?;
    }
    Ok(())
}

/// Step 1: the inventory into the records; returns how many VMs it had.
fn take_inventory(
    config: &Config,
    host: &mut impl Host,
    cluster: &str,
    pages: &mut impl FnMut() -> Option<Vec<Vm>>,
) -> Result<usize, String> {
    let mut listed: HashSet<u64> = HashSet::new();
    let mut vms = 0;
    while let Some(page) = pages() {
        for vm in page.iter().filter(|vm| !vm.uuid.is_empty()) {
            vms += 1;
            let key = state::vm_key(cluster, &vm.uuid);
            listed.insert(fingerprint(&key));
            let on = powered_on(None, vm.power_state.as_deref());
            let wanted = contribution(config, host, cluster, vm, on);
            set_contribution(host, &key, &wanted)?;
        }
    }
    let own_prefix = state::cluster_prefix(cluster);
    let mut records = Keys::new(state::VM_PREFIX);
    while let Some(record_key) = records.next(host)? {
        let key = record_key[state::VM_PREFIX.len()..].to_owned();
        if record_key.starts_with(&own_prefix) {
            if !listed.contains(&fingerprint(&key)) {
                set_contribution(host, &key, &IpTags::new())?;
            }
        } else {
            // Known only from what its events left in kv.
            let record: IpTags = load(host, &record_key)?;
            set_contribution(host, &key, &record)?;
        }
    }
    Ok(vms)
}

/// Step 2: each `ip/` entry must be what its VM's record says.
fn repair_ip_records(host: &mut impl Host) -> Result<(), String> {
    let mut records = Keys::new(state::IP_PREFIX);
    while let Some(ip_key) = records.next(host)? {
        let ip = &ip_key[state::IP_PREFIX.len()..];
        let mut record: IpRecord = load(host, &ip_key)?;
        let holders: Vec<VmKey> = record.keys().cloned().collect();
        let mut fixed = false;
        for holder in holders {
            let contribution: IpTags = load(host, &state::vm_record_key(&holder))?;
            fixed |= set_entry(&mut record, ip, &holder, &contribution);
        }
        if fixed {
            store(host, &ip_key, &record, record.is_empty())?;
        }
    }
    Ok(())
}

/// The change step 3 builds: per IP, tags to register and to unregister,
/// in lists rather than maps, as it may hold an entry for every IP.
#[derive(Default)]
struct Change {
    register: Vec<(String, Vec<String>)>,
    unregister: Vec<(String, Vec<String>)>,
    /// Pairs registered again only to restart their timeout.
    refreshed: usize,
}

impl Change {
    /// What turns `owned` (on the firewall) into `wanted` for one IP; with
    /// `refresh`, every wanted pair is registered again.
    fn between(
        &mut self,
        ip: &str,
        owned: &BTreeSet<String>,
        wanted: &BTreeSet<String>,
        refresh: bool,
    ) {
        let register: Vec<String> = if refresh {
            self.refreshed += wanted.intersection(owned).count();
            wanted.iter().cloned().collect()
        } else {
            wanted.difference(owned).cloned().collect()
        };
        let unregister: Vec<String> = owned.difference(wanted).cloned().collect();
        if !register.is_empty() {
            self.register.push((ip.to_owned(), register));
        }
        if !unregister.is_empty() {
            self.unregister.push((ip.to_owned(), unregister));
        }
    }

    fn counts(&self) -> (usize, usize) {
        let count = |side: &[(String, Vec<String>)]| side.iter().map(|(_, t)| t.len()).sum();
        (count(&self.register), count(&self.unregister))
    }

    /// Sends it, [`SEND_IPS`] IPs of each side at a time; returns the IPs
    /// the firewall refused.
    fn send(self, config: &Config, host: &mut impl Host) -> Result<Refused, Failure> {
        let mut register = self.register.into_iter();
        let mut unregister = self.unregister.into_iter();
        let mut refused = Refused::new();
        loop {
            let side = |part: &mut dyn Iterator<Item = (String, Vec<String>)>| -> IpTags {
                part.take(SEND_IPS)
                    .map(|(ip, tags)| (ip, tags.into_iter().collect()))
                    .collect()
            };
            let diff = Diff {
                register: side(&mut register),
                unregister: side(&mut unregister),
            };
            if diff.is_empty() {
                return Ok(refused);
            }
            refused.extend(firewall::send_diff_around_refusals(config, host, &diff)?);
        }
    }
}

/// Step 3: the firewall against the `ip/` records.
fn compare_firewall(config: &Config, host: &mut impl Host) -> Result<Change, String> {
    let refresh = config.registration_timeout > 0;
    let mut change = Change::default();
    let mut on_firewall: HashSet<u64> = HashSet::new();
    firewall::each_registered(config, host, |host, ip, owned| {
        on_firewall.insert(fingerprint(&ip));
        let record: IpRecord = load(host, &state::ip_record_key(&ip)).map_err(Failure::retry)?;
        change.between(&ip, &owned, &state::union(&record), refresh);
        Ok(())
    })
    .map_err(|f| f.reason().to_owned())?;
    let mut records = Keys::new(state::IP_PREFIX);
    while let Some(ip_key) = records.next(host)? {
        let ip = &ip_key[state::IP_PREFIX.len()..];
        if !on_firewall.contains(&fingerprint(ip)) {
            let record: IpRecord = load(host, &ip_key)?;
            change.between(ip, &BTreeSet::new(), &state::union(&record), false);
        }
    }
    Ok(change)
}

/// Brings the firewall and the records in step with one cluster's
/// inventory, read from `pages` until it answers `None`.
pub fn reconcile(
    config: &Config,
    host: &mut impl Host,
    cluster: &str,
    mut pages: impl FnMut() -> Option<Vec<Vm>>,
) -> Result<String, String> {
    if config.compare {
        let vms: Vec<Vm> = std::iter::from_fn(pages).flatten().collect();
        return handler::reconcile(config, host, cluster, &vms);
    }
    let vms = take_inventory(config, host, cluster, &mut pages)?;
    repair_ip_records(host)?;
    let change = compare_firewall(config, host)?;
    let (registered, unregistered) = change.counts();
    let refreshed = change.refreshed;
    let refused = change
        .send(config, host)
        .map_err(|f| f.reason().to_owned())?;
    let counts = (registered - refreshed, refreshed, unregistered);
    Ok(handler::summarise(
        config, host, cluster, counts, vms, &refused,
    ))
}
