pub mod bigip;
pub mod panos;
pub mod prism;
mod server;
