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
    /// The Nutanix (Prism Element) cluster the VM belongs to, by the name
    /// Prism gives in its `cluster_reference`.
    #[serde(default)]
    pub cluster_name: Option<String>,
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

/// Longest event type accepted (`KIND.ACTION`).
pub const MAX_EVENT_TYPE_BYTES: usize = 64;

/// Whether `s` has the shape of an event type, `KIND.ACTION`: a kind of
/// letters, digits, `_` and `-`, a dot, an action that may hold further
/// dots. Prism's payloads differ by release, so the shape is lenient.
pub fn is_kind_action(s: &str) -> bool {
    let Some((kind, action)) = s.split_once('.') else {
        return false;
    };
    let word = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    word(kind) && word(action)
}

/// Whether `s` is an event type the host stores and labels metrics with:
/// [`is_kind_action`], at most [`MAX_EVENT_TYPE_BYTES`].
pub fn valid_event_type(s: &str) -> bool {
    s.len() <= MAX_EVENT_TYPE_BYTES && is_kind_action(s)
}

/// Whether `s` is a subscription: an event type, `KIND.*` or `*`.
pub fn valid_subscription(s: &str) -> bool {
    s == "*"
        || valid_event_type(s)
        || s.strip_suffix(".*")
            .is_some_and(|kind| valid_event_type(&format!("{kind}.X")))
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

#[cfg(test)]
mod shape_tests {
    use super::*;

    #[test]
    fn event_types_are_kind_dot_action_and_bounded() {
        for ok in [
            "VM.ON",
            "VM.NIC_PLUG",
            "SUBNET.CREATE",
            "TEST.RETRY2",
            "VM.ON.X",
            "A-B.C-D",
        ] {
            assert!(valid_event_type(ok), "{ok}");
        }
        let long = format!("VM.{}", "A".repeat(MAX_EVENT_TYPE_BYTES));
        for bad in [
            "",
            "VM",
            "VM.",
            ".ON",
            "<svg onload=1>",
            "VM.O N",
            long.as_str(),
        ] {
            assert!(!valid_event_type(bad), "{bad}");
        }
    }

    #[test]
    fn subscriptions_are_event_types_kind_wildcards_or_everything() {
        for ok in ["*", "VM.*", "VM.ON"] {
            assert!(valid_subscription(ok), "{ok}");
        }
        for bad in ["VM*", "*.ON", "<svg onload=1>", "VM.*.*", ""] {
            assert!(!valid_subscription(bad), "{bad}");
        }
    }
}
