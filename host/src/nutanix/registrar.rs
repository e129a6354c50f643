//! Keeps exactly one webhook per cluster registered for the union of the
//! loaded plugins' subscriptions, and reconciles plugins with the cluster's
//! inventory on a timer.
//!
//! One task per cluster owns both jobs, so a cluster that is down or refuses
//! our credentials only delays itself: it is reported, retried with backoff,
//! and never blocks another cluster.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use rand::Rng;
use tokio::sync::watch;

use super::client::{ClusterEndpoint, PrismClient, PrismError, TlsMode, Webhook, WebhookSpec};
use crate::clock::{doubled, now_ms};
use crate::config::{ClusterConfig, Config};
use crate::event::matches;
use crate::secret::{create_private_dir, write_private, BasicCredentials, Secret};
use crate::source::{EndpointStatus, Reconciled, SourceContext};

/// Event types Prism is known to send; subscriptions with patterns are
/// expanded against this list for the webhook's `events_filter_list`.
pub const KNOWN_EVENTS: &[&str] = &[
    "VM.CREATE",
    "VM.DELETE",
    "VM.UPDATE",
    "VM.ON",
    "VM.OFF",
    "VM.MIGRATE",
    "VM.NIC_PLUG",
    "VM.NIC_UNPLUG",
    "SUBNET.CREATE",
    "SUBNET.UPDATE",
    "SUBNET.DELETE",
];

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Longest wait before reconciling again after plugins failed: a plugin
/// that keeps failing must not have the whole inventory listed every
/// minute.
const PLUGIN_RETRY_MAX: Duration = Duration::from_secs(600);

/// The wait before the next try after `failures` failures in a row, at
/// most `max`.
fn backoff(failures: u32, max: Duration) -> Duration {
    doubled(BACKOFF_FIRST, failures, max)
}
/// Even with nothing changed, check the webhook this often: someone may
/// have deleted or edited it in Prism.
const RECHECK: Duration = Duration::from_secs(300);
/// Writes what `contents` makes (off the async threads: it may hash) to a
/// private file at `path`; a failure is logged, as the sync itself is done.
async fn record_private(
    path: &std::path::Path,
    what: &str,
    contents: impl FnOnce() -> anyhow::Result<String> + Send + 'static,
) {
    let target = path.to_owned();
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(dir) = target.parent() {
            create_private_dir(dir)?;
        }
        write_private(&target, &contents()?)?;
        Ok(())
    })
    .await;
    if let Ok(Err(e)) = written {
        tracing::warn!(path = %path.display(), "cannot record {what}: {e:#}");
    }
}

/// How long the first reconcile waits for the first registration attempt.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(60);
const WAIT_COMPLETE: Duration = Duration::from_secs(30);

/// The concrete event types to register for a set of subscriptions.
pub fn expand(subscriptions: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in subscriptions {
        if s.contains('*') {
            out.extend(
                KNOWN_EVENTS
                    .iter()
                    .filter(|e| matches(s, e))
                    .map(|e| e.to_string()),
            );
        } else {
            out.push(s.to_ascii_uppercase());
        }
    }
    out.sort();
    out.dedup();
    out
}

pub fn generate_password() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    hex::encode(bytes)
}

