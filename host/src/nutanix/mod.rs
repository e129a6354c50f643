//! Everything prismhook knows about Nutanix Prism, kept apart from the
//! ledger, dispatcher and plugin runtime, which only see event types, entity
//! uuids and the host's own [`crate::event::Vm`].
//!
//! - [`payload`] reads notification bodies and VM intents leniently, because
//!   their shape varies across AOS releases and is barely documented.
//! - [`client`] is the Prism v3 REST client: webhooks and the VM inventory,
//!   with errors that name the cluster and TLS that is verified unless told
//!   otherwise.
//! - [`registrar`] keeps one webhook per cluster registered and reconciles
//!   the inventory, using the other two.
//! - [`source`] is Prism as the host's [`crate::source::EventSource`]: the
//!   callback route and the registrars.
//!
//! `payload` and `client` depend on nothing else in the crate but the event
//! model, so they can be built and tested on their own against
//! `prismhook_sim::prism`, which shares no code with them.

pub mod client;
pub use prismhook_core::nutanix::payload;
pub mod registrar;
pub mod source;

use anyhow::Context;

pub use client::{ClusterEndpoint, PrismClient, PrismError, TlsMode, Webhook, WebhookSpec};
pub use payload::{parse_notification, parse_vm, PayloadError};
pub use source::NutanixSource;

use crate::config::{ClusterConfig, Config};
use crate::secret::Secret;

/// The password Prism must present for `cluster`: from the config, or
/// generated once and kept (mode 0600) in the data directory, so restarts
/// do not force a webhook update.
pub fn webhook_password(config: &Config, cluster: &ClusterConfig) -> anyhow::Result<Secret> {
    if let Some(src) = &cluster.webhook_password {
        return src
            .resolve()
            .with_context(|| format!("cluster `{}`: webhook_password", cluster.name));
    }
    let dir = config.storage.data_dir.join("webhook-credentials");
    crate::secret::create_private_dir(&dir)?;
    let path = dir.join(&cluster.name);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if !existing.trim().is_empty() {
            return Ok(Secret::new(existing.trim().to_owned()));
        }
    }
    let generated = registrar::generate_password();
    crate::secret::write_private(&path, &generated)
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(cluster = %cluster.name, path = %path.display(), "generated webhook credentials");
    Ok(Secret::new(generated))
}
