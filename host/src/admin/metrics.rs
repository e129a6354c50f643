//! `/metrics`: the host's counters as Prometheus (OpenMetrics) text.
//!
//! Almost everything is read at scrape time from counters the host keeps
//! anyway (a `prometheus-client` [`Collector`]), so there is one source of
//! truth per number and nothing to keep in step. The exception is the
//! `handle` duration histogram: a distribution cannot be rebuilt from a
//! total, so the dispatcher records each call into
//! [`crate::telemetry::HandleDurations`].
//!
//! Each [`Metrics`] has its own registry; nothing is global.

use std::fmt;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::api::state_name;
use super::AdminState;
use crate::clock::now_ms;
use crate::ledger::PluginBacklog;

pub(super) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(state: &AdminState) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HostCollector(state.clone())));
        registry.register(
            "prismhook_plugin_handle_duration_seconds",
            "Duration of each call to a plugin's handle (a batch of deliveries)",
            state.handle_durations.family(),
        );
        Metrics { registry }
    }

    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads the host's counters on every scrape.
struct HostCollector(AdminState);

impl fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCollector").finish_non_exhaustive()
    }
}

type Labels = Vec<(&'static str, String)>;

fn plugin(name: &str) -> Labels {
    vec![("plugin", name.to_owned())]
}

fn counter<N: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, N)],
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        metric
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(value, None)?;
    }
    Ok(())
}

fn gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, N)],
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        metric.encode_family(labels)?.encode_gauge(value)?;
    }
    Ok(())
}

