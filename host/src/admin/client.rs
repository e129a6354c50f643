//! The CLI side of the admin API: `prismhook plugins`, `dlq`, `replay` and
//! `reconcile` act on the running host through its admin listener, found
//! (with its token) in the same configuration file the host was started
//! with.
//!
//! Going through the running host rather than opening the ledger file is
//! what makes these commands safe while it runs: the ledger file is locked
//! by its process, and a replay must wake the host's dispatcher anyway.
//!
//! Each command is a data call on [`AdminClient`] and a pure `render_*`
//! function, so the tables are tested without a terminal.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{
    ClusterReport, Count, DeadLetters, DlqQuery, DlqSelection, PluginReport, ReconcileRequest,
    ReconcileResult, ReplayRequest,
};
use crate::clock::now_ms;
use crate::config::Config;
use crate::ledger::Membership;
use crate::secret::Secret;

/// Reads answer at once; reconcile and reload wait for the work itself.
const QUICK: Duration = Duration::from_secs(30);
const SLOW: Duration = Duration::from_secs(600);

/// A connection to one host's admin API.
pub struct AdminClient {
    base: String,
    token: Option<Secret>,
    http: reqwest::Client,
}

impl AdminClient {
    /// The admin API of the host started with `config`: `[admin] listen`
    /// (on loopback when bound to all addresses) and `[admin] token`.
    pub fn from_config(config: &Config) -> anyhow::Result<AdminClient> {
        let token =
            match &config.admin.token {
                Some(source) => Some(source.resolve().with_context(|| {
                    format!("{}: reading `admin.token`", config.source.display())
                })?),
                None => None,
            };
        let addr = super::reachable_addr(config.admin.listen);
        match &config.admin.tls {
            Some(tls) => AdminClient::over_tls(addr, token, &tls.cert)
                .with_context(|| format!("{}: `admin.tls`", config.source.display())),
            None => AdminClient::new(addr, token),
        }
    }

    /// A client of the API at `addr` over plain HTTP.
    pub fn new(addr: SocketAddr, token: Option<Secret>) -> anyhow::Result<AdminClient> {
        AdminClient::build(format!("http://{addr}"), token, reqwest::Client::builder())
    }

    /// A client of the API at `addr` over TLS, trusting exactly the
    /// certificate in `cert` (the host's `admin.tls.cert`): no name, issuer
    /// or date to get right, and no other certificate passes.
    pub fn over_tls(
        addr: SocketAddr,
        token: Option<Secret>,
        cert: &std::path::Path,
    ) -> anyhow::Result<AdminClient> {
        let pinned = crate::outbound::TlsMode::PinnedCert(cert.to_owned());
        let builder = crate::outbound::with_tls(reqwest::Client::builder(), &pinned)
            .map_err(|e| anyhow!(e))?;
        AdminClient::build(format!("https://{addr}"), token, builder)
    }

