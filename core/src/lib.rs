//! prismhook's model of an event and of its own configuration, and every
//! parser of what the host reads from outside: Prism's notifications and
//! answers, the configuration file, origin rules. Nothing here does network
//! I/O or runs plugins, so each parser can be fuzzed on its own
//! (`core/fuzz`) and the host (`prismhook`) builds on top of it.

pub mod config;
pub mod event;
pub mod limits;
pub mod nutanix;
pub mod policy;
pub mod secret;
pub mod text;
