//! Per-plugin limits, with every default written once.

use std::time::Duration;

use serde::Deserialize;

/// What one plugin may use in one call. Each field can be overridden per
/// plugin; unset fields fall back to [`Limits::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory a plugin instance may grow to, over all its memories.
    pub memory_bytes: usize,
    /// Wall-clock time one `init` + `handle` (or `reconcile`) may take.
    pub deadline: Duration,
    /// Outbound HTTP requests one call may make.
    pub max_requests_per_call: u32,
    /// Largest HTTP response body handed to the plugin.
    pub max_response_bytes: u64,
    /// Log output (`log` import plus stdout/stderr) kept per call; the rest
    /// is dropped so a chatty plugin cannot flood the host log.
    pub max_log_bytes: usize,
    /// What the plugin's kv may hold, keys and values, over all calls: it
    /// shares the disk (or the JetStream servers) with the ledger.
    pub kv_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_secs(5),
            // One per event of a full batch: a plugin that talks to its
            // system per VM (the F5 plugin) must not fail a batch of
            // `delivery.batch_max` events, and reconcile reads a large
            // firewall table page by page.
            max_requests_per_call: 256,
            max_response_bytes: 8 << 20,
            max_log_bytes: 64 << 10,
            // Some 200 bytes a VM for the firewall plugins: room for a
            // million VMs, not for a plugin that never deletes.
            kv_bytes: 1 << 30,
        }
    }
}

/// The operator's overrides, as written in the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub memory_mib: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub max_requests_per_call: Option<u32>,
    pub max_response_bytes: Option<u64>,
    pub max_log_bytes: Option<usize>,
    pub kv_mib: Option<u64>,
}

impl Limits {
    /// Applies `overrides` on top of `self`.
    pub fn with(self, overrides: &LimitOverrides) -> Limits {
        Limits {
            memory_bytes: overrides.memory_mib.map_or(self.memory_bytes, |mib| {
                usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
            }),
            deadline: overrides
                .deadline_ms
                .map_or(self.deadline, Duration::from_millis),
            max_requests_per_call: overrides
                .max_requests_per_call
                .unwrap_or(self.max_requests_per_call),
            max_response_bytes: overrides
                .max_response_bytes
                .unwrap_or(self.max_response_bytes),
            max_log_bytes: overrides.max_log_bytes.unwrap_or(self.max_log_bytes),
            kv_bytes: overrides
                .kv_mib
                .map_or(self.kv_bytes, |mib| mib.saturating_mul(1 << 20)),
        }
    }

    /// The first limit of `self` above `ceiling`: its name as the config
    /// spells it, and both values in its units.
    pub fn first_above(&self, ceiling: &Limits) -> Option<(&'static str, u128, u128)> {
        let mib = |bytes: u64| u128::from(bytes) >> 20;
        [
            (
                "memory_mib",
                mib(self.memory_bytes as u64),
                mib(ceiling.memory_bytes as u64),
            ),
            (
                "deadline_ms",
                self.deadline.as_millis(),
                ceiling.deadline.as_millis(),
            ),
            (
                "max_requests_per_call",
                self.max_requests_per_call.into(),
                ceiling.max_requests_per_call.into(),
            ),
            (
                "max_response_bytes",
                self.max_response_bytes.into(),
                ceiling.max_response_bytes.into(),
            ),
            (
                "max_log_bytes",
                self.max_log_bytes as u128,
                ceiling.max_log_bytes as u128,
            ),
            ("kv_mib", mib(self.kv_bytes), mib(ceiling.kv_bytes)),
        ]
        .into_iter()
        .find(|(_, wanted, allowed)| wanted > allowed)
    }
}

impl LimitOverrides {
    /// `self`, with what `over` sets put over it.
    pub fn overlaid_with(&self, over: &LimitOverrides) -> LimitOverrides {
        LimitOverrides {
            memory_mib: over.memory_mib.or(self.memory_mib),
            deadline_ms: over.deadline_ms.or(self.deadline_ms),
            max_requests_per_call: over.max_requests_per_call.or(self.max_requests_per_call),
            max_response_bytes: over.max_response_bytes.or(self.max_response_bytes),
            max_log_bytes: over.max_log_bytes.or(self.max_log_bytes),
            kv_mib: over.kv_mib.or(self.kv_mib),
        }
    }
}
