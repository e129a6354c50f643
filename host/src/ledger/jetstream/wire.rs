//! What the JetStream ledger writes to its stream: subjects, and the two kinds of record.
//!
//! | subject | payload | one per |
//! |---|---|---|
//! | `<prefix>.ev.<nonce>` | [`EventRecord`] (JSON) | accepted notification; its stream sequence is the event id |
//! | `<prefix>.dl.<event id>.<plugin>` | [`Mark`] (JSON) | delivery that is not simply pending |
//!
//! The stream keeps one message per subject, so a delivery's subject holds only its latest mark
//! (the stream compacts itself, as a KV bucket does), and an event's subject is unique (a random
//! nonce), so events are never replaced. An event lists the plugins it was for: its deliveries are
//! pending without a message of their own until something happens to them, which is what makes
//! an append one publish.
//!
//! Only the received time travels in a header (pruning reads headers alone); everything that came
//! from the network stays in the JSON payload, where no character can break the framing.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::event::Vm;
use crate::ledger::delivery::DeliveryRecord;
use crate::ledger::StoredEvent;

/// The header with an event's `received_at_ms`, in decimal.
pub(super) const RECEIVED: &str = "Prismhook-Received";

/// An accepted notification, with the plugins it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct EventRecord {
    pub cluster: String,
    pub event_type: String,
    pub entity_kind: String,
    pub entity_uuid: String,
    pub received_at_ms: u64,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Vm>,
    pub plugins: Vec<String>,
}

impl EventRecord {
    pub fn stored(self, id: u64) -> (StoredEvent, Vec<String>) {
        let event = StoredEvent {
            id,
            cluster: self.cluster,
            event_type: self.event_type,
            entity_kind: self.entity_kind,
            entity_uuid: self.entity_uuid,
            received_at_ms: self.received_at_ms,
            body: self.body,
            vm: self.vm,
        };
        (event, self.plugins)
    }
}

/// The latest state of one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mark", rename_all = "snake_case")]
pub(super) enum Mark {
    Done,
    /// A dead letter an operator dropped.
    Dropped,
    /// Pending (failed before, or given anew by a replay) or dead. It carries the event's lane
    /// and time, because a replay may give a delivery of an event no plugin is waiting for any
    /// more (and so not in the index).
    Record {
        record: DeliveryRecord,
        lane: String,
        received_at_ms: u64,
    },
}

/// What a subject of the stream is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Subject<'a> {
    Event,
    Delivery { id: u64, plugin: &'a str },
    Other,
}

/// The stream's subjects, under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Everything the stream holds.
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// A fresh subject for one event.
    pub fn new_event(&self) -> String {
        let nonce: u128 = rand::rng().random();
        format!("{}.ev.{nonce:032x}", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}.ev.>", self.prefix)
    }

    pub fn delivery(&self, id: u64, plugin: &str) -> String {
        format!("{}.dl.{id}.{plugin}", self.prefix)
    }

    /// Every delivery of one event.
    pub fn deliveries_of(&self, id: u64) -> String {
        format!("{}.dl.{id}.>", self.prefix)
    }

    pub fn parse<'a>(&self, subject: &'a str) -> Subject<'a> {
        let Some(rest) = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
        else {
            return Subject::Other;
        };
        if rest.starts_with("ev.") {
            return Subject::Event;
        }
        let Some((id, plugin)) = rest.strip_prefix("dl.").and_then(|r| r.split_once('.')) else {
            return Subject::Other;
        };
        match id.parse() {
            Ok(id) if !plugin.is_empty() => Subject::Delivery { id, plugin },
            _ => Subject::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse_back_to_what_made_them() {
        let s = Subjects::new("prismhook");
        assert_eq!(s.parse(&s.new_event()), Subject::Event);
        assert_eq!(
            s.parse(&s.delivery(42, "paloalto")),
            Subject::Delivery {
                id: 42,
                plugin: "paloalto"
            }
        );
        assert_eq!(s.parse("prismhook.dl.x.paloalto"), Subject::Other);
        assert_eq!(s.parse("prismhookx.ev.1"), Subject::Other);
        assert_eq!(s.parse("other.ev.1"), Subject::Other);
        assert_ne!(s.new_event(), s.new_event());
    }
}
