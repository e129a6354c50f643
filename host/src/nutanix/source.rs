//! Nutanix Prism as an event source: the callback route Prism posts to, and
//! one registrar per cluster.
//!
//! `POST /listener/callback/{cluster}`: Basic auth checked in constant time
//! (401, nothing stored), body capped (413, by the ingest), decoded
//! leniently once (400 with a one-line reason), then stored by the ingest
//! before the 202.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use base64::Engine as _;

use super::payload::parse_notification;
use super::registrar::Registrar;
use crate::config::Config;
use crate::listener::{problem, Ingest};
use crate::secret::{self, BasicCredentials};
use crate::source::{EndpointStatus, EventSource, ReconcileReport, SourceContext, SourceError};
use prismhook_core::text::LogThrottle;

/// Every configured Prism cluster.
pub struct NutanixSource {
    config: Arc<Config>,
    /// What each cluster's webhook presents, by cluster name.
    clusters: Arc<HashMap<String, BasicCredentials>>,
    registrars: Mutex<Vec<Registrar>>,
}

impl NutanixSource {
    /// Reads each cluster's webhook credentials (generating and keeping them
    /// in the data directory when the configuration has none).
    pub fn new(config: Arc<Config>) -> anyhow::Result<NutanixSource> {
        let mut clusters = HashMap::new();
        for c in &config.clusters {
            let password = super::webhook_password(&config, c)?;
            clusters.insert(
                c.name.clone(),
                BasicCredentials {
                    user: c.webhook_user.clone(),
                    password,
                },
            );
        }
        Ok(NutanixSource {
            config,
            clusters: Arc::new(clusters),
            registrars: Mutex::default(),
        })
    }

    fn registrars(&self) -> Vec<Registrar> {
        self.registrars.lock().expect("registrars lock").clone()
    }
}

#[derive(Clone)]
struct Callback {
    clusters: Arc<HashMap<String, BasicCredentials>>,
    ingest: Ingest,
    /// Refusals before authentication are logged at most this often.
    refusals: Arc<LogThrottle>,
}

/// Refused notifications logged per minute; the rest are counted, and the
/// next line logged says how many.
const REFUSALS_LOGGED_PER_MINUTE: u32 = 10;

#[async_trait]
impl EventSource for NutanixSource {
    fn kind(&self) -> &'static str {
        "nutanix"
    }

    fn routes(&self, ingest: Ingest) -> Router {
        let state = Callback {
            clusters: self.clusters.clone(),
            ingest,
            refusals: Arc::new(LogThrottle::new(
                REFUSALS_LOGGED_PER_MINUTE,
                Duration::from_secs(60),
            )),
        };
        Router::new()
            .route("/listener/callback/{cluster}", post(callback))
            .with_state(state)
    }

    fn start(&self, ctx: SourceContext) -> anyhow::Result<()> {
        let mut started = Vec::new();
        for c in &self.config.clusters {
            let auth = self.clusters[&c.name].clone();
            let r = Registrar::start(self.config.clone(), c.clone(), auth, ctx.clone())
                .map_err(|e| e.context(format!("cluster `{}`", c.name)))?;
            started.push(r);
        }
        *self.registrars.lock().expect("registrars lock") = started;
        Ok(())
    }

    fn status(&self) -> Vec<EndpointStatus> {
        self.registrars().iter().map(Registrar::status).collect()
    }

    /// Clusters are independent: one slow Prism does not delay another.
    async fn reconcile(&self, endpoint: Option<&str>) -> Result<Vec<ReconcileReport>, SourceError> {
        let chosen: Vec<Registrar> = self
            .registrars()
            .into_iter()
            .filter(|r| endpoint.is_none_or(|c| r.name() == c))
            .collect();
        if let (Some(name), true) = (endpoint, chosen.is_empty()) {
            return Err(SourceError::UnknownEndpoint {
                kind: "cluster",
                name: name.to_owned(),
            });
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, r) in chosen.into_iter().enumerate() {
            tasks.spawn(async move {
                let report = match r.reconcile().await {
                    Ok(done) => ReconcileReport {
                        endpoint: r.name().to_owned(),
                        plugins: done.lines,
                        error: None,
                    },
                    Err(e) => ReconcileReport {
                        endpoint: r.name().to_owned(),
                        plugins: Vec::new(),
                        error: Some(format!("{e:#}")),
                    },
                };
                (i, report)
            });
        }
        let mut reports: Vec<(usize, ReconcileReport)> = tasks.join_all().await;
        reports.sort_by_key(|(i, _)| *i);
        Ok(reports.into_iter().map(|(_, r)| r).collect())
    }

    async fn stop(&self, deregister: bool) {
        let registrars = self.registrars();
        for r in &registrars {
            r.stop();
        }
        // A sync still running could re-create what deregistering removes.
        for r in &registrars {
            r.join().await;
        }
        if deregister {
            for r in &registrars {
                if let Err(e) = r.deregister().await {
                    tracing::error!("{e:#}");
                }
            }
        }
    }
}

async fn callback(
    State(state): State<Callback>,
    Path(cluster): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ingest = &state.ingest;
    // An unknown cluster is answered like wrong credentials, after the same
    // work: the sender learns nothing of which clusters exist before it
    // authenticates.
    let auth = state.clusters.get(&cluster);
    if !authorized(&headers, auth) {
        let shown: String = cluster.chars().take(40).collect();
        let logged = state.refusals.admit();
        match auth {
            Some(_) => {
                ingest.count(&cluster, "-", StatusCode::UNAUTHORIZED);
                if let Some(held_back) = logged {
                    tracing::warn!(%cluster, held_back, "notification with wrong or missing credentials refused");
                }
            }
            None => {
                ingest.count("-", "-", StatusCode::UNAUTHORIZED);
                if let Some(held_back) = logged {
                    tracing::warn!(cluster = ?shown, held_back, "notification for a cluster that is not configured refused");
                }
            }
        }
        let mut r = problem(StatusCode::UNAUTHORIZED, "wrong or missing credentials");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"prismhook\""),
        );
        return r;
    }
    let body = match ingest.read_body(&cluster, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let decoded = match parse_notification(&body) {
        Ok(d) => d,
        Err(e) => {
            ingest.count(&cluster, "-", StatusCode::BAD_REQUEST);
            tracing::warn!(%cluster, "malformed notification refused: {e}");
            return problem(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    ingest.accept(&cluster, decoded, body).await
}

/// Whether `headers` carry `auth`'s credentials (`None`: a cluster that is
/// not configured, compared all the same and never matching).
fn authorized(headers: &HeaderMap, auth: Option<&BasicCredentials>) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // The scheme's name is case-insensitive (RFC 9110, 11.1).
    let Some(encoded) = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, credentials)| credentials)
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = auth.map(|auth| format!("{}:{}", auth.user, auth.password.expose()));
    secret::matches_if_any(&decoded, expected.as_deref().map(str::as_bytes))
}
