//! What the plugin remembers in `kv`, and the register/unregister diff.
//!
//! Several VMs can hold the same IP (an IP moves from a deleted VM to a new
//! one, or two VMs briefly report it), and the firewall only knows IPs. So
//! the firewall's tags for an IP must be the *union* of what every VM
//! holding it wants, and removing one VM must not strip a tag another still
//! wants. Two records per fact keep that cheap to compute:
//!
//! - `vm/<cluster>/<uuid>`: `{ip: [tags]}` this VM contributes. It is what a
//!   `VM.DELETE` without a body undoes, and which IPs a VM used to have.
//! - `ip/<ip>`: `{"<cluster>/<uuid>": [tags]}` for every VM contributing to
//!   the IP. Its union is what the firewall holds for the IP.
//!
//! Cluster and uuid are escaped in keys (`%` → `%25`, `/` → `%2F`) so a
//! cluster name with a `/` cannot collide with another cluster's records.

use std::collections::{BTreeMap, BTreeSet};

use crate::tags::IpTags;

/// `<cluster>/<uuid>`, escaped.
pub type VmKey = String;
/// The VMs contributing tags to one IP.
pub type IpRecord = BTreeMap<VmKey, BTreeSet<String>>;

pub const VM_PREFIX: &str = "vm/";
pub const IP_PREFIX: &str = "ip/";

fn escape_component(text: &str) -> String {
    text.replace('%', "%25").replace('/', "%2F")
}

pub fn vm_key(cluster: &str, uuid: &str) -> VmKey {
    format!("{}/{}", escape_component(cluster), escape_component(uuid))
}

/// The `kv` key prefix of every VM record of one cluster.
pub fn cluster_prefix(cluster: &str) -> String {
    format!("{VM_PREFIX}{}/", escape_component(cluster))
}

pub fn vm_record_key(key: &str) -> String {
    format!("{VM_PREFIX}{key}")
}

pub fn ip_record_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

/// Registrations to add and to remove, per IP. Never holds empty sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub register: IpTags,
    pub unregister: IpTags,
}

impl Diff {
    /// What turns `before` into `after`.
    pub fn between(before: &IpTags, after: &IpTags) -> Diff {
        let empty = BTreeSet::new();
        let mut diff = Diff::default();
        for ip in before.keys().chain(after.keys()) {
            let old = before.get(ip).unwrap_or(&empty);
            let new = after.get(ip).unwrap_or(&empty);
            add(&mut diff.register, ip, new.difference(old));
            add(&mut diff.unregister, ip, old.difference(new));
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.register.is_empty() && self.unregister.is_empty()
    }

    /// Registers every pair of `wanted` again, present or not, so that
    /// registrations made with a timeout start it over; returns how many
    /// pairs were added for that alone.
    pub fn refresh(&mut self, wanted: &IpTags) -> usize {
        let mut added = 0;
        for (ip, tags) in wanted {
            let side = self.register.entry(ip.clone()).or_default();
            for tag in tags {
                added += usize::from(side.insert(tag.clone()));
            }
        }
        self.register.retain(|_, tags| !tags.is_empty());
        added
    }

    /// `(ip, tag)` pairs to register and to unregister.
    pub fn counts(&self) -> (usize, usize) {
        let count = |side: &IpTags| side.values().map(BTreeSet::len).sum();
        (count(&self.register), count(&self.unregister))
    }
}

fn add<T: Into<String>>(side: &mut IpTags, ip: &str, tags: impl Iterator<Item = T>) {
    let mut tags = tags.peekable();
    if tags.peek().is_some() {
        side.entry(ip.to_owned())
            .or_default()
            .extend(tags.map(Into::into));
    }
}

/// [`union`], borrowed from the record.
fn union_of(record: &IpRecord) -> BTreeSet<&str> {
    record.values().flatten().map(String::as_str).collect()
}

/// Borrowed tags, in order, copied into a set of their own (built in bulk).
fn owned<'a>(tags: impl Iterator<Item = &'a &'a str>) -> BTreeSet<String> {
    tags.map(|t| (*t).to_owned()).collect()
}