/// A metric with a single, unlabelled sample.
fn single_counter<N: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn single_gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let state = &self.0;
        let e = &mut enc;

        let received: Vec<(Labels, u64)> = state
            .listener_stats
            .snapshot()
            .into_iter()
            .map(|((cluster, event_type, status), n)| {
                let labels = vec![
                    ("cluster", cluster),
                    ("event_type", event_type),
                    ("status", status.to_string()),
                ];
                (labels, n)
            })
            .collect();
        counter(e, "prismhook_notifications", "Notifications answered by the listener, by cluster, event type (`-` when unreadable) and HTTP status", &received)?;
        single_counter(
            e,
            "prismhook_listener_connections_refused",
            "Connections the listener closed as they came, their peer holding `listener.max_connections_per_peer` already",
            state.listener_serve.refused_per_peer.load(Ordering::Relaxed),
        )?;
        single_counter(
            e,
            "prismhook_listener_connections_evicted",
            "Connections the listener asked to close for a new peer, every one of `listener.max_connections` being held",
            state.listener_serve.evicted.load(Ordering::Relaxed),
        )?;
        let unsubscribed = state.listener_stats.unsubscribed.load(Ordering::Relaxed);
        single_counter(
            e,
            "prismhook_notifications_unsubscribed",
            "Notifications stored that no loaded plugin subscribes to",
            unsubscribed,
        )?;

        // A ledger that cannot be read leaves its metrics out rather than
        // failing the whole scrape; /readyz says why.
        if let Ok(backlog) = state.ledger.backlog() {
            let now = now_ms();
            let rows = |f: &dyn Fn(&PluginBacklog) -> u64| -> Vec<(Labels, u64)> {
                backlog.iter().map(|b| (plugin(&b.plugin), f(b))).collect()
            };
            gauge(
                e,
                "prismhook_ledger_pending_deliveries",
                "Deliveries waiting to be claimed, including those waiting for a retry",
                &rows(&|b| b.pending),
            )?;
            gauge(
                e,
                "prismhook_ledger_in_flight_deliveries",
                "Deliveries claimed and being handled",
                &rows(&|b| b.in_flight),
            )?;
            gauge(
                e,
                "prismhook_ledger_retrying_deliveries",
                "Pending deliveries that have failed before",
                &rows(&|b| b.retrying),
            )?;
            gauge(
                e,
                "prismhook_ledger_dead_letters",
                "Deliveries given up on, waiting for an operator to replay or drop them",
                &rows(&|b| b.dead),
            )?;
            let ages: Vec<(Labels, f64)> = backlog
                .iter()
                .map(|b| {
                    let age_ms = b.oldest_pending_ms.map_or(0, |t| now.saturating_sub(t));
                    (plugin(&b.plugin), age_ms as f64 / 1000.0)
                })
                .collect();
            gauge(
                e,
                "prismhook_ledger_oldest_pending_age_seconds",
                "Age of the oldest undelivered event; 0 when nothing waits",
                &ages,
            )?;
            counter(
                e,
                "prismhook_ledger_delivered",
                "Deliveries completed, all time (kept in the ledger)",
                &rows(&|b| b.delivered),
            )?;
        }
        let stats = state.ledger.stats();
        single_gauge(
            e,
            "prismhook_ledger_backlog",
            "Undelivered deliveries over all plugins, as compared with `storage.max_backlog`",
            stats.undelivered,
        )?;
        single_counter(e, "prismhook_ledger_commits", "Ledger write transactions committed since start (group commit makes them fewer than requests)", stats.commits)?;
        single_gauge(
            e,
            "prismhook_ledger_file_bytes",
            "Bytes used by the ledger file, as compared with `storage.max_ledger_mib`",
            stats.bytes,
        )?;

        // Hosts sharing the ledger: where the work is, and which host leads.
        if let Some(m) = state.ledger.membership() {
            let now = now_ms();
            let by_partition = |p: usize| vec![("partition", p.to_string())];
            let undelivered: Vec<(Labels, u64)> = m
                .lag
                .iter()
                .map(|l| (by_partition(l.partition), l.undelivered))
                .collect();
            gauge(
                e,
                "prismhook_partition_undelivered",
                "Undelivered deliveries per ledger partition, over all plugins (its lag)",
                &undelivered,
            )?;
            let ages: Vec<(Labels, f64)> = m
                .lag
                .iter()
                .map(|l| {
                    let age_ms = l.oldest_undelivered_ms.map_or(0, |t| now.saturating_sub(t));
                    (by_partition(l.partition), age_ms as f64 / 1000.0)
                })
                .collect();
            gauge(
                e,
                "prismhook_partition_oldest_undelivered_age_seconds",
                "Age of the oldest undelivered event per ledger partition; 0 when nothing waits",
                &ages,
            )?;
            single_gauge(
                e,
                "prismhook_partitions_served",
                "Ledger partitions this host holds by lease and claims from",
                m.serving.len() as u64,
            )?;
            single_gauge(
                e,
                "prismhook_hosts",
                "Live hosts sharing the ledger, as this host sees them",
                m.hosts.len() as u64,
            )?;
            let leads = m.leader.as_deref() == Some(m.me.as_str());
            single_gauge(
                e,
                "prismhook_leader",
                "1 on the host that runs the jobs one host runs for all (reconcile)",
                u64::from(leads),
            )?;
        }

        let counters = state.dispatcher.counters();
        let mut outcomes = Vec::new();
        let mut calls = Vec::new();
        let mut handle_seconds = Vec::new();
        let mut quarantines = Vec::new();
        let mut kv_conflicts = Vec::new();
        let mut rejected = Vec::new();
        for (name, c) in &counters {
            for (code, n) in &c.rejected_by_code {
                rejected.push((vec![("plugin", name.clone()), ("code", code.clone())], *n));
            }
            for (outcome, n) in [
                ("done", c.delivered),
                ("retry", c.retried),
                ("reject", c.rejected),
            ] {
                outcomes.push((
                    vec![("plugin", name.clone()), ("outcome", outcome.to_owned())],
                    n,
                ));
            }
            for (result, n) in [
                ("ok", c.calls.saturating_sub(c.failed_calls)),
                ("failed", c.failed_calls),
            ] {
                calls.push((
                    vec![("plugin", name.clone()), ("result", result.to_owned())],
                    n,
                ));
            }
            handle_seconds.push((plugin(name), c.handle_time.as_secs_f64()));
            quarantines.push((plugin(name), u64::from(c.quarantines)));
            kv_conflicts.push((plugin(name), c.kv_conflicts));
        }
        counter(e, "prismhook_deliveries", "Delivery outcomes since start, by plugin and outcome (done, retry, reject); a failed call counts each of its events as retry", &outcomes)?;
        counter(e, "prismhook_deliveries_rejected_by_code", "Rejections since start whose reason names a code (`[code] …`), by plugin and code, such as the Palo Alto plugin's `registered-ip-limit`", &rejected)?;
        counter(
            e,
            "prismhook_plugin_calls",
            "Calls to handle since start, by result (failed = trap, timeout, memory limit, or kv writes not stored)",
            &calls,
        )?;
        counter(
            e,
            "prismhook_plugin_handle_seconds",
            "Total time spent in handle since start",
            &handle_seconds,
        )?;
        counter(
            e,
            "prismhook_plugin_quarantines",
            "Times the plugin was quarantined after repeated failed calls",
            &quarantines,
        )?;
        counter(
            e,
            "prismhook_plugin_kv_conflicts",
            "Calls failed by a kv conflict (JetStream): another call or host wrote a key the call read; their events are delivered again at no attempt's cost",
            &kv_conflicts,
        )?;

        let mut states = Vec::new();
        let mut info = Vec::new();
        let mut memory = Vec::new();
        let mut kv_bytes = Vec::new();
        let quarantined = state.dispatcher.quarantined();
        for (name, entry) in state.registry.snapshot().iter() {
            if let Some(p) = &entry.plugin {
                let labels = vec![
                    ("plugin", name.clone()),
                    ("component", p.info().name.clone()),
                    ("version", p.info().version.clone()),
                ];
                info.push((labels, 1u64));
                memory.push((plugin(name), p.memory_peak() as u64));
                // A store that cannot be read now leaves the series out.
                if let Ok(bytes) = state.runtime.kv().bytes(name) {
                    kv_bytes.push((plugin(name), bytes));
                }
            }
            let current = state_name(&entry.state, quarantined.contains_key(name));
            for s in ["active", "quarantined", "failed"] {
                states.push((
                    vec![("plugin", name.clone()), ("state", s.to_owned())],
                    u64::from(s == current),
                ));
            }
        }
        gauge(
            e,
            "prismhook_plugin_info",
            "1 for each loaded plugin: the component it runs (its own name; an instance's differs from the plugin label) and its version",
            &info,
        )?;
        gauge(
            e,
            "prismhook_plugin_memory_peak_bytes",
            "The largest linear memory a call of the plugin's current version reached (its limit is `limits.memory`)",
            &memory,
        )?;
        gauge(
            e,
            "prismhook_plugin_kv_bytes",
            "The bytes (keys and values) the plugin's kv holds (its limit is `limits.kv_mib`)",
            &kv_bytes,
        )?;
        gauge(
            e,
            "prismhook_plugin_state",
            "1 for the plugin's current state (active, quarantined or failed), 0 for the others",
            &states,
        )?;

        let outbound: Vec<(Labels, u64)> = state
            .runtime
            .outbound()
            .snapshot()
            .into_iter()
            .map(|((plugin, origin, result), n)| {
                (
                    vec![("plugin", plugin), ("origin", origin), ("result", result)],
                    n,
                )
            })
            .collect();
        counter(
            e,
            "prismhook_plugin_outbound_requests",
            "Plugins' outbound HTTP requests since start, by plugin, origin (for an answer, the allowlist rule that let its URL through) and result (the HTTP status, or denied, timeout, connection-failed, too-large, limit-exceeded, invalid-request, other)",
            &outbound,
        )?;
        if let Some(bytes) = state.runtime.compiled_cache_bytes() {
            single_gauge(
                e,
                "prismhook_compiled_cache_bytes",
                "Bytes of compiled plugin code in `<data_dir>/cache`, as compared with `plugins.cache_max_mib`",
                bytes,
            )?;
        }
        let counts = state.reloader.counts();
        let reloads: Vec<(Labels, u64)> = [
            ("loaded", &counts.loaded),
            ("optimized", &counts.optimized),
            ("removed", &counts.removed),
            ("disabled", &counts.disabled),
            ("failed", &counts.failed),
        ]
        .into_iter()
        .map(|(result, n)| {
            (
                vec![("result", result.to_owned())],
                n.load(Ordering::Relaxed),
            )
        })
        .collect();
        counter(
            e,
            "prismhook_plugin_reloads",
            "Plugin files handled by the reload task since start, by result (a failed file leaves the previous version serving; optimized: Cranelift's code replaced Winch's)",
            &reloads,
        )?;

        let registered: Vec<(Labels, u64)> = state
            .source
            .status()
            .into_iter()
            .map(|s| (vec![("cluster", s.name)], u64::from(s.registered)))
            .collect();
        gauge(
            e,
            "prismhook_cluster_webhook_registered",
            "1 when this host's webhook is registered in the cluster's Prism",
            &registered,
        )?;
        single_gauge(
            e,
            "prismhook_ready",
            "1 while the notification listener accepts",
            u64::from(state.ready.load(Ordering::Relaxed)),
        )?;
        Ok(())
    }
}
