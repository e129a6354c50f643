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

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "simulators")]
pub mod demo;
pub mod dispatch;
pub mod event;
pub mod ledger;
pub mod listener;
pub mod nutanix;
pub mod outbound;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod scaffold;
pub mod secret;
pub mod serve;
pub mod source;
pub mod telemetry;
