//! prismhook: turns Nutanix Prism webhook events into actions on other
//! systems through sandboxed WebAssembly plugins.
//!
//! The event's path is one-way: a [`source`] (Nutanix Prism, in
//! [`nutanix`]) decodes each notification into the host's [`event`] model;
//! the [`listener`] stores it in the [`ledger`] before it answers; the
//! [`dispatch`]er hands it to plugins in the [`runtime`]. The ledger,
//! dispatcher and runtime know nothing of Prism. [`app`] assembles them;
//! [`reload`] is the only task that changes the plugin [`registry`].
//! `cargo xtask layers` checks that no module imports another that imports
//! it back.
//!
//! The event model, the configuration and every parser of outside input
//! live in `prismhook-core` (no I/O, no runtime, fuzzed on its own); they
//! are re-exported here under the names the host has always used.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
#[cfg(feature = "simulators")]
pub mod demo;
pub mod dispatch;
pub mod failure;
pub mod ledger;
pub mod listener;
pub mod nutanix;
pub mod outbound;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod scaffold;
pub mod serve;
pub mod source;
#[cfg(unix)]
pub mod systemd;
pub mod telemetry;

pub use prismhook_core::{config, event, secret};
