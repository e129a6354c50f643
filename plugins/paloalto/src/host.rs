//! The plugin's view of the host and of the events it delivers, as plain Rust
//! types.
//!
//! The WIT bindings only exist in the Wasm build. Keeping the logic behind
//! these types and the [`Host`] trait lets every rule be unit-tested natively
//! against an in-memory store and a scripted firewall; `lib.rs` converts at
//! the edge.

/// A VM as the host parsed it from a notification or the inventory; only
/// the fields this plugin uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vm {
    pub uuid: String,
    pub name: Option<String>,
    /// `ON`, `OFF`, or absent when the payload does not say.
    pub power_state: Option<String>,
    /// `(key, value)` pairs, such as `("AppTier", "Web")`.
    pub categories: Vec<(String, String)>,
    /// The IPs of each NIC, in Prism's order.
    pub nics: Vec<Vec<String>>,
    /// The Nutanix cluster it belongs to (host 0.1.1's
    /// `context.vm-cluster-name`), asked for only when a tag template
    /// names it.
    pub cluster_name: Option<String>,
}

/// One notification of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub cluster: String,
    pub event_type: String,
    pub entity_uuid: String,
    pub vm: Option<Vm>,
}

/// What became of one event; mirrors the WIT `outcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Retry {
        reason: String,
        delay_ms: Option<u64>,
    },
    Reject(String),
}

/// An outbound HTTP request; the host adds the firewall's API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Mirrors the WIT `http.error` variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    Denied(String),
    InvalidRequest(String),
    Timeout,
    ConnectionFailed(String),
    TooLarge(u64),
    LimitExceeded(String),
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// The host imports: the private key-value store, outbound HTTP and the log.
pub trait Host {
    fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String>;
    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), String>;
    fn kv_delete(&mut self, key: &str) -> Result<(), String>;
    /// At most `limit` keys starting with `prefix` and sorting after
    /// `after`, in byte order; fewer means there are no more (host 0.1.3).
    fn kv_list_after(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, String>;
    fn send(&mut self, request: Request) -> Result<Response, HttpError>;
    fn log(&mut self, level: Level, message: &str);
}

/// The keys under a prefix, read from `kv` a page at a time, so that no
/// list of them grows with the store.
pub struct Keys {
    prefix: String,
    page: std::vec::IntoIter<String>,
    /// The last key read; `None` before the first page.
    after: Option<String>,
    more: bool,
}

impl Keys {
    /// Keys per `kv.list-keys-after`: ~70 KB of keys in the plugin's memory.
    pub const PAGE: u32 = 1_000;

    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            page: Vec::new().into_iter(),
            after: None,
            more: true,
        }
    }

    /// The next key; a page sees the call's writes as they are when it is
    /// read.
    pub fn next(&mut self, host: &mut impl Host) -> Result<Option<String>, String> {
        loop {
            if let Some(key) = self.page.next() {
                return Ok(Some(key));
            }
            if !self.more {
                return Ok(None);
            }
            let page = host
                .kv_list_after(&self.prefix, self.after.as_deref(), Self::PAGE)
                .map_err(|e| format!("listing the kv records `{}…`: {e}", self.prefix))?;
            self.more = page.len() >= Self::PAGE as usize;
            if let Some(last) = page.last() {
                self.after = Some(last.clone());
            }
            // The caller cuts the prefix off each key: a host that answered
            // with another key must not make it panic.
            let prefix = self.prefix.as_str();
            self.page = page
                .into_iter()
                .filter(|key| key.starts_with(prefix))
                .collect::<Vec<_>>()
                .into_iter();
        }
    }
}
