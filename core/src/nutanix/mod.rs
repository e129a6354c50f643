//! What Nutanix Prism sends, read leniently: notification bodies and VM
//! intents ([`payload`]) and the v3 API's answers ([`v3`]). The host's
//! `nutanix` module does the I/O around them.

pub mod payload;
pub mod v3;

use serde_json::Value;

/// A non-empty string at `pointer`: Prism's values are used as they are, and
/// an empty one says nothing.
pub fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}
