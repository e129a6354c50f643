//! What the firewall and load-balancer simulators share: faults injected
//! into their API's requests, and the log of recent requests a test reads
//! back. The JSON APIs (BIG-IP, FMC) share one [`RequestRecord`]; the
//! PAN-OS simulator records its XML API's parameters instead, and keeps
//! its own faults, as it never sends `Retry-After`.

use std::collections::VecDeque;
use std::time::Duration;

use axum::http::{Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How many requests a simulator's `/_sim/requests` can look back on.
const REQUEST_LOG_CAPACITY: usize = 1000;

/// Faults injected into the API's requests; `/_sim/` stays healthy so a
/// test can always switch them off again.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Delay before every API answer (or drop).
    pub latency_ms: u64,
    /// Answer every API request with this HTTP status and an error body.
    pub fail_status: Option<u16>,
    /// If above zero, only the next N API requests fail (with
    /// `fail_status`, or 500), after which the simulator behaves again and
    /// `fail_status` is cleared.
    pub fail_next: u32,
    /// Sent as `Retry-After` (seconds) with injected failures.
    pub retry_after_secs: Option<u64>,
    /// Close each API request's TCP connection without answering.
    pub drop_connections: bool,
    /// If above zero, the next N API requests are answered as if there
    /// were no faults, and the faults apply after them: a system that fails
    /// partway through a long run of requests.
    pub pass_first: u32,
}

/// What an injected fault does to one request.
pub(crate) enum FaultAction {
    Drop,
    /// Answer with this status, and `Retry-After` when set.
    Fail(u16, Option<u64>),
}

impl Faults {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self.fail_status {
            Some(code) if StatusCode::from_u16(code).is_err() => {
                Err(format!("fail_status {code} is not an HTTP status code"))
            }
            _ => Ok(()),
        }
    }

    /// Decides this request's fault, consuming one of `pass_first` or
    /// `fail_next`.
    pub(crate) fn take(&mut self) -> (Duration, Option<FaultAction>) {
        let latency = Duration::from_millis(self.latency_ms);
        if self.pass_first > 0 {
            self.pass_first -= 1;
            return (latency, None);
        }
        let retry_after = self.retry_after_secs;
        let action = if self.drop_connections {
            Some(FaultAction::Drop)
        } else if self.fail_next > 0 {
            self.fail_next -= 1;
            let status = self.fail_status.unwrap_or(500);
            if self.fail_next == 0 {
                self.fail_status = None;
            }
            Some(FaultAction::Fail(status, retry_after))
        } else {
            self.fail_status
                .map(|status| FaultAction::Fail(status, retry_after))
        };
        (latency, action)
    }
}

/// One request to a JSON API as `GET /_sim/requests` reports it (no
/// headers, so no credentials or tokens).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// The JSON body (or its text, when it is not JSON), when there was
    /// one and it may be shown.
    pub body: Option<Value>,
    /// HTTP status answered; `None` when the connection was dropped.
    pub status_code: Option<u16>,
}

impl RequestRecord {
    /// A record of a request not answered yet; `keep_body` false leaves a
    /// body out (a sign-in's holds a password).
    pub(crate) fn new(method: &Method, uri: &Uri, body: &[u8], keep_body: bool) -> RequestRecord {
        RequestRecord {
            method: method.to_string(),
            path: uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| uri.path().to_owned()),
            body: (keep_body && !body.is_empty()).then(|| {
                serde_json::from_slice(body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
            }),
            status_code: None,
        }
    }
}

/// The last [`REQUEST_LOG_CAPACITY`] requests, oldest first.
pub(crate) struct RequestLog<T>(VecDeque<T>);

impl<T> Default for RequestLog<T> {
    fn default() -> Self {
        RequestLog(VecDeque::new())
    }
}

impl<T: Clone> RequestLog<T> {
    pub(crate) fn record(&mut self, record: T) {
        if self.0.len() == REQUEST_LOG_CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(record);
    }

    /// The last `n`, oldest first.
    pub(crate) fn recent(&self, n: usize) -> Vec<T> {
        let skip = self.0.len().saturating_sub(n);
        self.0.iter().skip(skip).cloned().collect()
    }
}
