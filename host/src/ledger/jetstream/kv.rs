//! Plugins' kv on JetStream, for hosts that share a ledger: a plugin finds its records whichever
//! host runs its next batch.
//!
//! One stream (`<STREAM>_KV`) holds one message per key, on the subject
//! `<stream>_kv.p<hex plugin>.k<hex key>`, and keeps only the latest (a delete is a message with
//! the `Prismhook-Kv: del` header). Every host mirrors the stream in memory, so a plugin's reads
//! are memory reads, as its calls need them to be.
//!
//! A call's writes are published as one JetStream *atomic batch* (nats-server 2.12+): all of them
//! are stored, or none, and a write returns once this host's mirror shows it. A call that
//! writes more than `BATCH_MAX` (1,000) keys (a reconcile of a large inventory, say) is stored in
//! several batches, each atomic: a host that dies between two of them leaves the first ones
//! stored, records the next reconcile rewrites.
//!
//! A host taking over a partition waits until its mirror has caught up with the stream, as it
//! does for the ledger, so it reads what the previous holder wrote. A host that cannot tell
//! whether a write of its own was stored (the answer timed out, the server went away) reads
//! nothing until its mirror has caught up with the whole stream, and its dispatcher claims
//! nothing meanwhile ([`KvBackend::settle`]).
//!
//! Every message names the sequence of its key's last message as the call read it, or, for a key
//! it wrote without reading, as this host's mirror has it when the call ends
//! (`Nats-Expected-Last-Subject-Sequence`; tombstones keep a deleted key's): a write that reaches
//! the servers after a newer write of the same key (a call that failed, whose messages the client
//! sent once it reconnected) is refused, the whole batch with it, instead of undoing the newer
//! one. Two hosts running batches of one plugin at the same moment (for entities in different
//! partitions, or one whose lease ran out mid-call and the host that took over) cannot overwrite
//! each other's keys unseen either: the second to write a key it read before the first wrote it
//! fails, even when its mirror has shown it the first one's write since, and its call is
//! delivered again.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use tokio::sync::watch;

use super::batch::{self, BATCH_MAX};
use super::follow::{self, Fold, Restarts};
use crate::runtime::kv_store::{self, KvBackend, KvError};

const OP: &str = "Prismhook-Kv";

/// A key and what a call writes to it (`None`: deletes it).
type Write = (String, Option<Vec<u8>>);

/// `bytes` as lower-case hex: for what a subject, key or header cannot carry as it is.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One key as this host has read it: its value (`None`: deleted) and the sequence of the message
/// that set it, which a write of the key expects to be still the last.
struct Record {
    value: Option<Vec<u8>>,
    seq: u64,
}

/// The stream as this host has read it: every plugin's keys and values.
pub(super) struct Mirror {
    root: String,
    data: RwLock<HashMap<String, BTreeMap<String, Record>>>,
    /// The bytes (keys and values) of each plugin's live keys in `data`, changed with it (under
    /// its write lock).
    bytes: RwLock<HashMap<String, u64>>,
    applied: watch::Sender<u64>,
    restarts: Arc<Restarts>,
    /// Messages read while a test holds the mirror still ([`Mirror::hold`]), folded in when it
    /// lets go.
    #[cfg(test)]
    held: std::sync::Mutex<Option<Vec<Held>>>,
}

#[cfg(test)]
type Held = (u64, String, Option<HeaderMap>, Vec<u8>);

/// The mirror held still; dropping it folds in what was read meanwhile.
#[cfg(test)]
pub(super) struct Hold<'a>(&'a Mirror);

#[cfg(test)]
impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let held = self.0.held.lock().expect("kv hold poisoned").take();
        for (seq, subject, headers, payload) in held.into_iter().flatten() {
            self.0.fold(seq, &subject, headers.as_ref(), &payload);
        }
    }
}

impl Mirror {
    fn new(root: String, restarts: Arc<Restarts>) -> Mirror {
        Mirror {
            root,
            data: RwLock::default(),
            bytes: RwLock::default(),
            applied: watch::channel(0).0,
            restarts,
            #[cfg(test)]
            held: Default::default(),
        }
    }

    fn subject(&self, plugin: &str, key: &str) -> String {
        format!(
            "{}.p{}.k{}",
            self.root,
            hex(plugin.as_bytes()),
            hex(key.as_bytes())
        )
    }

    fn parse(&self, subject: &str) -> Option<(String, String)> {
        let rest = subject.strip_prefix(&self.root)?.strip_prefix(".p")?;
        let (plugin, key) = rest.split_once(".k")?;
        Some((
            String::from_utf8(unhex(plugin)?).ok()?,
            String::from_utf8(unhex(key)?).ok()?,
        ))
    }

