//! The HTTP listener notifications arrive on, and the ingest that stores
//! them before anyone is answered.
//!
//! The routes themselves are the event sources' (`source::EventSource`):
//! each authenticates its sender and decodes the body. What every source
//! shares is here: the body cap (413), the 503 while the host shuts down,
//! and [`Ingest::accept`], which writes the event to the ledger durably and
//! only then answers 202 — or 503 with `Retry-After` when the ledger is at
//! its limits, so that nothing is accepted that cannot be kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::clock::now_ms;
use crate::event::Decoded;
use crate::ledger::{Appended, LedgerError, NewEvent, SharedLedger};
use crate::registry::Registry;
use crate::serve::read_body;
use crate::telemetry::ListenerStats;

/// What every source's handlers share to store what they accept. Cheap to
/// clone.
#[derive(Clone)]
pub struct Ingest {
    ledger: SharedLedger,
    registry: Registry,
    max_body_bytes: usize,
    /// The whole body must arrive within this: a sender that trickles a
    /// large declared body holds a connection and a buffer only this long.
    body_read_timeout: Duration,
    /// Cleared at shutdown: the listener then answers 503 so the sender (or
    /// a proxy) tries elsewhere or later.
    accepting: Arc<AtomicBool>,
    stats: Arc<ListenerStats>,
}

#[derive(Serialize)]
struct Accepted {
    id: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    deliveries: usize,
}

impl Ingest {
    pub fn new(
        ledger: SharedLedger,
        registry: Registry,
        max_body_bytes: usize,
        body_read_timeout: Duration,
        accepting: Arc<AtomicBool>,
        stats: Arc<ListenerStats>,
    ) -> Ingest {
        Ingest {
            ledger,
            registry,
            max_body_bytes,
            body_read_timeout,
            accepting,
            stats,
        }
    }

    /// Counts an answer a handler gave without storing anything (401, 400).
    pub fn count(&self, endpoint: &str, event_type: &str, status: StatusCode) {
        self.stats.count(endpoint, event_type, status.as_u16());
    }

    /// The request body, once the host is known to accept, the body to fit
    /// the cap and to arrive in time; otherwise the answer to send instead
    /// (503, 413, 408).
    pub async fn read_body(&self, endpoint: &str, body: Body) -> Result<Bytes, Response> {
        if !self.accepting.load(Ordering::Relaxed) {
            return Err(unavailable("prismhook is shutting down", 5));
        }
        let e = match read_body(body, self.max_body_bytes, self.body_read_timeout).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => e,
        };
        let status = e.status();
        self.count(endpoint, "-", status);
        let mut r = problem(status, e.to_string());
        if status != StatusCode::PAYLOAD_TOO_LARGE {
            tracing::warn!(cluster = endpoint, "a notification was refused: {e}");
            // What is left of the body is not read, and nothing of a
            // connection whose framing broke is worth keeping: it ends.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Err(r)
    }

