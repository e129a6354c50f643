//! prismhook: turns Nutanix Prism webhook events into actions on other
//! systems through sandboxed WebAssembly plugins.
//!
//! The event's path is one-way: [`listener`] → [`ledger`] → [`dispatch`] →
//! [`runtime`]. The Nutanix-specific code lives in [`nutanix`]; the ledger,
//! dispatcher and runtime know nothing of Prism. [`app`] assembles them;
//! [`reload`] is the only task that changes the plugin [`registry`].

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod ledger;
pub mod listener;
pub mod nutanix;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod scaffold;
pub mod secret;