    /// The last sequence folded in, to wait on.
    pub(super) fn progress(&self) -> &watch::Sender<u64> {
        &self.applied
    }

    /// Holds the mirror still, as a follower that lost its server is: nothing is folded in
    /// while the guard lives. The follower reads on meanwhile; blocking it instead (holding the
    /// data's lock) would block the runtime worker it runs on, and with it the tasks queued
    /// there and the I/O driver, which can stall every timer and socket of the test.
    #[cfg(test)]
    pub(super) fn hold(&self) -> Hold<'_> {
        *self.held.lock().expect("kv hold poisoned") = Some(Vec::new());
        Hold(self)
    }

    /// Refuses `writes` when, applied to what this host has read, they would take `plugin`'s
    /// bytes past `limit`. Hosts writing at the same moment each check against what they have
    /// read, so together they may pass it by what those calls write.
    fn within_limit(
        &self,
        plugin: &str,
        writes: &BTreeMap<String, Option<Vec<u8>>>,
        limit: u64,
    ) -> Result<(), KvError> {
        let data = self.data.read().expect("kv mirror lock poisoned");
        let before = self
            .bytes
            .read()
            .expect("kv mirror lock poisoned")
            .get(plugin)
            .copied()
            .unwrap_or(0);
        let records = data.get(plugin);
        let after = writes.iter().fold(before, |after, (key, value)| {
            let old = records
                .and_then(|r| r.get(key))
                .and_then(|r| r.value.as_ref())
                .map_or(0, |v| kv_store::record_bytes(key, v));
            let new = value.as_ref().map_or(0, |v| kv_store::record_bytes(key, v));
            (after + new).saturating_sub(old)
        });
        kv_store::within_limit(before, after, limit).map(drop)
    }

    /// Refuses a call's writes when a key it read and does not write has changed since, as far as
    /// this host has read.
    fn unchanged(
        &self,
        plugin: &str,
        read: &BTreeMap<String, u64>,
        writes: &BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), KvError> {
        let data = self.data.read().expect("kv mirror lock poisoned");
        let records = data.get(plugin);
        let changed = read.iter().find(|&(key, &seen)| {
            !writes.contains_key(key)
                && records.and_then(|r| r.get(key)).map_or(0, |r| r.seq) != seen
        });
        match changed {
            Some((key, _)) => Err(KvError::Conflict(format!(
                "`{key}` was written by another call or host since this one read it"
            ))),
            None => Ok(()),
        }
    }

    /// The sequence each key of `chunks` was stored at, once the mirror shows them. A key whose
    /// last message is past its batch's last (another host wrote it since) gets the batch's last:
    /// not the key's last message, so that a later write of it by this call is refused rather
    /// than overwrite the other host's unseen.
    fn stored(&self, plugin: &str, chunks: &[(&[Write], u64)]) -> BTreeMap<String, u64> {
        let data = self.data.read().expect("kv mirror lock poisoned");
        let records = data.get(plugin);
        chunks
            .iter()
            .flat_map(|&(chunk, last)| {
                chunk.iter().map(move |(key, _)| {
                    let seq = records.and_then(|r| r.get(key)).map_or(0, |r| r.seq);
                    (key.clone(), seq.min(last))
                })
            })
            .collect()
    }

    /// Waits until the mirror has reached `seq`.
    pub(super) async fn reached(&self, seq: u64, limit: Duration) -> bool {
        follow::reached("plugin kv", &self.applied, seq, &self.restarts, Some(limit)).await
    }
}

impl Fold for Mirror {
    fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    fn fold(&self, seq: u64, subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) {
        #[cfg(test)]
        if let Some(held) = self.held.lock().expect("kv hold poisoned").as_mut() {
            held.push((seq, subject.to_owned(), headers.cloned(), payload.to_vec()));
            return;
        }
        match self.parse(subject) {
            Some((plugin, key)) => {
                let deleted = headers
                    .and_then(|h| h.get(OP))
                    .is_some_and(|v| v.as_str() == "del");
                let mut data = self.data.write().expect("kv mirror lock poisoned");
                // A delete stays as a tombstone: its message is the key's last, which the next
                // write of the key must name.
                let value = (!deleted).then(|| payload.to_vec());
                let added = value
                    .as_ref()
                    .map_or(0, |v| kv_store::record_bytes(&key, v));
                let records = data.entry(plugin.clone()).or_default();
                let removed = records
                    .get(&key)
                    .and_then(|r| r.value.as_ref())
                    .map_or(0, |v| kv_store::record_bytes(&key, v));
                records.insert(key, Record { value, seq });
                let mut bytes = self.bytes.write().expect("kv mirror lock poisoned");
                let total = bytes.entry(plugin).or_default();
                *total = (*total + added).saturating_sub(removed);
            }
            None => tracing::warn!(subject, "skipping a kv message on an unknown subject"),
        }
        self.applied.send_replace(seq);
    }
}