    fn build(
        base: String,
        token: Option<Secret>,
        builder: reqwest::ClientBuilder,
    ) -> anyhow::Result<AdminClient> {
        let http = builder
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(AdminClient { base, token, http })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> anyhow::Result<T> {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose());
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            let hint = if e.is_connect() {
                " (is `prismhook run` running with this configuration's [admin] listen?)"
            } else {
                ""
            };
            // The reason is in the chain (a refused connection, a
            // certificate that is not the pinned one).
            anyhow::anyhow!(
                "cannot reach the admin API at {}{hint}: {what}: {}",
                self.base,
                prismhook_core::text::error_chain(&e)
            )
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("admin API at {}: reading the answer to {what}", self.base))?;
        if !status.is_success() {
            let message = serde_json::from_str::<super::api::Error>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| text.trim().to_owned());
            if status == StatusCode::UNAUTHORIZED {
                bail!(
                    "admin API at {} refused {what} (401): {message}; `admin.token` in this configuration \
                     must be the running host's",
                    self.base
                );
            }
            bail!(
                "admin API at {} answered {what} with {status}: {message}",
                self.base
            );
        }
        serde_json::from_str(&text)
            .with_context(|| format!("admin API at {}: unexpected answer to {what}", self.base))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None::<&()>, QUICK)
            .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> anyhow::Result<T> {
        self.call(reqwest::Method::POST, path, Some(body), timeout)
            .await
    }

    pub async fn plugins(&self) -> anyhow::Result<Vec<PluginReport>> {
        self.get("/api/plugins").await
    }

    /// Rescans the plugins directory and waits; one report per file.
    pub async fn reload(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.post("/api/plugins/reload", &serde_json::json!({}), SLOW)
            .await
    }

    pub async fn clusters(&self) -> anyhow::Result<Vec<ClusterReport>> {
        self.get("/api/clusters").await
    }

    /// The hosts sharing the ledger; `None` for a host alone.
    pub async fn hosts(&self) -> anyhow::Result<Option<Membership>> {
        self.get("/api/hosts").await
    }

    /// One page of `GET /api/dlq`, as asked.
    pub async fn dead_letter_page(&self, q: &DlqQuery) -> anyhow::Result<DeadLetters> {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(p) = &q.plugin {
            query.append_pair("plugin", p);
        }
        if let Some(limit) = q.limit {
            query.append_pair("limit", &limit.to_string());
        }
        if let (Some(p), Some(id)) = (&q.after_plugin, q.after_event) {
            query.append_pair("after_plugin", p);
            query.append_pair("after_event", &id.to_string());
        }
        if let Some(bodies) = q.bodies {
            query.append_pair("bodies", &bodies.to_string());
        }
        self.get(&format!("/api/dlq?{}", query.finish())).await
    }

    /// The first `limit` dead letters (of `plugin`) without their bodies,
    /// read page by page.
    pub async fn dead_letters(
        &self,
        plugin: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<DeadLetters> {
        let mut q = DlqQuery {
            plugin: plugin.map(str::to_owned),
            limit: Some(limit),
            bodies: Some(false),
            ..Default::default()
        };
        let mut listed = self.dead_letter_page(&q).await?;
        while listed.dead_letters.len() < limit {
            let Some(next) = listed.next.take() else {
                break;
            };
            q.limit = Some(limit - listed.dead_letters.len());
            (q.after_plugin, q.after_event) = (Some(next.plugin), Some(next.event_id));
            let page = self.dead_letter_page(&q).await?;
            listed.total = page.total;
            listed.dead_letters.extend(page.dead_letters);
            listed.next = page.next;
        }
        Ok(listed)
    }

    /// Dead letters become pending again; returns how many.
    pub async fn replay_dead(&self, selection: &DlqSelection) -> anyhow::Result<u64> {
        let c: Count = self.post("/api/dlq/replay", selection, QUICK).await?;
        Ok(c.count)
    }

    /// Deletes dead letters; returns how many.
    pub async fn drop_dead(&self, selection: &DlqSelection) -> anyhow::Result<u64> {
        let c: Count = self.post("/api/dlq/drop", selection, QUICK).await?;
        Ok(c.count)
    }

    /// Redelivers a plugin's retained events since a time; returns how many.
    pub async fn replay(&self, request: &ReplayRequest) -> anyhow::Result<u64> {
        let c: Count = self.post("/api/replay", request, SLOW).await?;
        Ok(c.count)
    }

    pub async fn reconcile(&self, cluster: Option<&str>) -> anyhow::Result<Vec<ReconcileResult>> {
        let body = ReconcileRequest {
            cluster: cluster.map(str::to_owned),
        };
        self.post("/api/reconcile", &body, SLOW).await
    }
}

// ---- the commands --------------------------------------------------------

/// `prismhook plugins list`.
pub async fn plugins_list(config: &Config) -> anyhow::Result<()> {
    let plugins = AdminClient::from_config(config)?.plugins().await?;
    print!("{}", render_plugins(&plugins, now_ms()));
    Ok(())
}

/// `prismhook plugins reload`: whether every plugin file loaded (or was
/// left as it serves), for the exit status.
pub async fn plugins_reload(config: &Config) -> anyhow::Result<bool> {
    let reports = AdminClient::from_config(config)?.reload().await?;
    print!("{}", render_reload(&reports));
    Ok(!reports.iter().any(|r| {
        matches!(
            r.get("result").and_then(|v| v.as_str()),
            Some("failed" | "still-failing" | "config-not-loaded")
        )
    }))
}

/// `prismhook clusters`.
pub async fn clusters_list(config: &Config) -> anyhow::Result<()> {
    let clusters = AdminClient::from_config(config)?.clusters().await?;
    print!("{}", render_clusters(&clusters, now_ms()));
    Ok(())
}

