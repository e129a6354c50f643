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
        default: trappable,
    },
    exports: { default: async },
});

pub use self::exports::prismhook::plugin::handler::{Event, Outcome, PluginInfo};
pub use self::prismhook::plugin::types::{Category, Nic, Retry, Vm};
pub use self::prismhook::plugin::{http, kv, log};

/// The WIT package this host implements, as components name it in their
/// imports and exports.
pub const PACKAGE: &str = "prismhook:plugin@0.1.0";