/// Every tag any VM wants on the IP.
pub fn union(record: &IpRecord) -> BTreeSet<String> {
    record.values().flatten().cloned().collect()
}

/// The `ip/…` records implied by the VMs' contributions.
pub fn index(vms: &BTreeMap<VmKey, IpTags>) -> BTreeMap<String, IpRecord> {
    let mut ips: BTreeMap<String, IpRecord> = BTreeMap::new();
    for (key, contribution) in vms {
        for (ip, tags) in contribution.iter().filter(|(_, tags)| !tags.is_empty()) {
            ips.entry(ip.clone())
                .or_default()
                .insert(key.clone(), tags.clone());
        }
    }
    ips
}

/// The tags wanted per IP: the union over every VM's contribution.
pub fn wanted_union(ips: &BTreeMap<String, IpRecord>) -> IpTags {
    ips.iter()
        .map(|(ip, record)| (ip.clone(), union(record)))
        .collect()
}

/// The outcome of applying new contributions: the firewall change and the
/// records to write once the firewall accepted it (empty value = delete).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub diff: Diff,
    pub vm_writes: BTreeMap<VmKey, IpTags>,
    pub ip_writes: BTreeMap<String, IpRecord>,
}

/// The slice of `kv` one batch reads: the records of its VMs and of every IP
/// they had or now have. Records absent from `kv` are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub vms: BTreeMap<VmKey, IpTags>,
    pub ips: BTreeMap<String, IpRecord>,
}

impl Ledger {
    /// The IPs whose records a change to these VMs touches, and those the
    /// VMs passed through on the way (see [`Ledger::plan`]).
    pub fn affected_ips(
        &self,
        changes: &BTreeMap<VmKey, IpTags>,
        passed: &BTreeMap<VmKey, IpTags>,
    ) -> BTreeSet<String> {
        changes
            .iter()
            .flat_map(|(key, new)| {
                let old = self.vms.get(key).into_iter().flat_map(|c| c.keys());
                let between = passed.get(key).into_iter().flat_map(|c| c.keys());
                old.chain(between).chain(new.keys()).cloned()
            })
            .collect()
    }