/// The stream's settings: one message per key, file storage, the ledger's replicas, and atomic
/// batches allowed.
pub(super) fn stream_config(ledger_stream: &str, replicas: usize) -> (stream::Config, String) {
    let name = format!("{ledger_stream}_KV");
    let root = name.to_lowercase();
    let config = stream::Config {
        name,
        description: Some("prismhook plugins' kv: the latest value of every key".into()),
        subjects: vec![format!("{root}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        allow_atomic_publish: true,
        ..Default::default()
    };
    (config, root)
}

/// The [`KvBackend`] of hosts sharing a JetStream ledger.
pub struct JetStreamKv {
    pub(super) mirror: Arc<Mirror>,
    pub(super) stream: stream::Stream,
    /// The sequence of a write of this host's that was stored but not yet read back when its
    /// call ended: reads wait until the mirror shows it.
    pub(super) written: AtomicU64,
    /// A write failed after it was sent, so it may be stored where this host does not know:
    /// reads wait until the mirror has caught up with the whole stream.
    pub(super) unsure: AtomicBool,
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) ack_timeout: Duration,
    /// The runtime the blocking `apply` runs its publishes on.
    pub(super) handle: tokio::runtime::Handle,
}

impl JetStreamKv {
    pub(super) fn mirror(root: String, restarts: Arc<Restarts>) -> Arc<Mirror> {
        Arc::new(Mirror::new(root, restarts))
    }

    /// Publishes one batch of writes atomically; returns the sequence of its last message.
    async fn publish(
        &self,
        plugin: &str,
        writes: &[Write],
        read: &BTreeMap<String, u64>,
    ) -> Result<u64, KvError> {
        let messages = {
            let data = self.mirror.data.read().expect("kv mirror lock poisoned");
            let records = data.get(plugin);
            writes
                .iter()
                .map(|(key, value)| {
                    let mut headers = HeaderMap::new();
                    if value.is_none() {
                        headers.insert(OP, "del");
                    }
                    // Each key must still be as the call read it (or, written unread, as this
                    // host knows it now): a write made from an older value, or sent by a call
                    // that failed and stored late after a newer one, is refused rather than
                    // undo the newer one.
                    let expected = read
                        .get(key)
                        .copied()
                        .unwrap_or_else(|| records.and_then(|r| r.get(key)).map_or(0, |r| r.seq));
                    headers.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        expected.to_string().as_str(),
                    );
                    batch::Message {
                        subject: self.mirror.subject(plugin, key),
                        headers,
                        payload: value.clone().unwrap_or_default().into(),
                    }
                })
                .collect()
        };
        batch::publish(&self.client, &self.js, self.ack_timeout, messages)
            .await
            .map_err(|e| {
                if e.superseded() {
                    KvError::Conflict(format!(
                        "`{plugin}`'s writes were refused: a key the call read was written \
                         since, by another call or host"
                    ))
                } else if e.too_large() {
                    KvError::Refused(format!("`{plugin}`'s writes to JetStream: {e}"))
                } else {
                    KvError::Storage(format!(
                        "{} `{plugin}`'s writes to JetStream: {}",
                        e.stage, e.message
                    ))
                }
            })
    }
}

impl KvBackend for JetStreamKv {
    /// A value and its headers go in one message, which the servers' `max_payload`
    /// (1 MiB by default) bounds.
    fn max_value_bytes(&self) -> usize {
        batch::payload_room(&self.client).min(kv_store::MAX_VALUE_BYTES)
    }

