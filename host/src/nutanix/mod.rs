//! Everything prismhook knows about Nutanix Prism, kept apart from the
//! ledger, dispatcher and plugin runtime, which only see event types, entity
//! uuids and the parsed [`Vm`].
//!
//! - [`payload`] reads notification bodies and VM intents leniently, because
//!   their shape varies across AOS releases and is barely documented.
//! - [`client`] is the Prism v3 REST client: webhooks and the VM inventory,
//!   with errors that name the cluster and TLS that is verified unless told
//!   otherwise.
//! - [`registrar`] keeps one webhook per cluster registered and reconciles
//!   the inventory, using the other two.
//!
//! `payload` and `client` depend on nothing else in the crate, so they can be
//! built and tested on their own against `prismhook_sim::prism`, which
//! shares no code with them.

pub mod client;
pub mod payload;
pub mod registrar;

pub use client::{ClusterEndpoint, PrismClient, PrismError, TlsMode, Webhook, WebhookSpec};
pub use payload::{parse_notification, parse_vm, Nic, Notification, PayloadError, Vm};