#[derive(Clone)]
pub struct Registrar {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    cluster: ClusterConfig,
    auth: BasicCredentials,
    client: PrismClient,
    ctx: SourceContext,
    status: Mutex<EndpointStatus>,
    stop: watch::Sender<bool>,
    reconcile_now: tokio::sync::Notify,
    /// Whether a reconcile has begun listing the cluster's VMs.
    listed: std::sync::atomic::AtomicBool,
    /// Set once the first registration attempt is over, either way.
    first_sync: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Registrar {
    pub fn start(
        config: Arc<Config>,
        cluster: ClusterConfig,
        auth: BasicCredentials,
        ctx: SourceContext,
    ) -> anyhow::Result<Registrar> {
        let client = client_for(&config, &cluster)?;
        let status = EndpointStatus {
            name: cluster.name.clone(),
            url: cluster.prism_url.to_string(),
            ..Default::default()
        };
        let r = Registrar {
            inner: Arc::new(Inner {
                config,
                cluster,
                auth,
                client,
                ctx,
                status: Mutex::new(status),
                stop: watch::channel(false).0,
                reconcile_now: tokio::sync::Notify::new(),
                listed: Default::default(),
                first_sync: watch::channel(false).0,
                tasks: Mutex::default(),
            }),
        };
        let tasks = vec![
            tokio::spawn(r.clone().run_registration()),
            tokio::spawn(r.clone().run_reconcile()),
        ];
        *r.inner.tasks.lock().expect("tasks lock") = tasks;
        Ok(r)
    }

    pub fn status(&self) -> EndpointStatus {
        self.inner.status.lock().expect("status lock").clone()
    }

    pub fn name(&self) -> &str {
        &self.inner.cluster.name
    }

    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    /// Waits for the registration and reconcile tasks to end after
    /// [`Registrar::stop`].
    pub async fn join(&self) {
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn reconcile_now(&self) {
        self.inner.reconcile_now.notify_one();
    }

    fn webhook_name(&self) -> String {
        webhook_name(&self.inner.config, &self.inner.cluster.name)
    }

    async fn run_registration(self) {
        // Fires only when the union of subscriptions changes, so quarantines
        // and compiler-tier swaps cost Prism nothing.
        let mut changes = self.inner.ctx.subscriptions.clone();
        let mut stop = self.inner.stop.subscribe();
        let mut failures = 0;
        loop {
            let synced = self.sync().await;
            self.inner.first_sync.send_replace(true);
            let wait = match synced {
                Ok(()) => {
                    failures = 0;
                    RECHECK
                }
                Err(e) => {
                    let wait = backoff(failures, BACKOFF_MAX);
                    failures += 1;
                    tracing::error!(cluster = %self.inner.cluster.name, "webhook registration failed (retrying in {wait:?}): {e:#}");
                    self.inner.status.lock().expect("status lock").last_error =
                        Some(format!("{e:#}"));
                    wait
                }
            };
            let plugins_changed = tokio::select! {
                r = changes.changed() => r.is_ok(),
                _ = tokio::time::sleep(wait) => false,
                _ = stop.wait_for(|s| *s) => return,
            };
            if plugins_changed {
                // Plugins change in bursts (a reload touches several); let
                // the burst settle before telling Prism.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Makes Prism hold exactly one webhook of ours, with the right URL,
    /// events and credentials; removes our duplicates; leaves others alone.
    pub async fn sync(&self) -> anyhow::Result<()> {
        let subscriptions = self.inner.ctx.subscriptions.borrow().clone();
        let target = SyncTarget {
            client: &self.inner.client,
            cluster: &self.inner.cluster.name,
            name: self.webhook_name(),
            description: format!(
                "prismhook instance `{}`: managed, do not edit",
                self.inner.config.instance
            ),
            post_url: self.inner.config.callback_url(&self.inner.cluster.name),
            events: expand(&subscriptions.union),
            widen_only: subscriptions.incomplete,
            auth: &self.inner.auth,
            fingerprint_path: fingerprint_path(&self.inner.config, &self.inner.cluster.name),
            uuid_path: webhook_uuid_path(&self.inner.config, &self.inner.cluster.name),
        };
        let keeper = sync_webhook(&target).await?;
        let mut s = self.inner.status.lock().expect("status lock");
        let gained = keeper.is_some()
            && (!s.registered
                || target
                    .events
                    .iter()
                    .any(|e| !s.registered_events.contains(e)));
        s.registered = keeper.is_some();
        s.registration = keeper;
        s.registered_events = target.events;
        s.last_error = None;
        s.last_sync_ms = Some(now_ms());
        drop(s);
        // What changed in the cluster between a listing and this moment
        // came as no event (the webhook was not there yet, or did not ask
        // for it): the reconcile that listed it before is made again.
        if gained && self.inner.listed.load(std::sync::atomic::Ordering::Acquire) {
            tracing::info!(cluster = %self.inner.cluster.name, "the webhook now sends what it did not when the cluster was listed: reconciling again");
            self.inner.reconcile_now.notify_one();
        }
        Ok(())
    }

    /// Removes this host's webhooks from the cluster.
    pub async fn deregister(&self) -> anyhow::Result<usize> {
        let post_url = self.inner.config.callback_url(&self.inner.cluster.name);
        let recorded = recorded_uuid(&webhook_uuid_path(
            &self.inner.config,
            &self.inner.cluster.name,
        ));
        let mut n = 0;
        for h in self.inner.client.list_webhooks().await? {
            if is_ours(&h, &post_url, recorded.as_deref()) {
                self.inner.client.delete_webhook(&h.uuid).await?;
                n += 1;
            }
        }
        tracing::info!(cluster = %self.inner.cluster.name, removed = n, "webhooks deregistered");
        Ok(n)
    }

    async fn run_reconcile(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut leadership = self.inner.ctx.leadership.clone();
        let interval = self.inner.cluster.reconcile_interval;
        let mut failures = 0u32;
        // The first listing waits for the webhook: a VM changed between a
        // listing and the webhook's arrival would be in neither until the
        // next reconcile (never, with `reconcile_interval = 0`). A
        // registration that keeps failing holds it up for a minute at most.
        let mut first_sync = self.inner.first_sync.subscribe();
        tokio::select! {
            _ = first_sync.wait_for(|done| *done) => {}
            _ = tokio::time::sleep(FIRST_SYNC_WAIT) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        loop {
            // Hosts sharing a ledger reconcile on the leader only; a host that becomes the
            // leader reconciles at once, as the one before it may have died midway.
            if !*leadership.borrow_and_update() {
                tracing::info!(cluster = %self.inner.cluster.name, "not the leader; the leader reconciles");
                tokio::select! {
                    _ = until_leading(&mut leadership, true) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            let wait = match self.reconcile().await {
                // A plugin that failed (its firewall down, say) is tried
                // again soon, not an interval later: with every plugin, as
                // reconcile is idempotent.
                Ok(done) if done.failed > 0 => {
                    failures += 1;
                    tracing::warn!(cluster = %self.inner.cluster.name, failed = done.failed, "reconcile failed for some plugins; trying again with backoff");
                    let max = if interval.is_zero() {
                        PLUGIN_RETRY_MAX
                    } else {
                        interval.min(PLUGIN_RETRY_MAX)
                    };
                    backoff(failures, max)
                }
                Ok(_) => {
                    failures = 0;
                    if interval.is_zero() {
                        Duration::MAX
                    } else {
                        interval
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(cluster = %self.inner.cluster.name, "reconcile failed: {e:#}");
                    backoff(failures, BACKOFF_MAX)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.min(Duration::from_secs(86400 * 365))) => {}
                _ = self.inner.reconcile_now.notified() => {}
                _ = until_leading(&mut leadership, false) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Lists the cluster's VMs and hands the inventory to every plugin that
    /// keeps state about VMs; returns what each plugin made of it.
    pub async fn reconcile(&self) -> anyhow::Result<Reconciled> {
        let cluster = &self.inner.cluster.name;
        tracing::info!(%cluster, "reconciling");
        self.inner
            .listed
            .store(true, std::sync::atomic::Ordering::Release);
        let listing = self
            .inner
            .client
            .vm_pages()
            .map_err(anyhow::Error::from)
            .boxed();
        let done = self.inner.ctx.inventory.reconcile(cluster, listing).await?;
        let mut s = self.inner.status.lock().expect("status lock");
        s.last_reconcile_ms = Some(now_ms());
        s.last_reconcile = done.lines.clone();
        Ok(done)
    }
}

/// Returns once this host's leadership is `leads`; never, if it can no longer change (a host
/// alone leads for good).
async fn until_leading(leadership: &mut watch::Receiver<bool>, leads: bool) {
    if leadership.wait_for(|l| *l == leads).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Everything one webhook sync needs; shared by the registrar and the
/// `prismhook webhooks sync` command.
pub struct SyncTarget<'a> {
    pub client: &'a PrismClient,
    pub cluster: &'a str,
    pub name: String,
    pub description: String,
    pub post_url: String,
    pub events: Vec<String>,
    /// `events` may lack a plugin's (one that failed to load): the
    /// webhook's events are added to, never taken from, as a webhook
    /// without them would stop Prism sending what the ledger keeps for
    /// that plugin's replay once it loads.
    pub widen_only: bool,
    pub auth: &'a BasicCredentials,
    /// Where the fingerprint of the registered credentials is kept.
    pub fingerprint_path: std::path::PathBuf,
    /// Where the uuid of the webhook this host keeps is recorded.
    pub uuid_path: std::path::PathBuf,
}

/// Whether a webhook Prism lists is this host's: the one at its URL, or the
/// one it recorded keeping (found so when its URL has changed). A name alone
/// proves nothing: two deployments left with the default `instance` name
/// their webhooks alike, and each would take the other's over or delete it.
pub fn is_ours(hook: &Webhook, post_url: &str, recorded_uuid: Option<&str>) -> bool {
    hook.post_url == post_url || recorded_uuid == Some(hook.uuid.as_str())
}

/// The uuid recorded at `path`, if any.
pub fn recorded_uuid(path: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Makes Prism hold exactly one webhook of ours (found by URL, or by the uuid recorded) with
/// the right URL, events and credentials: creates it if missing, updates it
/// if it differs, removes our duplicates, never touches others'. With no
/// events it changes nothing (see below). Returns the uuid kept.
///
/// A webhook already at our URL is kept under whatever name it has: hosts
/// that share one URL behind a load balancer (each with its own `instance`)
/// all find the same webhooks by URL and keep the same one, the lowest
/// uuid, so the service has one webhook and the hosts never rename it back
/// and forth. The uuid recorded finds our webhook when our URL has changed;
/// one only named like ours is another deployment's, left alone.
pub async fn sync_webhook(t: &SyncTarget<'_>) -> anyhow::Result<Option<String>> {
    let c = t.client;
    c.auth_check().await?;
    let hooks = c.list_webhooks().await?;
    let recorded_uuid = recorded_uuid(&t.uuid_path);
    let (mut mine, named_alike): (Vec<Webhook>, Vec<Webhook>) = hooks
        .into_iter()
        .filter(|h| h.name == t.name || h.post_url == t.post_url)
        .partition(|h| is_ours(h, &t.post_url, recorded_uuid.as_deref()));
    for h in &named_alike {
        tracing::warn!(
            cluster = %t.cluster, uuid = %h.uuid, post_url = %h.post_url,
            "a webhook named `{}` as this host's, at another URL, is not the one this host \
             registered: left alone (give each prismhook deployment its own `instance`)",
            h.name
        );
    }
    // Keep the one that already fits best, so a restart changes nothing.
    mine.sort_by_key(|h| (h.post_url != t.post_url, h.uuid.clone()));
    let spec = WebhookSpec {
        name: t.name.clone(),
        description: t.description.clone(),
        post_url: t.post_url.clone(),
        events: t.events.clone(),
        credentials: Some((t.auth.user.clone(), t.auth.password.expose().to_owned())),
    };
    // Prism never returns the password, so a fingerprint of the registered
    // credentials tells whether they changed.
    let recorded = std::fs::read_to_string(&t.fingerprint_path)
        .ok()
        .map(|s| s.trim().to_owned());
    let unchanged_credentials = {
        let (auth, recorded) = (t.auth.clone(), recorded.clone());
        tokio::task::spawn_blocking(move || {
            recorded.is_some_and(|r| Fingerprint::matches(&r, &auth))
        })
        .await
        .unwrap_or(false)
    };
    let cluster = t.cluster;
    if t.events.is_empty() {
        // No plugin loaded (yet): one whose init failed is tried again, and
        // a host behind a shared URL may be the only one without plugins.
        // Removing the webhook would lose what Prism sends meanwhile, which
        // the ledger otherwise keeps for replay; a webhook is removed only
        // on request (`deregister`).
        if let Some(kept) = mine.first() {
            tracing::info!(%cluster, uuid = %kept.uuid, "no plugin subscribes to anything: the webhook is left as it is");
        }
        return Ok(mine.first().map(|h| h.uuid.clone()));
    }
    let keeper = match mine.first() {
        Some(first) => {
            let mut current = first.events.clone();
            current.sort();
            let mut events = t.events.clone();
            if t.widen_only && !current.iter().all(|e| events.contains(e)) {
                tracing::info!(%cluster, "a plugin failed to load: the webhook keeps the events it has, which may be that plugin's");
                events.extend(current.iter().cloned());
                events.sort();
                events.dedup();
            }
            // An intent Prism could not apply shows the spec it was asked
            // for, not what it does: it is asked again.
            let differs = first.post_url != t.post_url
                || first.state == "ERROR"
                || current != events
                || first.username.as_deref().is_some_and(|u| u != t.auth.user)
                || !unchanged_credentials;
            if differs {
                let spec = WebhookSpec {
                    // Another host of the same service may have named it.
                    name: if first.post_url == t.post_url {
                        first.name.clone()
                    } else {
                        spec.name.clone()
                    },
                    events: events.clone(),
                    ..spec.clone()
                };
                match c
                    .update_webhook(&first.uuid, first.spec_version, &spec)
                    .await
                {
                    // Updated since it was listed (another host of the
                    // service, say): read again, and asked once more.
                    Err(e) if e.is_conflict() => {
                        let now = c.get_webhook(&first.uuid).await?;
                        c.update_webhook(&first.uuid, now.spec_version, &spec)
                            .await?;
                    }
                    updated => updated?,
                }
                c.wait_complete(&first.uuid, WAIT_COMPLETE).await?;
                tracing::info!(%cluster, uuid = %first.uuid, events = events.len(), "webhook updated");
            }
            for extra in &mine[1..] {
                remove_duplicate(c, cluster, &extra.uuid).await?;
            }
            first.uuid.clone()
        }
        None => {
            let uuid = c.create_webhook(&spec).await?;
            tracing::info!(%cluster, %uuid, post_url = %t.post_url, events = t.events.len(), "webhook created");
            // Hosts behind one URL that start together each create one:
            // all keep the lowest uuid at the URL, so the last to create
            // sees every one and leaves a single webhook.
            let mut twins: Vec<String> = c
                .list_webhooks()
                .await?
                .into_iter()
                .filter(|h| h.post_url == t.post_url)
                .map(|h| h.uuid)
                .collect();
            twins.sort();
            let keeper = twins.first().cloned().unwrap_or(uuid);
            for twin in twins.iter().skip(1) {
                remove_duplicate(c, cluster, twin).await?;
            }
            c.wait_complete(&keeper, WAIT_COMPLETE).await?;
            keeper
        }
    };
    if recorded_uuid.as_deref() != Some(keeper.as_str()) {
        let uuid = keeper.clone();
        record_private(&t.uuid_path, "the webhook's uuid", move || Ok(uuid)).await;
    }
    if !unchanged_credentials {
        let auth = t.auth.clone();
        record_private(
            &t.fingerprint_path,
            "webhook credentials fingerprint",
            move || Fingerprint::of(&auth),
        )
        .await;
    }
    Ok(Some(keeper))
}

/// Deletes a duplicate of our webhook; one that another host sharing our
/// URL deleted first is gone all the same.
async fn remove_duplicate(c: &PrismClient, cluster: &str, uuid: &str) -> anyhow::Result<()> {
    match c.delete_webhook(uuid).await {
        Ok(()) => {
            tracing::info!(%cluster, %uuid, "duplicate webhook of ours removed");
            Ok(())
        }
        Err(PrismError::Api { status: 404, .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A salted, deliberately slow hash (Argon2id, as a PHC string) of the
/// credentials registered with a webhook: it can tell that they changed,
/// and a copy of the data directory does not hand out a cheap way to guess
/// the password.
struct Fingerprint;

impl Fingerprint {
    fn material(auth: &BasicCredentials) -> Vec<u8> {
        let mut m = auth.user.as_bytes().to_vec();
        m.push(0);
        m.extend_from_slice(auth.password.expose().as_bytes());
        m
    }

    fn of(auth: &BasicCredentials) -> anyhow::Result<String> {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt: [u8; 16] = rand::rng().random();
        let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        let hash = argon2::Argon2::default()
            .hash_password(&Self::material(auth), &salt)
            .map_err(|e| anyhow::anyhow!("hashing the webhook credentials: {e}"))?;
        Ok(hash.to_string())
    }

    /// False for anything but a fingerprint of exactly these credentials
    /// (including fingerprints in an older format: they are rewritten).
    fn matches(recorded: &str, auth: &BasicCredentials) -> bool {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(recorded).is_ok_and(|hash| {
            argon2::Argon2::default()
                .verify_password(&Self::material(auth), &hash)
                .is_ok()
        })
    }
}

pub fn fingerprint_path(config: &Config, cluster: &str) -> std::path::PathBuf {
    config
        .storage
        .data_dir
        .join("webhook-credentials")
        .join(format!("{cluster}.registered"))
}

/// Where the uuid of the webhook this host keeps for `cluster` is recorded.
pub fn webhook_uuid_path(config: &Config, cluster: &str) -> std::path::PathBuf {
    fingerprint_path(config, cluster).with_extension("uuid")
}

pub fn webhook_name(config: &Config, cluster: &str) -> String {
    format!("{}-{}", config.instance, cluster)
}

pub fn client_for(config: &Config, cluster: &ClusterConfig) -> anyhow::Result<PrismClient> {
    let password = cluster
        .password
        .resolve()
        .map_err(|e| anyhow::anyhow!("cluster `{}`: password: {e}", cluster.name))?;
    client_with(config, cluster, &password)
}

/// [`client_for`] with the cluster's password already read.
pub fn client_with(
    config: &Config,
    cluster: &ClusterConfig,
    password: &Secret,
) -> anyhow::Result<PrismClient> {
    let tls = if cluster.tls.insecure {
        tracing::warn!(cluster = %cluster.name, "TLS verification towards Prism is OFF (`tls.insecure`); use `ca_file` or `pinned_cert` outside a lab");
        TlsMode::Insecure
    } else if let Some(ca) = &cluster.tls.ca_file {
        TlsMode::CaFile(ca.clone())
    } else if let Some(pin) = &cluster.tls.pinned_cert {
        TlsMode::PinnedCert(pin.clone())
    } else {
        TlsMode::System
    };
    Ok(PrismClient::new(ClusterEndpoint {
        name: cluster.name.clone(),
        base_url: cluster.prism_url.to_string(),
        username: cluster.username.clone(),
        password: password.expose().to_owned(),
        tls,
        proxy_from_env: config.proxy_from_env,
    })?)
}
