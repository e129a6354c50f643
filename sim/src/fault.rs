//! What the firewall and load-balancer simulators share: faults injected
//! into their API's requests, and the log of recent requests a test reads
//! back. Each simulator keeps its own `RequestRecord` (what is worth
//! recording differs by API); the PAN-OS simulator keeps its own faults
//! too, as it never sends `Retry-After`.

use std::collections::VecDeque;
use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

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

    /// Decides this request's fault, consuming one of `fail_next`.
    pub(crate) fn take(&mut self) -> (Duration, Option<FaultAction>) {
        let latency = Duration::from_millis(self.latency_ms);
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
