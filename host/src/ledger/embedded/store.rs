//! The ledger's redb tables and record formats.
//!
//! | table | key | value |
//! |---|---|---|
//! | `events` | event id | (received_at_ms, cluster, event_type, entity_kind, entity_uuid, body) |
//! | `deliveries` | (plugin, event id) | [`DeliveryRecord`] as JSON |
//! | `dedupe` | dedupe key | (event id, received_at_ms) |
//! | `dedupe_by_time` | (received_at_ms, dedupe key) | () — lets prune find expired keys without a scan |
//! | `event_vms` | event id | the VM its source decoded at ingest, as JSON (only events that have one) |
//! | `meta` | name | u64: `next_event_id` (written by prune only), `delivered/<plugin>` |
//!
//! Events are the bulk of the file and are written on the hot path, so they are a redb tuple:
//! the body is stored as it came, not escaped into another JSON document. Delivery records are
//! small and the likeliest to gain fields, so they are JSON with defaults. The decoded VM is a
//! table of its own, so that files written before it existed open unchanged (their events simply
//! have no decoded VM).
//!
//! A delivery record exists only while the delivery is *pending* or *dead*: a done delivery's
//! record is deleted (its count goes to `delivered/<plugin>`), so an event with no delivery
//! records left is fully delivered, and the table's size follows the backlog, not the history.
//! *In flight* is never written (see the index module).

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
    &'static str,
);

pub(super) const EVENTS: TableDefinition<u64, EventRow> = TableDefinition::new("events");
pub(super) const DELIVERIES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("deliveries");
pub(super) const DEDUPE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("dedupe");
pub(super) const DEDUPE_BY_TIME: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("dedupe_by_time");
pub(super) const EVENT_VMS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_vms");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(super) const NEXT_EVENT_ID: &str = "next_event_id";
pub(super) const DELIVERED_PREFIX: &str = "delivered/";

pub(super) fn delivered_key(plugin: &str) -> String {
    format!("{DELIVERED_PREFIX}{plugin}")
}

/// The event as the rest of the host sees it, from its stored row and decoded VM.
pub(super) fn event_from_row(
    id: u64,
    vm: Option<Vm>,
    (received_at_ms, cluster, event_type, entity_kind, entity_uuid, body): (
        u64,
        &str,
        &str,
        &str,
        &str,
        &str,
    ),
) -> StoredEvent {
    StoredEvent {
        id,
        cluster: cluster.to_owned(),
        event_type: event_type.to_owned(),
        entity_kind: entity_kind.to_owned(),
        entity_uuid: entity_uuid.to_owned(),
        received_at_ms,
        body: body.to_owned(),
        vm,
    }
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
    pub dedupe: Table<'t, &'static str, (u64, u64)>,
    pub dedupe_by_time: Table<'t, (u64, &'static str), ()>,
    pub event_vms: Table<'t, u64, &'static [u8]>,
    pub meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, LedgerError> {
        Ok(Self {
            events: txn.open_table(EVENTS).ctx("opening the events table")?,
            deliveries: txn
                .open_table(DELIVERIES)
                .ctx("opening the deliveries table")?,
            dedupe: txn.open_table(DEDUPE).ctx("opening the dedupe table")?,
            dedupe_by_time: txn
                .open_table(DEDUPE_BY_TIME)
                .ctx("opening the dedupe_by_time table")?,
            event_vms: txn
                .open_table(EVENT_VMS)
                .ctx("opening the event_vms table")?,
            meta: txn.open_table(META).ctx("opening the meta table")?,
        })
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
        assert_eq!(fresh.encode(), b"{}");
        let mut dead = DeliveryRecord::default();
        dead.die(3, "no".into(), 42);
        let back = DeliveryRecord::decode("p", 1, &dead.encode()).unwrap();
        assert_eq!(back, dead);
    }
}
