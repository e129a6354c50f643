//! Loopback simulators of the systems prismhook talks to: Nutanix Prism (the
//! event source), PAN-OS, F5 BIG-IP and Cisco Secure Firewall Management
//! Center (the firewalls plugins drive), for tests and the demo; and real
//! `nats-server` nodes to run the JetStream ledger on (`nats`).

pub mod bigip;
mod fault;
pub mod fmc;
pub mod nats;
pub mod panos;
pub mod prism;
mod server;