    /// Stores a decoded notification from `endpoint` with one delivery per
    /// subscribed plugin, durably, and answers: 202 once stored (or known
    /// as a duplicate), 503 + `Retry-After` at the ledger's limits or once
    /// it is closed, 413 when it is larger than the ledger stores in one
    /// record, 500 when it could not be stored.
    pub async fn accept(&self, endpoint: &str, decoded: Decoded, body: Bytes) -> Response {
        if let Err(why) = check_identifiers(&decoded) {
            self.count(endpoint, "-", StatusCode::BAD_REQUEST);
            tracing::warn!(cluster = endpoint, "notification refused: {why}");
            return problem(StatusCode::BAD_REQUEST, why);
        }
        let plugins = self.registry.subscribers(&decoded.event_type);
        if plugins.is_empty() {
            // Kept all the same: a plugin added later can have it replayed.
            self.stats.unsubscribed.fetch_add(1, Ordering::Relaxed);
        }
        let Decoded {
            event_type,
            entity_kind,
            entity_uuid,
            dedupe_key,
            vm,
        } = decoded;
        let event = NewEvent {
            cluster: endpoint.to_owned(),
            event_type: event_type.clone(),
            entity_kind,
            entity_uuid: entity_uuid.clone(),
            dedupe_key: Some(format!("{endpoint}/{dedupe_key}")),
            received_at_ms: now_ms(),
            // Decoded as JSON, so UTF-8: no replacement characters needed.
            body: String::from_utf8(body.into())
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            vm,
        };
        let cluster = endpoint;
        let response = match self.ledger.append(event, plugins).await {
            Ok(Appended::Stored { id, deliveries }) => {
                tracing::debug!(%cluster, %event_type, entity = %entity_uuid, event_id = id, deliveries, "accepted");
                let accepted = Accepted {
                    id,
                    duplicate: false,
                    deliveries,
                };
                (StatusCode::ACCEPTED, Json(accepted)).into_response()
            }
            Ok(Appended::Duplicate { id }) => {
                tracing::debug!(%cluster, %event_type, entity = %entity_uuid, event_id = id, "duplicate notification");
                let accepted = Accepted {
                    id,
                    duplicate: true,
                    deliveries: 0,
                };
                (StatusCode::ACCEPTED, Json(accepted)).into_response()
            }
            Err(
                e @ (LedgerError::Backpressure { retry_after, .. }
                | LedgerError::Unavailable { retry_after, .. }),
            ) => {
                tracing::warn!(%cluster, "notification refused with 503: {e}");
                let secs = retry_after.as_secs().clamp(1, 3600) as u32;
                unavailable(&format!("{e}; try again later"), secs)
            }
            // Refused each time it came: the sender is told so, the
            // operator what limit it met.
            Err(e @ LedgerError::TooLarge { .. }) => {
                tracing::error!(%cluster, %event_type, entity = %entity_uuid, "notification refused with 413: {e}");
                problem(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}; not stored"))
            }
            // A body that took its time arrives after shutdown closed the
            // ledger: Prism sends it again to this host or another.
            Err(LedgerError::Closed) => {
                tracing::warn!(%cluster, "notification refused with 503: the host is shutting down");
                unavailable("prismhook is shutting down", 5)
            }
            Err(e) => {
                // The detail is for the operator's log; the sender only
                // needs to know the event was not kept.
                tracing::error!(%cluster, "cannot store notification: {e}");
                problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the event could not be stored",
                )
            }
        };
        self.count(endpoint, &event_type, response.status());
        response
    }
}

/// Longest entity uuid or kind stored.
const MAX_IDENTIFIER_BYTES: usize = 128;

/// What is stored, indexed and labelled by must have a sane shape and size,
/// even from an authenticated sender: an event type is `KIND.ACTION` of
/// bounded length, an entity uuid and kind are short tokens.
fn check_identifiers(d: &Decoded) -> Result<(), String> {
    let token = |s: &str| {
        s.len() <= MAX_IDENTIFIER_BYTES
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    };
    let clip = |s: &str| format!("{:?}", s.chars().take(40).collect::<String>());
    if !crate::event::valid_event_type(&d.event_type) {
        return Err(format!(
            "event type {} is not KIND.ACTION of at most {} bytes",
            clip(&d.event_type),
            crate::event::MAX_EVENT_TYPE_BYTES
        ));
    }
    if !token(&d.entity_uuid) {
        return Err(format!(
            "entity uuid {} is not an identifier of at most {MAX_IDENTIFIER_BYTES} bytes",
            clip(&d.entity_uuid)
        ));
    }
    if !token(&d.entity_kind) {
        return Err(format!(
            "entity kind {} is not an identifier of at most {MAX_IDENTIFIER_BYTES} bytes",
            clip(&d.entity_kind)
        ));
    }
    Ok(())
}

/// The listener's whole router: the sources' routes and `/healthz`.
pub fn router(source_routes: Router) -> Router {
    source_routes.route("/healthz", get(|| async { "ok" }))
}

/// A plain-text error answer with a one-line reason.
pub fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", message.into()),
    )
        .into_response()
}

/// 503 with `Retry-After`.
pub fn unavailable(message: &str, retry_after_s: u32) -> Response {
    let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}
