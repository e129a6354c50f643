//! Host implementations of the plugin imports: one file per WIT interface.

mod context;
mod http;
mod inventory;
mod kv;
mod log;

/// `types` declares records only; the linker still wants its (empty) host
/// trait.
impl crate::runtime::bindings::prismhook::plugin::types::Host for crate::runtime::state::HostState {}
