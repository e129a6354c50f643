//! What an event source decodes a notification into: the host's own model
//! of the entity an event is about, independent of any one source.
//!
//! A source decodes each notification once, when it arrives; the ledger
//! stores the decoded entity beside the raw body, and the dispatcher hands
//! both to plugins on every attempt without parsing anything again. The
//! runtime turns these types into the WIT records plugins see
//! (`runtime::bindings`).

use serde::{Deserialize, Serialize};

/// One notification as a source decoded it, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// `KIND.ACTION`, such as `VM.ON`.
    pub event_type: String,
    /// Lower case, such as `vm` or `subnet`.
    pub entity_kind: String,
    /// Empty when the notification names no entity.
    pub entity_uuid: String,
    /// Equal for two deliveries of the same change and different for
    /// different changes, within one endpoint (the ingest prefixes it with
    /// the endpoint's name).
    pub dedupe_key: String,
    /// The VM the notification describes, when it is about a VM and carries
    /// its state.
    pub vm: Option<Vm>,
}

/// A VM as plugins see it, whatever the source's release or dialect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub uuid: String,
    pub name: Option<String>,
    /// `ON` or `OFF`; other states are passed on upper-cased.
    pub power_state: Option<String>,
    /// `(key, value)` sorted; a key with several values appears once per
    /// value.
    pub categories: Vec<(String, String)>,
    pub nics: Vec<Nic>,
    pub host_name: Option<String>,
    /// The source's version of the entity, as a string.
    pub entity_version: Option<String>,
}

/// One virtual NIC of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub uuid: Option<String>,
    pub mac_address: Option<String>,
    /// Assigned and learned addresses, in the order the source lists them,
    /// without repeats.
    pub ips: Vec<String>,
    pub subnet_name: Option<String>,
    pub subnet_uuid: Option<String>,
}

/// Whether a subscription (`VM.ON`, `VM.*`, `*`) covers `event_type`.
pub fn matches(subscription: &str, event_type: &str) -> bool {
    match subscription.strip_suffix('*') {
        None => subscription.eq_ignore_ascii_case(event_type),
        Some(prefix) => event_type
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
    }
}