    /// Sets each changed VM's contribution to its new value and compares
    /// each affected IP's union before and after.
    ///
    /// `passed` holds, per VM with more than one event in the batch, what
    /// its earlier events wanted. An attempt at this batch that reached the
    /// firewall but not `kv` (its host died, or storing failed) may have
    /// left the VM at any of those states, and the batch delivered again can
    /// hold more of the VM's events than that attempt did, so a diff from the
    /// records alone would not undo it. For such a VM the change registers
    /// its whole new contribution and unregisters whatever was passed and is
    /// no longer wanted. PAN-OS answers both kinds of no-op harmlessly
    /// (`already exists, ignore`, `does not exist, ignore unreg`).
    pub fn plan(
        &self,
        changes: &BTreeMap<VmKey, IpTags>,
        passed: &BTreeMap<VmKey, IpTags>,
    ) -> Plan {
        let mut plan = Plan::default();
        // Each IP's new contributions, gathered once: looking every change
        // up for every IP would make a batch quadratic in its size.
        let mut by_ip: BTreeMap<&str, Vec<(&VmKey, &BTreeSet<String>)>> = BTreeMap::new();
        for (key, contribution) in changes {
            for (ip, tags) in contribution.iter().filter(|(_, tags)| !tags.is_empty()) {
                by_ip.entry(ip.as_str()).or_default().push((key, tags));
            }
        }
        let nobody = IpRecord::new();
        // The affected IPs come in order, so what each yields is gathered
        // in order and the maps built in bulk after the loop: a B-tree
        // insert searches from the root, and the compares of long string
        // keys are the dearest part of it in Wasm.
        let (mut register, mut unregister, mut after, mut ip_writes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ip in self.affected_ips(changes, passed) {
            let old_record = self.ips.get(&ip).unwrap_or(&nobody);
            // A changed VM's old contribution goes; its new one, if any, comes.
            let mut new_record: IpRecord = old_record
                .iter()
                .filter(|(key, _)| !changes.contains_key(*key))
                .map(|(key, tags)| (key.clone(), tags.clone()))
                .collect();
            for (key, tags) in by_ip.get(ip.as_str()).into_iter().flatten() {
                new_record.insert((*key).clone(), (*tags).clone());
            }
            // The unions borrow from the records: only tags that change are copied.
            let before = union_of(old_record);
            let now = union_of(&new_record);
            let (mut gained, lost) = (
                owned(now.difference(&before)),
                owned(before.difference(&now)),
            );
            // A tag a changed VM gives up here that another VM keeps is
            // registered again. This call may be running a second time: its
            // first attempt saw the IP without the other VM (a concurrent
            // call was adding it), unregistered the tag, and lost its kv
            // writes to that call. The firewall did not undo the
            // unregister, and the other call, seeing this VM's tag, sent
            // none.
            for (key, tags) in old_record.iter().filter(|(k, _)| changes.contains_key(*k)) {
                let keeps = new_record.get(key);
                gained.extend(
                    tags.iter()
                        .filter(|t| now.contains(t.as_str()))
                        .filter(|t| !keeps.is_some_and(|k| k.contains(*t)))
                        .cloned(),
                );
            }
            if !gained.is_empty() {
                register.push((ip.clone(), gained));
            }
            if !lost.is_empty() {
                unregister.push((ip.clone(), lost));
            }
            if !passed.is_empty() {
                after.push((ip.clone(), owned(now.iter())));
            }
            if &new_record != old_record {
                ip_writes.push((ip, new_record));
            }
        }
        plan.diff.register = register.into_iter().collect();
        plan.diff.unregister = unregister.into_iter().collect();
        plan.ip_writes = ip_writes.into_iter().collect();
        // Each affected IP's tags after the change; only the VMs in `passed`
        // need it, to tell what they passed through and no longer want.
        let after: IpTags = after.into_iter().collect();
        for (key, earlier) in passed {
            let Some(contribution) = changes.get(key) else {
                continue;
            };
            for (ip, tags) in earlier {
                let kept = after.get(ip);
                add(
                    &mut plan.diff.unregister,
                    ip,
                    tags.iter()
                        .filter(|t| !kept.is_some_and(|k| k.contains(*t))),
                );
            }
            for (ip, tags) in contribution {
                add(&mut plan.diff.register, ip, tags.iter());
            }
        }
        plan.vm_writes = changes
            .iter()
            .filter(|(key, contribution)| match self.vms.get(*key) {
                Some(old) => old != *contribution,
                None => !contribution.is_empty(),
            })
            .map(|(key, contribution)| (key.clone(), contribution.clone()))
            .collect();
        plan
    }

    /// Takes in a plan the firewall accepted, so later plans build on it.
    pub fn commit(&mut self, plan: &Plan) {
        for (key, contribution) in &plan.vm_writes {
            self.vms.insert(key.clone(), contribution.clone());
        }
        for (ip, record) in &plan.ip_writes {
            self.ips.insert(ip.clone(), record.clone());
        }
    }
}

/// Reads a record written by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

pub fn encode<T: serde::Serialize>(record: &T) -> Vec<u8> {
    // Maps of strings always serialise.
    serde_json::to_vec(record).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|t| (*t).to_owned()).collect()
    }

    fn ip_tags(entries: &[(&str, &[&str])]) -> IpTags {
        entries
            .iter()
            .map(|(ip, t)| ((*ip).to_owned(), tags(t)))
            .collect()
    }

    fn none() -> BTreeMap<VmKey, IpTags> {
        BTreeMap::new()
    }

    #[test]
    fn the_diff_registers_what_is_new_and_unregisters_what_is_gone() {
        let before = ip_tags(&[("10.0.0.1", &["a", "b"]), ("10.0.0.2", &["a"])]);
        let after = ip_tags(&[("10.0.0.1", &["b", "c"]), ("10.0.0.3", &["a"])]);
        let diff = Diff::between(&before, &after);
        assert_eq!(
            diff.register,
            ip_tags(&[("10.0.0.1", &["c"]), ("10.0.0.3", &["a"])])
        );
        assert_eq!(
            diff.unregister,
            ip_tags(&[("10.0.0.1", &["a"]), ("10.0.0.2", &["a"])])
        );
        assert_eq!(diff.counts(), (2, 2));
    }

    #[test]
    fn an_ip_moving_between_vms_keeps_the_tags_the_new_holder_wants() {
        let old_vm = vm_key("c1", "old");
        let new_vm = vm_key("c1", "new");
        let mut ledger = Ledger::default();
        let first = ledger.plan(
            &BTreeMap::from([(
                old_vm.clone(),
                ip_tags(&[("10.0.0.9", &["ntnx.managed", "ntnx.AppTier.Web"])]),
            )]),
            &none(),
        );
        ledger.commit(&first);

        // The new VM takes the IP while the old one still holds it.
        let second = ledger.plan(
            &BTreeMap::from([(
                new_vm.clone(),
                ip_tags(&[("10.0.0.9", &["ntnx.managed", "ntnx.AppTier.Db"])]),
            )]),
            &none(),
        );
        assert_eq!(
            second.diff.register,
            ip_tags(&[("10.0.0.9", &["ntnx.AppTier.Db"])])
        );
        assert!(second.diff.unregister.is_empty());
        ledger.commit(&second);

        // The old VM is deleted: only the tag nobody else wants goes, and
        // the one the new VM keeps is registered again.
        let third = ledger.plan(&BTreeMap::from([(old_vm.clone(), IpTags::new())]), &none());
        assert_eq!(
            third.diff.register,
            ip_tags(&[("10.0.0.9", &["ntnx.managed"])])
        );
        assert_eq!(
            third.diff.unregister,
            ip_tags(&[("10.0.0.9", &["ntnx.AppTier.Web"])])
        );
        assert_eq!(
            third.ip_writes["10.0.0.9"],
            IpRecord::from([(new_vm, tags(&["ntnx.managed", "ntnx.AppTier.Db"]))])
        );
        assert_eq!(third.vm_writes[&old_vm], IpTags::new());
    }

    #[test]
    fn replaying_a_committed_plan_changes_nothing() {
        let key = vm_key("c1", "vm");
        let change = BTreeMap::from([(key, ip_tags(&[("10.0.0.1", &["ntnx.managed"])]))]);
        let mut ledger = Ledger::default();
        ledger.commit(&ledger.plan(&change, &none()));
        assert_eq!(ledger.plan(&change, &none()), Plan::default());
    }

    #[test]
    fn keys_escape_slashes_so_clusters_cannot_collide() {
        assert_eq!(vm_key("a/b", "u"), "a%2Fb/u");
        assert_eq!(vm_record_key(&vm_key("a", "u")), "vm/a/u");
        assert!(!vm_record_key(&vm_key("a/b", "u")).starts_with(&cluster_prefix("a")));
        assert_eq!(vm_key("100%", "u"), "100%25/u");
    }

    #[test]
    fn the_index_and_union_follow_the_contributions() {
        let vms = BTreeMap::from([
            (vm_key("c", "a"), ip_tags(&[("10.0.0.1", &["x"])])),
            (
                vm_key("c", "b"),
                ip_tags(&[("10.0.0.1", &["y"]), ("10.0.0.2", &[])]),
            ),
        ]);
        let ips = index(&vms);
        assert_eq!(ips.len(), 1, "empty contributions make no record");
        assert_eq!(wanted_union(&ips), ip_tags(&[("10.0.0.1", &["x", "y"])]));
    }
}
