//! What Nutanix Prism sends, read leniently: notification bodies and VM
//! intents ([`payload`]) and the v3 API's answers ([`v3`]). The host's
//! `nutanix` module does the I/O around them.

pub mod payload;
pub mod pruned;
pub mod v3;

use serde_json::Value;

/// A non-empty string at `path` (see [`member_at`]): Prism's values are
/// used as they are, and an empty one says nothing.
pub fn str_at<'a>(value: &'a Value, path: &str) -> Option<&'a str> {
    member_at(value, path)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The value at `path`, a `/` before each member's name (`/spec/name`):
/// object members only, names as written. [`Value::pointer`] would also
/// index arrays and undo `~` escapes, at two new strings per name: 28 of a
/// notification's allocations.
pub fn member_at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/')
        .skip(1)
        .try_fold(value, |at, name| at.as_object()?.get(name))
}
