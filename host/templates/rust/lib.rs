//! `{{name}}`: a prismhook plugin.
//!
//! The host makes every call on a fresh instance: `init` with the
//! operator's configuration, then exactly one `handle` or `reconcile`
//! (`paged::Guest::reconcile`, or `Guest::reconcile` on hosts before
//! 0.1.2).
//! Globals do not survive between calls; what must be remembered goes into
//! `kv`, whose writes become durable together when the call returns.

wit_bindgen::generate!({ path: "wit", world: "paged-plugin" });

use exports::prismhook::plugin::handler::{Event, Guest, Outcome, PluginInfo, Vm};
use exports::prismhook::plugin::paged;
use prismhook::plugin::inventory;
use prismhook::plugin::kv;
use prismhook::plugin::log::{log, Level};
use prismhook::plugin::types::Retry;

const NAME: &str = "{{name}}";

struct Plugin;

impl Guest for Plugin {
    /// `config` is the operator's settings for this plugin as a JSON object
    /// (`{}` when there are none). An `Err` keeps the plugin from loading.
    fn init(config: String) -> Result<PluginInfo, String> {
        if !config.trim_start().starts_with('{') {
            return Err(format!(
                "{NAME}: the configuration must be a JSON object, not {config:?}"
            ));
        }
        Ok(PluginInfo {
            name: NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            subscriptions: vec!["VM.*".to_owned()],
        })
    }

    /// One outcome per event, in order. Delivery is at least once: the same
    /// event (same `id`) may come again, so side effects must be idempotent.
    fn handle(events: Vec<Event>) -> Vec<Outcome> {
        events.iter().map(handle_one).collect()
    }

    /// The whole VM inventory in one list, for hosts before 0.1.2. The
    /// world requires it, but no host that can load this plugin calls it:
    /// it imports `inventory` (0.1.2), and such hosts call the paged
    /// reconcile below.
    fn reconcile(cluster: String, vms: Vec<Vm>) -> Result<String, String> {
        Ok(format!(
            "{} VMs in {cluster}: nothing to reconcile",
            vms.len()
        ))
    }
}

impl paged::Guest for Plugin {
    /// The VM inventory of a cluster, at start and on a timer, a page at a
    /// time (so that neither this plugin's memory nor the host's grows
    /// with it): bring outside state back in step with it here.
    fn reconcile(cluster: String) -> Result<String, String> {
        let mut vms = 0;
        while let Some(page) = inventory::next_page() {
            vms += page.len();
        }
        Ok(format!(
            "{vms} VMs in {cluster}, read a page at a time: nothing to reconcile"
        ))
    }
}

fn handle_one(event: &Event) -> Outcome {
    log(
        Level::Info,
        &format!(
            "{} {} {} (event {}, attempt {})",
            event.cluster, event.event_type, event.entity_uuid, event.id, event.attempt
        ),
    );
    // Something to see from outside: the id of the last event handled.
    if let Err(e) = kv::set("last-event", event.id.as_bytes()) {
        return Outcome::Retry(Retry {
            reason: format!("kv: {e}"),
            delay_ms: None,
        });
    }
    Outcome::Done
}

export!(Plugin);
