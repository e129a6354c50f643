//! Files written by older releases, brought to the current layout when opened.
//!
//! Until 2026-12 a file kept each event in two tables, `events` (without the decoded VM) and
//! `event_vms`, and its dedupe window in `dedupe` (key → (event id, received_at_ms)) and
//! `dedupe_by_time`. Converting moves events a chunk per transaction, so a crash midway leaves a
//! file that the next open goes on converting, each event in exactly one of the two layouts.
//! The old tables are deleted once empty, and `events` is created again with the type that keeps
//! older releases out (see the `store` module).

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError,
};
use tracing::info;

use super::store::{EVENTS, EVENT_KEYS, OLDER_RELEASES_STOP_HERE};
use super::writer::CHUNK;
use super::Ctx;
use crate::ledger::LedgerError;

type OldEventRow = (
    u64,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const OLD_EVENTS: TableDefinition<u64, OldEventRow> = TableDefinition::new("events");
const OLD_EVENT_VMS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_vms");
const OLD_DEDUPE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("dedupe");
const OLD_DEDUPE_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("dedupe_by_time");

/// Brings a file of an older layout to the current one; a file of the current layout (or a new
/// one) is left as it is. Returns how many events moved.
pub(super) fn convert(db: &Database) -> Result<u64, LedgerError> {
    if !holds_older_layout(db)? {
        return Ok(0);
    }
    let mut moved = 0;
    loop {
        let chunk = move_events(db)?;
        moved += chunk;
        if chunk < CHUNK as u64 {
            break;
        }
        info!(
            events = moved,
            "converting the ledger to the current layout"
        );
    }
    let keys = finish(db)?;
    info!(
        events = moved,
        dedupe_keys = keys,
        "converted the ledger from an older release's layout"
    );
    Ok(moved)
}

fn holds_older_layout(db: &Database) -> Result<bool, LedgerError> {
    let txn = db.begin_read().ctx("beginning a read transaction")?;
    let probe = |result: Result<(), TableError>| match result {
        Ok(()) => Ok(true),
        Err(TableError::TableDoesNotExist(_) | TableError::TableTypeMismatch { .. }) => Ok(false),
        Err(error) => Err(error).ctx("looking for an older layout's tables"),
    };
    Ok(
        probe(txn.open_table(OLD_EVENTS).map(drop))?
            || probe(txn.open_table(OLD_DEDUPE).map(drop))?,
    )
}

/// Moves up to [`CHUNK`] events, with their decoded VMs, in one transaction.
fn move_events(db: &Database) -> Result<u64, LedgerError> {
    let txn = db.begin_write().ctx("beginning a write transaction")?;
    let mut moved = 0;
    {
        let mut old = match txn.open_table(OLD_EVENTS) {
            Ok(table) => table,
            // Only the dedupe tables were left: the events have all moved.
            Err(TableError::TableTypeMismatch { .. }) => return Ok(0),
            Err(error) => return Err(error).ctx("opening the old events table"),
        };
        let mut vms = txn
            .open_table(OLD_EVENT_VMS)
            .ctx("opening the old event_vms table")?;
        let mut events = txn
            .open_table(EVENTS)
            .ctx("opening the event_records table")?;
        while moved < CHUNK as u64 {
            let Some((id, row)) = old.pop_first().ctx("taking an old event")? else {
                break;
            };
            let id = id.value();
            let (received_at_ms, cluster, event_type, entity_kind, entity_uuid, body) = row.value();
            let vm = vms
                .remove(id)
                .with_ctx(|| format!("taking the decoded VM of event {id}"))?;
            events
                .insert(
                    id,
                    (
                        received_at_ms,
                        cluster,
                        event_type,
                        entity_kind,
                        entity_uuid,
                        vm.as_ref().map(|v| v.value()),
                        body,
                    ),
                )
                .with_ctx(|| format!("moving event {id}"))?;
            moved += 1;
        }
    }
    txn.commit().ctx("moving events to the current layout")?;
    Ok(moved)
}

/// Moves the dedupe keys beside their events and deletes the old tables; returns how many keys
/// moved.
fn finish(db: &Database) -> Result<u64, LedgerError> {
    let txn = db.begin_write().ctx("beginning a write transaction")?;
    let mut keys = 0;
    {
        let old = txn
            .open_table(OLD_DEDUPE)
            .ctx("opening the old dedupe table")?;
        let mut event_keys = txn
            .open_table(EVENT_KEYS)
            .ctx("opening the event_keys table")?;
        for row in old.iter().ctx("reading the old dedupe table")? {
            let (key, value) = row.ctx("reading an old dedupe key")?;
            let (id, received_at_ms) = value.value();
            event_keys
                .insert(id, (received_at_ms, key.value()))
                .with_ctx(|| format!("moving the dedupe key of event {id}"))?;
            keys += 1;
        }
    }
    for (name, deleted) in [
        ("dedupe", txn.delete_table(OLD_DEDUPE)),
        ("dedupe_by_time", txn.delete_table(OLD_DEDUPE_BY_TIME)),
        ("event_vms", txn.delete_table(OLD_EVENT_VMS)),
    ] {
        deleted.with_ctx(|| format!("deleting the old {name} table"))?;
    }
    let events_left = match txn.open_table(OLD_EVENTS) {
        Ok(table) => Some(table.len().ctx("counting old events")?),
        Err(TableError::TableTypeMismatch { .. }) => None,
        Err(error) => return Err(error).ctx("opening the old events table"),
    };
    if let Some(left) = events_left {
        if left > 0 {
            return Err(LedgerError::Corrupt {
                what: "the old events table".into(),
                detail: format!("{left} events left after moving them all"),
            });
        }
        txn.delete_table(OLD_EVENTS)
            .ctx("deleting the old events table")?;
    }
    txn.open_table(OLDER_RELEASES_STOP_HERE)
        .ctx("creating the events table")?;
    txn.commit().ctx("finishing the conversion")?;
    Ok(keys)
}