    fn read(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.read_versioned(plugin, key)?.0)
    }

    /// The version is the sequence of the key's last message (0: never written).
    fn read_versioned(
        &self,
        plugin: &str,
        key: &str,
    ) -> Result<(Option<Vec<u8>>, Option<u64>), KvError> {
        let data = self.mirror.data.read().expect("kv mirror lock poisoned");
        let record = data.get(plugin).and_then(|r| r.get(key));
        Ok((
            record.and_then(|r| r.value.clone()),
            Some(record.map_or(0, |r| r.seq)),
        ))
    }

    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        let data = self.mirror.data.read().expect("kv mirror lock poisoned");
        let from = kv_store::start(prefix, after).map(str::to_owned);
        Ok(data
            .get(plugin)
            .map(|records| {
                records
                    .range::<String, _>((from, Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .filter(|(_, r)| r.value.is_some())
                    .map(|(k, _)| k.clone())
                    .take(limit)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Keys the call read but does not write are held to what this host has read since: a
    /// write of them by another host that the mirror does not show yet goes unseen (the keys
    /// written are fenced by the servers, whatever this host has read).
    fn apply(
        &self,
        plugin: &str,
        writes: BTreeMap<String, Option<Vec<u8>>>,
        read: &BTreeMap<String, u64>,
        limit: u64,
    ) -> Result<BTreeMap<String, u64>, KvError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(KvError::Storage(format!(
                "`{plugin}`'s writes cannot be stored: not connected to any NATS server"
            )));
        }
        self.mirror.unchanged(plugin, read, &writes)?;
        self.mirror.within_limit(plugin, &writes, limit)?;
        // A delete of what is not there, of a key the call did not read,
        // changes nothing, and would leave a tombstone on its own subject for
        // good: a call may delete any number of keys. One the call read is
        // published all the same: its message carries the fence that has the
        // servers refuse the call if another host wrote the key since.
        let writes: Vec<Write> = {
            let data = self.mirror.data.read().expect("kv mirror lock poisoned");
            let held = data.get(plugin);
            writes
                .into_iter()
                .filter(|(key, value)| {
                    value.is_some()
                        || read.contains_key(key)
                        || held
                            .and_then(|r| r.get(key))
                            .is_some_and(|r| r.value.is_some())
                })
                .collect()
        };
        if writes.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.handle.block_on(async {
            let mut lasts = Vec::new();
            for chunk in writes.chunks(BATCH_MAX) {
                let last = self.publish(plugin, chunk, read).await.inspect_err(|_| {
                    self.unsure.store(true, Ordering::SeqCst);
                })?;
                lasts.push((chunk, last));
            }
            let last = lasts.last().map_or(0, |(_, last)| *last);
            // Read-your-writes: the next call on this host sees them. Should the mirror not show
            // them in time, no call reads before it does (`settle`).
            if !self.mirror.reached(last, self.ack_timeout).await {
                self.written.fetch_max(last, Ordering::SeqCst);
                return Err(KvError::Storage(format!(
                    "`{plugin}`'s writes were stored but this host has not read them back \
                     within {:?}",
                    self.ack_timeout
                )));
            }
            Ok(self.mirror.stored(plugin, &lasts))
        })
    }

    fn bytes(&self, plugin: &str) -> Result<u64, KvError> {
        let bytes = self.mirror.bytes.read().expect("kv mirror lock poisoned");
        Ok(bytes.get(plugin).copied().unwrap_or(0))
    }

    fn settled(&self) -> bool {
        !self.unsure.load(Ordering::SeqCst)
            && Fold::applied(self.mirror.as_ref()) >= self.written.load(Ordering::SeqCst)
    }

    fn settle(&self) -> Result<(), KvError> {
        self.handle.block_on(async {
            let behind = |what: &str| {
                KvError::Storage(format!(
                    "this host's copy of the plugins' kv has not caught up with {what} within {:?}",
                    self.ack_timeout
                ))
            };
            if self.unsure.load(Ordering::SeqCst) {
                let last = tokio::time::timeout(self.ack_timeout, self.stream.get_info())
                    .await
                    .map_err(|_| behind("the stream"))?
                    .map_err(|e| KvError::Storage(format!("reading the kv stream's state: {e}")))?
                    .state
                    .last_sequence;
                if !self.mirror.reached(last, self.ack_timeout).await {
                    return Err(behind("the stream"));
                }
                self.unsure.store(false, Ordering::SeqCst);
            }
            let written = self.written.load(Ordering::SeqCst);
            if !self.mirror.reached(written, self.ack_timeout).await {
                return Err(behind("this host's own writes"));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_plugin_name_and_key_survive_the_subject_and_back() {
        let mirror = Mirror::new("prismhook_kv".into(), Arc::default());
        for (plugin, key) in [
            ("paloalto", "vm/lab/0c4a"),
            ("p", ""),
            ("x.y", "a b.*>\u{e9}"),
        ] {
            let subject = mirror.subject(plugin, key);
            assert!(!subject.contains(' ') && !subject.contains('*'));
            assert_eq!(mirror.parse(&subject), Some((plugin.into(), key.into())));
        }
        assert_eq!(mirror.parse("prismhook_kv.pzz.k00"), None);
    }
}
