//! The HTTP endpoint Prism posts notifications to.
//!
//! `POST /listener/callback/{cluster}`: Basic auth checked in constant time
//! (401, nothing stored), body capped (413), body parsed leniently (400 with
//! a one-line reason), then the event is written to the ledger durably and
//! only then answered 202. When the ledger is over its backlog limit the
//! answer is 503 with `Retry-After`: nothing is accepted that cannot be kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::dispatch::now_ms;
use crate::ledger::{Appended, Ledger, LedgerError, NewEvent};
use crate::nutanix::payload::parse_envelope;
use crate::registry::Registry;
use crate::secret::Secret;

/// The credentials one cluster's webhook presents.
#[derive(Clone)]
pub struct ClusterAuth {
    pub user: String,
    pub password: Secret,
}

/// Event type → status → count.
type ByType = HashMap<String, HashMap<u16, u64>>;

/// Counts of what the listener answered, by cluster, event type and status.
#[derive(Default)]
pub struct ListenerStats {
    /// Cluster → event type → status → count: nested so that counting a
    /// request allocates nothing once its cluster and type have been seen.
    by_key: Mutex<HashMap<String, ByType>>,
    pub unsubscribed: AtomicU64,
}

impl ListenerStats {
    pub fn count(&self, cluster: &str, event_type: &str, status: StatusCode) {
        let mut by_key = self.by_key.lock().expect("stats lock");
        let by_type = match by_key.get_mut(cluster) {
            Some(m) => m,
            None => by_key.entry(cluster.to_owned()).or_default(),
        };
        let by_status = match by_type.get_mut(event_type) {
            Some(m) => m,
            None => by_type.entry(event_type.to_owned()).or_default(),
        };
        *by_status.entry(status.as_u16()).or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<((String, String, u16), u64)> {
        let by_key = self.by_key.lock().expect("stats lock");
        let mut v: Vec<_> = by_key
            .iter()
            .flat_map(|(cluster, by_type)| {
                by_type.iter().flat_map(move |(event_type, by_status)| {
                    by_status.iter().map(move |(status, n)| {
                        ((cluster.clone(), event_type.clone(), *status), *n)
                    })
                })
            })
            .collect();
        v.sort();
        v
    }
}

#[derive(Clone)]
pub struct ListenerState {
    pub clusters: Arc<HashMap<String, ClusterAuth>>,
    pub ledger: Ledger,
    pub registry: Registry,
    pub max_body_bytes: usize,
    /// Cleared at shutdown: the listener then answers 503 so Prism (or a
    /// proxy) tries elsewhere or later.
    pub accepting: Arc<AtomicBool>,
    pub stats: Arc<ListenerStats>,
}

pub fn router(state: ListenerState) -> Router {
    Router::new()
        .route("/listener/callback/{cluster}", post(callback))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

#[derive(Serialize)]
struct Accepted {
    id: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    deliveries: usize,
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", message.into()),
    )
        .into_response()
}

async fn callback(
    State(state): State<ListenerState>,
    Path(cluster): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(auth) = state.clusters.get(&cluster) else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("no cluster named `{cluster}` is configured"),
        );
    };
    if !authorized(&headers, auth) {
        state.stats.count(&cluster, "-", StatusCode::UNAUTHORIZED);
        tracing::warn!(%cluster, "notification with wrong or missing credentials refused");
        let mut r = problem(StatusCode::UNAUTHORIZED, "wrong or missing credentials");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"prismhook\""),
        );
        return r;
    }
    if !state.accepting.load(Ordering::Relaxed) {
        return unavailable("prismhook is shutting down", 5);
    }
    let body = match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            state
                .stats
                .count(&cluster, "-", StatusCode::PAYLOAD_TOO_LARGE);
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body exceeds the limit of {} bytes", state.max_body_bytes),
            );
        }
    };
    let note = match parse_envelope(&body) {
        Ok(n) => n,
        Err(e) => {
            state.stats.count(&cluster, "-", StatusCode::BAD_REQUEST);
            tracing::warn!(%cluster, "malformed notification refused: {e}");
            return problem(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let plugins = state.registry.subscribers(&note.event_type);
    if plugins.is_empty() {
        // Kept all the same: a plugin added later can have it replayed.
        state.stats.unsubscribed.fetch_add(1, Ordering::Relaxed);
    }
    let event = NewEvent {
        cluster: cluster.clone(),
        event_type: note.event_type.clone(),
        entity_kind: note.entity_kind,
        entity_uuid: note.entity_uuid.clone(),
        dedupe_key: Some(format!("{cluster}/{}", note.dedupe_key)),
        received_at_ms: now_ms(),
        // Parsed as JSON, so UTF-8: no replacement characters needed.
        body: String::from_utf8(body.into())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    };
    let response = match state.ledger.append(event, plugins).await {
        Ok(Appended::Stored { id, deliveries }) => {
            tracing::debug!(%cluster, event_type = %note.event_type, entity = %note.entity_uuid, event_id = id, deliveries, "accepted");
            (
                StatusCode::ACCEPTED,
                Json(Accepted {
                    id,
                    duplicate: false,
                    deliveries,
                }),
            )
                .into_response()
        }
        Ok(Appended::Duplicate { id }) => {
            tracing::debug!(%cluster, event_type = %note.event_type, entity = %note.entity_uuid, event_id = id, "duplicate notification");
            (
                StatusCode::ACCEPTED,
                Json(Accepted {
                    id,
                    duplicate: true,
                    deliveries: 0,
                }),
            )
                .into_response()
        }
        Err(e @ LedgerError::Backpressure { retry_after, .. }) => {
            tracing::warn!(%cluster, "notification refused with 503: {e}");
            let secs = retry_after.as_secs().clamp(1, 3600) as u32;
            unavailable(&format!("{e}; try again later"), secs)
        }
        Err(e) => {
            // The detail is for the operator's log; Prism only needs to
            // know the event was not kept.
            tracing::error!(%cluster, "cannot store notification: {e}");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the event could not be stored",
            )
        }
    };
    state
        .stats
        .count(&cluster, &note.event_type, response.status());
    response
}

fn unavailable(message: &str, retry_after_s: u32) -> Response {
    let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}

fn authorized(headers: &HeaderMap, auth: &ClusterAuth) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{}:{}", auth.user, auth.password.expose());
    // No early exit: response time must not reveal how much of a guess
    // was right.
    bool::from(decoded.as_slice().ct_eq(expected.as_bytes()))
}

/// Serves `router` over TLS (rustls) with the PEM certificate chain and key
/// from the config, until `shutdown` resolves. Handshake failures are
/// logged and cost only their own connection.
pub async fn serve_tls(
    tcp: tokio::net::TcpListener,
    router: Router,
    tls: &crate::config::TlsFiles,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the listener certificate {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading the listener key {}", tls.key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the listener certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(tls);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder.serve_connection(io, service).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}