/// `prismhook cluster status`.
pub async fn cluster_status(config: &Config) -> anyhow::Result<()> {
    let membership = AdminClient::from_config(config)?.hosts().await?;
    print!("{}", render_membership(membership.as_ref(), now_ms()));
    Ok(())
}

/// `prismhook dlq list [--plugin P] [--limit N]`.
pub async fn dlq_list(config: &Config, plugin: Option<&str>, limit: usize) -> anyhow::Result<()> {
    let dlq = AdminClient::from_config(config)?
        .dead_letters(plugin, limit)
        .await?;
    print!("{}", render_dead_letters(&dlq, now_ms()));
    Ok(())
}

/// `prismhook dlq replay [--plugin P] [IDS…]`: no plugin and no ids replays
/// every dead letter.
pub async fn dlq_replay(config: &Config, plugin: Option<&str>, ids: &[u64]) -> anyhow::Result<()> {
    let selection = selection(plugin, ids, false);
    let n = AdminClient::from_config(config)?
        .replay_dead(&selection)
        .await?;
    println!("{n} dead letter(s) {} pending again", describe(&selection));
    Ok(())
}

/// `prismhook dlq drop [--plugin P] [IDS…] [--all]`: deleting needs a
/// plugin, ids or `--all`.
pub async fn dlq_drop(
    config: &Config,
    plugin: Option<&str>,
    ids: &[u64],
    all: bool,
) -> anyhow::Result<()> {
    if plugin.is_none() && ids.is_empty() && !all {
        bail!("name a --plugin, event ids, or --all to drop every dead letter");
    }
    let selection = selection(plugin, ids, all);
    let n = AdminClient::from_config(config)?
        .drop_dead(&selection)
        .await?;
    println!("{n} dead letter(s) {} dropped", describe(&selection));
    Ok(())
}

/// `prismhook replay --plugin P --since T`, `T` an RFC 3339 time or a
/// duration before now (`1h`).
pub async fn replay(config: &Config, plugin: &str, since: &str) -> anyhow::Result<()> {
    let since_ms = parse_since(since, SystemTime::now())?;
    let request = ReplayRequest {
        plugin: plugin.to_owned(),
        since_ms,
        event_types: None,
    };
    let n = AdminClient::from_config(config)?.replay(&request).await?;
    println!(
        "{n} event(s) received since {} queued again for `{plugin}`",
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(since_ms))
    );
    Ok(())
}

/// `prismhook reconcile [--cluster C]`: fails when any cluster did.
pub async fn reconcile(config: &Config, cluster: Option<&str>) -> anyhow::Result<()> {
    let results = AdminClient::from_config(config)?.reconcile(cluster).await?;
    print!("{}", render_reconcile(&results));
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        bail!(
            "reconcile failed for {failed} of {} cluster(s)",
            results.len()
        );
    }
    Ok(())
}

fn selection(plugin: Option<&str>, ids: &[u64], all: bool) -> DlqSelection {
    DlqSelection {
        plugin: plugin.map(str::to_owned),
        ids: (!ids.is_empty()).then(|| ids.to_vec()),
        all,
    }
}

fn describe(s: &DlqSelection) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &s.plugin {
        parts.push(format!("of `{p}`"));
    }
    if let Some(ids) = &s.ids {
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        parts.push(format!("for event(s) {}", ids.join(", ")));
    }
    if parts.is_empty() {
        "(all)".into()
    } else {
        parts.join(" ")
    }
}

// ---- parsing and rendering -----------------------------------------------

