//! A plugin built against `prismhook:plugin@0.1.0` exactly as released: its
//! `wit/` is a frozen copy, never updated. The host's contract grows by
//! compatible additions (`0.1.1` added `context`); this guest proves that
//! what was built before an addition still loads, runs and uses every
//! import it had.
//!
//! It records each event as `seen/<uuid>` = `<event-type>` in `kv`, logs
//! it, and answers done.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use exports::prismhook::plugin::handler::{Event, Guest, Outcome, PluginInfo, Vm};
use prismhook::plugin::{kv, log};

struct Legacy;

impl Guest for Legacy {
    fn init(_config: String) -> Result<PluginInfo, String> {
        Ok(PluginInfo {
            name: "legacy".into(),
            version: "0.1.0".into(),
            subscriptions: vec!["*".into()],
        })
    }

    fn handle(events: Vec<Event>) -> Vec<Outcome> {
        events
            .iter()
            .map(|event| {
                let key = format!("seen/{}", event.entity_uuid);
                match kv::set(&key, event.event_type.as_bytes()) {
                    Ok(()) => {
                        log::log(log::Level::Info, &format!("legacy handled {}", event.id));
                        Outcome::Done
                    }
                    Err(e) => Outcome::Retry(prismhook::plugin::types::Retry {
                        reason: e,
                        delay_ms: None,
                    }),
                }
            })
            .collect()
    }

    fn reconcile(_cluster: String, vms: Vec<Vm>) -> Result<String, String> {
        Ok(format!("{} vms", vms.len()))
    }
}

export!(Legacy);
