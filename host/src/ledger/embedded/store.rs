//! The ledger's redb tables and record formats.
//!
//! | table | key | value |
//! |---|---|---|
//! | `event_records` | event id | (received_at_ms, cluster, event_type, entity_kind, entity_uuid, decoded VM as JSON, body) |
//! | `deliveries` | (plugin, event id) | [`DeliveryRecord`] as JSON |
//! | `event_keys` | event id | (received_at_ms, dedupe key), for events that have one |
//! | `meta` | name | u64: `next_event_id` (written by prune only), `delivered/<plugin>` |
//! | `events` | – | empty, of a type older releases cannot open (see below) |
//!
//! An append writes one row of `event_records`, one of `event_keys` and one per delivery, each
//! at the end of its table (ids follow arrival), so a commit rewrites few pages besides the new
//! ones: at saturation that cost is what bounds the accept rate. Events are the bulk of the file,
//! so they are a redb tuple: the body is stored as it came, not escaped into another JSON
//! document. Delivery records are small and the likeliest to gain fields, so they are JSON with
//! defaults.
//!
//! The dedupe window is held in memory (see the `window` module); `event_keys` is what it is read
//! back from on open, and prune deletes its rows once they are older than the window.
//!
//! A delivery record exists only while the delivery is *pending* or *dead*: a done delivery's
//! record is deleted (its count goes to `delivered/<plugin>`), so an event with no delivery
//! records left is fully delivered, and the table's size follows the backlog, not the history.
//! *In flight* is never written (see the index module).
//!
//! Files written by releases before this layout are converted when opened (the `convert`
//! module). Those releases kept events in a table named `events`; it is left behind empty and of
//! another type, so that such a release refuses the file instead of reading it as one without
//! events, where it would delete every delivery as an orphan.

use redb::{Table, TableDefinition, WriteTransaction};

use super::Ctx;
use crate::event::Vm;
pub(super) use crate::ledger::delivery::{DeliveryRecord, DeliveryState};
use crate::ledger::{LedgerError, StoredEvent};

pub(super) type EventRow = (
    u64,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static [u8]>,
    &'static str,
);

pub(super) const EVENTS: TableDefinition<u64, EventRow> = TableDefinition::new("event_records");
pub(super) const DELIVERIES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("deliveries");
pub(super) const EVENT_KEYS: TableDefinition<u64, (u64, &str)> = TableDefinition::new("event_keys");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Holds nothing: its name and type keep older releases out of the file.
pub(super) const OLDER_RELEASES_STOP_HERE: TableDefinition<&str, &str> =
    TableDefinition::new("events");

pub(super) const NEXT_EVENT_ID: &str = "next_event_id";
pub(super) const DELIVERED_PREFIX: &str = "delivered/";

pub(super) fn delivered_key(plugin: &str) -> String {
    format!("{DELIVERED_PREFIX}{plugin}")
}

/// The event as the rest of the host sees it, from its stored row.
pub(super) fn event_from_row(
    id: u64,
    (received_at_ms, cluster, event_type, entity_kind, entity_uuid, vm, body): (
        u64,
        &str,
        &str,
        &str,
        &str,
        Option<&[u8]>,
        &str,
    ),
) -> Result<StoredEvent, LedgerError> {
    Ok(StoredEvent {
        id,
        cluster: cluster.to_owned(),
        event_type: event_type.to_owned(),
        entity_kind: entity_kind.to_owned(),
        entity_uuid: entity_uuid.to_owned(),
        received_at_ms,
        body: body.to_owned(),
        vm: vm.map(|bytes| decode_vm(id, bytes)).transpose()?,
    })
}

pub(super) fn encode_vm(vm: &Vm) -> Vec<u8> {
    serde_json::to_vec(vm).expect("a VM always serializes")
}

pub(super) fn decode_vm(id: u64, bytes: &[u8]) -> Result<Vm, LedgerError> {
    serde_json::from_slice(bytes).map_err(|e| LedgerError::Corrupt {
        what: format!("decoded VM of event {id}"),
        detail: e.to_string(),
    })
}

/// All tables, opened once per write transaction.
pub(super) struct Tables<'t> {
    pub events: Table<'t, u64, EventRow>,
    pub deliveries: Table<'t, (&'static str, u64), &'static [u8]>,
    pub event_keys: Table<'t, u64, (u64, &'static str)>,
    pub meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, LedgerError> {
        Ok(Self {
            events: txn.open_table(EVENTS).ctx("opening the events table")?,
            deliveries: txn
                .open_table(DELIVERIES)
                .ctx("opening the deliveries table")?,
            event_keys: txn
                .open_table(EVENT_KEYS)
                .ctx("opening the event_keys table")?,
            meta: txn.open_table(META).ctx("opening the meta table")?,
        })
    }

    /// Creates the tables of a new file, and the one that keeps older releases out.
    pub fn create(txn: &'t WriteTransaction) -> Result<(), LedgerError> {
        drop(Self::open(txn)?);
        txn.open_table(OLDER_RELEASES_STOP_HERE)
            .ctx("creating the events table")?;
        Ok(())
    }

    pub fn record(&self, plugin: &str, id: u64) -> Result<Option<DeliveryRecord>, LedgerError> {
        use redb::ReadableTable;
        match self
            .deliveries
            .get((plugin, id))
            .with_ctx(|| format!("reading the delivery of event {id} to `{plugin}`"))?
        {
            Some(bytes) => DeliveryRecord::decode(plugin, id, bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    pub fn put_record(
        &mut self,
        plugin: &str,
        id: u64,
        record: &DeliveryRecord,
    ) -> Result<(), LedgerError> {
        self.deliveries
            .insert((plugin, id), record.encode().as_slice())
            .with_ctx(|| format!("writing the delivery of event {id} to `{plugin}`"))?;
        Ok(())
    }

    pub fn remove_record(&mut self, plugin: &str, id: u64) -> Result<(), LedgerError> {
        self.deliveries
            .remove((plugin, id))
            .with_ctx(|| format!("deleting the delivery of event {id} to `{plugin}`"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_pending_record_is_two_bytes_and_reads_back() {
        let fresh = DeliveryRecord::default();
        assert_eq!(fresh.encode(), DeliveryRecord::PENDING);
        let mut dead = DeliveryRecord::default();
        dead.die(3, "no".into(), 42);
        let back = DeliveryRecord::decode("p", 1, &dead.encode()).unwrap();
        assert_eq!(back, dead);
    }
}
