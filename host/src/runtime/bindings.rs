//! The host's only `bindgen!`: Rust types and traits for `wit/`.
//!
//! Everything else in the host uses these types; no other module reads the
//! WIT files.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: {
        // Outbound HTTP waits on the network, so it must not block the
        // executor thread the guest runs on.
        "prismhook:plugin/http.send": async | trappable,
        // A fed reconcile's next page may still be on its way from the source.
        "prismhook:plugin/inventory.next-page": async | trappable,
        // A transaction with an fsync: on the blocking pool.
        "prismhook:plugin/kv.commit": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});

pub use self::exports::prismhook::plugin::handler::{Event, Outcome, PluginInfo};
pub use self::prismhook::plugin::types::{Category, Nic, Retry, Vm};
pub use self::prismhook::plugin::{context, http, inventory, kv, log};

/// The WIT package this host implements, as components name it in their
/// imports and exports. Components built against an earlier `0.1.x` link
/// too: wasmtime resolves their imports and finds their exports by semver.
pub const PACKAGE: &str = "prismhook:plugin@0.1.4";

/// The paged reconcile a component of the world `paged-plugin` exports.
/// Optional, so it is looked up by name rather than bound above: a plugin
/// without it is handed its inventory in `handler.reconcile`.
pub const PAGED: &str = "prismhook:plugin/paged@0.1.4";

/// The WIT record of a VM the host decoded at ingest.
impl From<&crate::event::Vm> for Vm {
    fn from(vm: &crate::event::Vm) -> Vm {
        Vm {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
            power_state: vm.power_state.clone(),
            categories: vm
                .categories
                .iter()
                .map(|(key, value)| Category {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            nics: vm
                .nics
                .iter()
                .map(|n| Nic {
                    uuid: n.uuid.clone(),
                    mac_address: n.mac_address.clone(),
                    ips: n.ips.clone(),
                    subnet_name: n.subnet_name.clone(),
                    subnet_uuid: n.subnet_uuid.clone(),
                })
                .collect(),
            host_name: vm.host_name.clone(),
            entity_version: vm.entity_version.clone(),
        }
    }
}
