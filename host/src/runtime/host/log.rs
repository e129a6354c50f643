//! `prismhook:plugin/log`.

use prismhook_core::text::one_line;

use crate::runtime::bindings::log::{Host, Level};
use crate::runtime::state::HostState;

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        // A plugin's line breaks must not make lines that look like the
        // host's; the budget pays for the line as the log shows it.
        let message = one_line(&message);
        match self.log_budget.take_line(message.len()) {
            Ok(()) => {}
            Err(true) => {
                tracing::warn!(
                    plugin = %self.plugin.name,
                    events = %self.context,
                    "log budget for this call used up; further plugin logs are dropped"
                );
                return Ok(());
            }
            Err(false) => return Ok(()),
        }
        let plugin = &self.plugin.name;
        let events = &self.context;
        // `tracing` levels are static, hence one macro call per level.
        match level {
            Level::Trace => {
                tracing::trace!(target: "prismhook::plugin", %plugin, %events, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "prismhook::plugin", %plugin, %events, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "prismhook::plugin", %plugin, %events, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "prismhook::plugin", %plugin, %events, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "prismhook::plugin", %plugin, %events, "{message}")
            }
        }
        Ok(())
    }
}