/// `--since`: an RFC 3339 time (`2024-05-01T12:00:00Z`, with an optional
/// `±hh:mm` offset) or a duration before `now` (`90s`, `15m`, `1h`, `2days`),
/// as milliseconds since the Unix epoch.
pub fn parse_since(text: &str, now: SystemTime) -> anyhow::Result<u64> {
    let text = text.trim();
    let at = if let Ok(ago) = humantime::parse_duration(text) {
        now.checked_sub(ago)
            .with_context(|| format!("`--since {text}`: reaches before the Unix epoch"))?
    } else {
        parse_rfc3339(text).with_context(|| {
            format!(
                "`--since {text}`: expected an RFC 3339 time (2024-05-01T12:00:00Z) or a duration \
                 before now (90m, 1h, 2days)"
            )
        })?
    };
    if at > now + Duration::from_secs(60) {
        bail!("`--since {text}` is in the future; nothing would be replayed");
    }
    Ok(at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

/// RFC 3339 with `Z` or a numeric offset (humantime reads only UTC).
fn parse_rfc3339(text: &str) -> anyhow::Result<SystemTime> {
    let bytes = text.as_bytes();
    let n = bytes.len();
    let has_offset =
        n > 6 && matches!(bytes[n - 6], b'+' | b'-') && bytes[n - 3] == b':' && text.contains('T');
    if !has_offset {
        return Ok(humantime::parse_rfc3339_weak(text)?);
    }
    let (local, offset) = text.split_at(n - 6);
    let hours: u64 = offset[1..3].parse().context("offset hours")?;
    let minutes: u64 = offset[4..6].parse().context("offset minutes")?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    let local = humantime::parse_rfc3339_weak(local)?;
    // 12:00+02:00 is 10:00Z: subtract an eastern offset, add a western one.
    Ok(if offset.starts_with('+') {
        local - shift
    } else {
        local + shift
    })
}

/// `3m 12s ago`, or `–`.
fn ago(at_ms: Option<u64>, now_ms: u64) -> String {
    match at_ms {
        None => "–".into(),
        Some(t) => {
            let secs = now_ms.saturating_sub(t) / 1000;
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(secs))
            )
        }
    }
}

fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Shortens free text (reasons, errors) to fit a table cell.
fn clip(text: &str, max: usize) -> String {
    let spaced = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // What a plugin wrote must not drive the operator's terminal.
    let one_line = prismhook_core::text::one_line(&spaced).into_owned();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut s: String = one_line.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

/// A plain-text table: columns padded to their widest cell, two spaces
/// apart, numbers right-aligned.
struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([self.headers[i].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for cells in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let pad = widths[i] - cell.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

pub fn render_plugins(plugins: &[PluginReport], now_ms: u64) -> String {
    if plugins.is_empty() {
        return "no plugins loaded\n".into();
    }
    let mut t = Table::new(&[
        ("PLUGIN", false),
        ("VERSION", false),
        ("STATE", false),
        ("DELIVERED", true),
        ("RETRIED", true),
        ("REJECTED", true),
        ("PENDING", true),
        ("IN FLIGHT", true),
        ("DEAD", true),
        ("OLDEST PENDING", false),
        ("AVG HANDLE", true),
    ]);
    let mut notes = String::new();
    for p in plugins {
        let c = &p.counters;
        let b = &p.backlog;
        let avg = if c.calls > 0 {
            format!("{:.1} ms", 1000.0 * c.handle_seconds / c.calls as f64)
        } else {
            "–".into()
        };
        let name = match &p.component {
            Some(component) => format!("{} ({component})", p.name),
            None => p.name.clone(),
        };
        t.row(vec![
            name,
            p.version
                .as_deref()
                .map_or_else(|| "–".into(), |v| clip(v, 40)),
            p.state.clone(),
            c.delivered.to_string(),
            c.retried.to_string(),
            c.rejected.to_string(),
            b.pending.to_string(),
            b.in_flight.to_string(),
            b.dead.to_string(),
            ago(b.oldest_pending_ms, now_ms),
            avg,
        ]);
        if let Some(reason) = &p.reason {
            let until = p
                .until_ms
                .map(|t| format!(" (until {})", timestamp(t)))
                .unwrap_or_default();
            let _ = writeln!(
                notes,
                "{}: {}{until}: {}",
                p.name,
                p.state,
                clip(reason, 400)
            );
        }
        if let Some(e) = &p.load_error {
            let _ = writeln!(
                notes,
                "{}: newest file not loaded, previous version serves: {}",
                p.name,
                prismhook_core::text::one_line(e)
            );
        }
        if p.tier == Some(crate::runtime::Tier::Baseline) {
            let _ = writeln!(
                notes,
                "{}: serving Winch's code while Cranelift compiles it",
                p.name
            );
        }
        if let Some(why) = &p.init_every_call {
            let _ = writeln!(notes, "{}: runs `init` in every call: {why}", p.name);
        }
    }
    let mut out = t.render();
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out
}

pub fn render_clusters(clusters: &[ClusterReport], now_ms: u64) -> String {
    if clusters.is_empty() {
        return "no clusters configured\n".into();
    }
    let mut t = Table::new(&[
        ("CLUSTER", false),
        ("PRISM", false),
        ("WEBHOOK", false),
        ("EVENTS", true),
        ("LAST SYNC", false),
        ("LAST RECONCILE", false),
        ("PROBLEM", false),
    ]);
    for c in clusters {
        t.row(vec![
            c.name.clone(),
            c.prism_url.clone(),
            if c.registered {
                "registered".into()
            } else {
                "NOT REGISTERED".into()
            },
            c.registered_events.len().to_string(),
            ago(c.last_sync_ms, now_ms),
            ago(c.last_reconcile_ms, now_ms),
            c.last_error
                .as_deref()
                .map(|e| clip(e, 80))
                .unwrap_or_default(),
        ]);
    }
    t.render()
}

pub fn render_membership(membership: Option<&Membership>, now_ms: u64) -> String {
    let Some(m) = membership else {
        return "this host runs alone (redb ledger): it holds every partition and leads\n".into();
    };
    let mut out = format!(
        "{} host{} share the ledger; leader: {}\n",
        m.hosts.len(),
        if m.hosts.len() == 1 { "" } else { "s" },
        m.leader.as_deref().unwrap_or("none at this moment")
    );
    let mut lag_of = vec![(0u64, None::<u64>); crate::ledger::PARTITIONS];
    for l in &m.lag {
        if let Some(slot) = lag_of.get_mut(l.partition) {
            *slot = (l.undelivered, l.oldest_undelivered_ms);
        }
    }
    let mut t = Table::new(&[
        ("HOST", false),
        ("LEADER", false),
        ("PARTITIONS", true),
        ("UNDELIVERED", true),
        ("OLDEST", false),
        ("SEEN", false),
    ]);
    for h in &m.hosts {
        let undelivered: u64 = h.partitions.iter().map(|&p| lag_of[p].0).sum();
        let oldest = h.partitions.iter().filter_map(|&p| lag_of[p].1).min();
        t.row(vec![
            if h.me {
                format!("{} (this host)", h.name)
            } else {
                h.name.clone()
            },
            if h.leader {
                "yes".into()
            } else {
                String::new()
            },
            h.partitions.len().to_string(),
            undelivered.to_string(),
            ago(oldest, now_ms),
            format!("{:.1} s ago", h.seen_ms_ago as f64 / 1000.0),
        ]);
    }
    out.push_str(&t.render());
    if !m.unheld.is_empty() {
        let list: Vec<String> = m.unheld.iter().map(usize::to_string).collect();
        let undelivered: u64 = m.unheld.iter().map(|&p| lag_of[p].0).sum();
        let _ = writeln!(
            out,
            "moving between hosts: partition{} {} ({undelivered} undelivered)",
            if list.len() == 1 { "" } else { "s" },
            list.join(", ")
        );
    }
    out
}

pub fn render_dead_letters(dlq: &DeadLetters, now_ms: u64) -> String {
    if dlq.dead_letters.is_empty() {
        return "no dead letters\n".into();
    }
    let mut t = Table::new(&[
        ("PLUGIN", false),
        ("EVENT", true),
        ("TYPE", false),
        ("CLUSTER", false),
        ("ENTITY", false),
        ("ATTEMPTS", true),
        ("DIED", false),
        ("REASON", false),
    ]);
    for d in &dlq.dead_letters {
        t.row(vec![
            d.plugin.clone(),
            d.event.id.to_string(),
            d.event.event_type.clone(),
            d.event.cluster.clone(),
            if d.event.entity_uuid.is_empty() {
                "–".into()
            } else {
                d.event.entity_uuid.clone()
            },
            d.attempts.to_string(),
            ago(Some(d.died_at_ms), now_ms),
            clip(&d.reason, 60),
        ]);
    }
    let mut out = t.render();
    let shown = dlq.dead_letters.len() as u64;
    if dlq.total > shown {
        let _ = writeln!(
            out,
            "\n{shown} of {} dead letters shown (raise --limit to see more)",
            dlq.total
        );
    }
    out
}

pub fn render_reconcile(results: &[ReconcileResult]) -> String {
    if results.is_empty() {
        return "no clusters configured\n".into();
    }
    let mut out = String::new();
    for r in results {
        match &r.error {
            Some(e) => {
                let _ = writeln!(out, "{}: FAILED: {e}", r.cluster);
            }
            None if r.plugins.is_empty() => {
                let _ = writeln!(out, "{}: no plugin reconciles VMs", r.cluster);
            }
            None => {
                let _ = writeln!(out, "{}:", r.cluster);
                for line in &r.plugins {
                    let _ = writeln!(out, "  {line}");
                }
            }
        }
    }
    out
}

/// One line per file of a reload, from `reload::Report` as JSON.
pub fn render_reload(reports: &[serde_json::Value]) -> String {
    if reports.is_empty() {
        return "no plugin files\n".into();
    }
    let mut t = Table::new(&[
        ("RESULT", false),
        ("PLUGIN", false),
        ("FILE", false),
        ("DETAIL", false),
    ]);
    for r in reports {
        let field = |k: &str| {
            r.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let detail = match field("result").as_str() {
            "loaded" => format!("version {}", field("version")),
            "failed" | "still-failing" | "config-not-loaded" => clip(&field("error"), 100),
            "config-for-next-start" => {
                let sections: Vec<&str> = r
                    .get("sections")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
                    .unwrap_or_default();
                format!(
                    "`{}` changed: applies at the next start",
                    sections.join("`, `")
                )
            }
            _ => String::new(),
        };
        t.row(vec![
            field("result"),
            field("plugin"),
            field("file"),
            detail,
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{DeadLetter, PluginBacklog, StoredEvent};

    const NOW: u64 = 1_700_000_000_000;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn since_reads_a_duration_before_now() {
        assert_eq!(parse_since("1h", at(NOW)).unwrap(), NOW - 3_600_000);
        assert_eq!(parse_since(" 90s ", at(NOW)).unwrap(), NOW - 90_000);
        assert_eq!(parse_since("2days", at(NOW)).unwrap(), NOW - 2 * 86_400_000);
    }

    #[test]
    fn since_reads_rfc3339_in_utc_or_with_an_offset() {
        let noon_utc = 1_714_564_800_000; // 2024-05-01T12:00:00Z
        assert_eq!(
            parse_since("2024-05-01T12:00:00Z", at(NOW + 1_000_000_000_000)).unwrap(),
            noon_utc
        );
        assert_eq!(
            parse_since("2024-05-01T14:00:00+02:00", at(NOW + 1_000_000_000_000)).unwrap(),
            noon_utc
        );
        assert_eq!(
            parse_since("2024-05-01T07:30:00-04:30", at(NOW + 1_000_000_000_000)).unwrap(),
            noon_utc
        );
    }

    #[test]
    fn since_explains_what_it_expected() {
        let e = parse_since("yesterday", at(NOW)).unwrap_err().to_string();
        assert!(
            e.contains("`--since yesterday`") && e.contains("RFC 3339"),
            "{e}"
        );
        let e = parse_since("2099-01-01T00:00:00Z", at(NOW))
            .unwrap_err()
            .to_string();
        assert!(e.contains("in the future"), "{e}");
    }

    fn backlog(plugin: &str) -> PluginBacklog {
        PluginBacklog {
            plugin: plugin.into(),
            pending: 3,
            in_flight: 1,
            retrying: 1,
            dead: 2,
            delivered: 40,
            oldest_pending_ms: Some(NOW - 75_000),
        }
    }

    #[test]
    fn the_plugin_table_aligns_columns_and_explains_quarantine_and_winch_code() {
        let plugins = vec![
            PluginReport {
                name: "fw-dc1".into(),
                state: "active".into(),
                reason: None,
                until_ms: None,
                component: Some("paloalto".into()),
                version: Some("1.2.0".into()),
                file: None,
                sha256: None,
                tier: None,
                pre_initialised: Some(true),
                init_every_call: None,
                load_error: None,
                subscriptions: vec!["VM.*".into()],
                counters: super::super::api::PluginCounters {
                    calls: 4,
                    delivered: 120,
                    handle_seconds: 0.01,
                    ..Default::default()
                },
                backlog: backlog("fw-dc1"),
            },
            PluginReport {
                name: "probe".into(),
                state: "quarantined".into(),
                reason: Some("trapped in handle".into()),
                until_ms: Some(NOW),
                component: None,
                version: None,
                file: None,
                sha256: None,
                tier: Some(crate::runtime::Tier::Baseline),
                pre_initialised: Some(false),
                init_every_call: Some(
                    "its `init` calls WASI (clocks, random or environment, as language runtimes do when they start), so the state it leaves is not kept".into(),
                ),
                load_error: None,
                subscriptions: vec![],
                counters: Default::default(),
                backlog: backlog("probe"),
            },
        ];
        let text = render_plugins(&plugins, NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("PLUGIN             VERSION  STATE        DELIVERED"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("fw-dc1 (paloalto)  1.2.0    active             120"),
            "an instance shows its component: {text}"
        );
        assert!(
            lines[2].starts_with("probe              –        quarantined          0"),
            "{text}"
        );
        assert!(
            lines[1].contains("1m 15s ago") && lines[1].ends_with("2.5 ms"),
            "{text}"
        );
        assert!(
            text.contains("probe: quarantined (until 2023-11-14T22:13:20Z): trapped in handle"),
            "{text}"
        );
        assert!(
            text.contains("probe: serving Winch's code while Cranelift compiles it"),
            "{text}"
        );
        assert!(!text.contains("fw-dc1: serving"), "{text}");
        assert!(
            text.contains("probe: runs `init` in every call: its `init` calls WASI"),
            "{text}"
        );
        assert!(!text.contains("fw-dc1: runs"), "{text}");
    }

    #[test]
    fn the_dead_letter_table_says_when_more_exist() {
        let dlq = DeadLetters {
            total: 5,
            dead_letters: vec![DeadLetter {
                plugin: "probe".into(),
                event: StoredEvent {
                    id: 7,
                    cluster: "lab".into(),
                    event_type: "TEST.REJECT".into(),
                    entity_kind: "test".into(),
                    entity_uuid: "u-1".into(),
                    received_at_ms: NOW - 10_000,
                    body: "{}".into(),
                    vm: None,
                },
                attempts: 1,
                reason: "probe asked\nto reject".into(),
                died_at_ms: NOW - 5_000,
            }],
            next: None,
        };
        let text = render_dead_letters(&dlq, NOW);
        assert!(
            text.contains("probe       7  TEST.REJECT  lab      u-1"),
            "{text}"
        );
        assert!(text.contains("5s ago  probe asked to reject"), "{text}");
        assert!(text.contains("1 of 5 dead letters shown"), "{text}");
    }

    #[test]
    fn the_host_table_sums_each_hosts_partitions_and_names_those_on_the_move() {
        use crate::ledger::{HostLeases, PartitionLag};
        let host = |name: &str, partitions: Vec<usize>, leader: bool| HostLeases {
            name: name.into(),
            me: name == "a",
            leader,
            partitions,
            seen_ms_ago: 400,
        };
        let lag = |partition, undelivered, oldest| PartitionLag {
            partition,
            undelivered,
            oldest_undelivered_ms: oldest,
        };
        let m = Membership {
            me: "a".into(),
            leader: Some("b".into()),
            hosts: vec![host("a", vec![0, 1], false), host("b", vec![2], true)],
            unheld: vec![3],
            serving: vec![0, 1],
            lag: vec![
                lag(0, 2, Some(NOW - 5_000)),
                lag(1, 3, Some(NOW - 65_000)),
                lag(3, 7, Some(NOW - 1_000)),
            ],
        };
        let text = render_membership(Some(&m), NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "2 hosts share the ledger; leader: b");
        assert!(lines[2].starts_with("a (this host)"), "{text}");
        assert!(
            lines[2].contains(" 2 ") && lines[2].contains(" 5 "),
            "{text}"
        );
        assert!(lines[2].contains("1m 5s ago"), "{text}");
        assert!(
            lines[3].starts_with("b ") && lines[3].contains("yes"),
            "{text}"
        );
        assert_eq!(
            lines[4],
            "moving between hosts: partition 3 (7 undelivered)"
        );
        assert!(render_membership(None, NOW).contains("runs alone"));
    }

    #[test]
    fn clipping_keeps_one_line_and_marks_the_cut() {
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("a\u{1b}[2Jb", 20), "a\\u{1b}[2Jb");
        assert_eq!(clip("abcdefghijk", 5), "abcd…");
    }
}
