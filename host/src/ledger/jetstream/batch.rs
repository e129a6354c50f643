//! All-or-nothing writes: JetStream *atomic batches* (nats-server 2.12+), for what must land
//! together or not at all — a call's kv writes, and the delivery marks of one completed batch.
//!
//! Separate publishes can land in part: a host killed while they are in flight, or a node lost
//! under them, leaves some stored and others not. For marks that breaks per-entity order: a
//! later event's `done` stored without an earlier one's sends the earlier event again, alone,
//! after the later one.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use serde::Deserialize;

/// Messages in one atomic batch: nats-server's limit.
pub const BATCH_MAX: usize = 1000;

/// Room left in a message's `max_payload` for its headers (a kv write's operation and expected
/// sequence, an atomic batch's id and place, an event's dedupe key of up to 256 bytes and time
/// received): a few hundred bytes, with a margin.
const HEADER_ROOM: usize = 1024;

/// The most a message's payload may hold with its headers: the servers'
/// `max_payload` less [`HEADER_ROOM`].
pub(super) fn payload_room(client: &async_nats::Client) -> usize {
    client.max_payload().saturating_sub(HEADER_ROOM)
}

/// One message of a batch.
pub(super) struct Message {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: bytes::Bytes,
}

/// What was under way when a batch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Sending,
    Waiting,
    /// JetStream answered, refusing the batch (a full stream, say).
    Storing,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Sending => "sending",
            Stage::Waiting => "waiting for JetStream to store",
            Stage::Storing => "storing",
        })
    }
}

/// Why a batch was not stored, or may not have been.
#[derive(Debug, thiserror::Error)]
#[error("{stage}: {message}")]
pub(super) struct BatchError {
    pub stage: Stage,
    pub message: String,
    refusal: Refusal,
}

/// What the client's error kind or JetStream's `err_code` says of a failure, where it
/// decides what the caller does next; classed by code, not by the words of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// A message's subject had moved on from the sequence it expected
    /// (`Nats-Expected-Last-Subject-Sequence`): someone else wrote it first.
    Superseded,
    /// Over a size limit; sent again, it would be refused again.
    TooLarge,
    /// The stream is at the size the operator set for it (`DiscardPolicy::New`): backpressure.
    StreamFull,
    /// Anything else: a lost connection, a timeout, a stream without a leader, …
    Other,
}

/// JetStream's `err_code`s (nats-server's `server/errors.json`).
mod code {
    /// `JSStreamWrongLastSequenceErrF`, "wrong last sequence: {seq}".
    pub const WRONG_LAST_SEQUENCE: u64 = 10071;
    /// `JSStreamWrongLastSequenceConstantErr`, "wrong last sequence": a clustered stream's
    /// refusal while an earlier write to the subject is still in flight.
    pub const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;
    /// `JSStreamMessageExceedsMaximumErr`, "message size exceeds maximum allowed".
    pub const MESSAGE_EXCEEDS_MAXIMUM: u64 = 10054;
    /// `JSAtomicPublishTooLargeBatchErrF`, "atomic publish batch is too large: {size}".
    pub const BATCH_TOO_LARGE: u64 = 10199;
    /// `JSStreamStoreFailedF`, "{err}": the store's own error, which for a full stream is
    /// "maximum bytes exceeded", "maximum messages exceeded" or "maximum messages per subject
    /// exceeded"; only the words tell those from a failing disk.
    pub const STORE_FAILED: u64 = 10077;
}

impl Refusal {
    fn of(code: u64, description: &str) -> Self {
        match code {
            code::WRONG_LAST_SEQUENCE | code::WRONG_LAST_SEQUENCE_CONSTANT => Self::Superseded,
            code::MESSAGE_EXCEEDS_MAXIMUM | code::BATCH_TOO_LARGE => Self::TooLarge,
            code::STORE_FAILED if description.starts_with("maximum") => Self::StreamFull,
            _ => Self::Other,
        }
    }
}

/// Whether JetStream refused a publish, by its error's code and description, because the
/// stream is full.
pub(super) fn stream_full(code: u64, description: &str) -> bool {
    Refusal::of(code, description) == Refusal::StreamFull
}

impl BatchError {
    /// Whether JetStream refused the batch because a message's subject had moved on from the
    /// sequence it expected (`Nats-Expected-Last-Subject-Sequence`): someone else wrote it first.
    pub fn superseded(&self) -> bool {
        self.refusal == Refusal::Superseded
    }

    /// Whether a message or the batch was over a size limit: the servers' `max_payload`,
    /// which the client checks before sending, a stream's largest message (error 10054), or
    /// the servers' largest atomic batch (10199). Sent again, it would be refused again.
    pub fn too_large(&self) -> bool {
        self.refusal == Refusal::TooLarge
    }

    /// Whether the stream is at the limit the operator set (see [`stream_full`]).
    pub fn stream_full(&self) -> bool {
        self.refusal == Refusal::StreamFull
    }
}

fn failed(stage: Stage, message: impl std::fmt::Display) -> BatchError {
    BatchError {
        stage,
        message: message.to_string(),
        refusal: Refusal::Other,
    }
}

fn refused(stage: Stage, refusal: Refusal, message: impl std::fmt::Display) -> BatchError {
    BatchError {
        refusal,
        ..failed(stage, message)
    }
}

/// The client's refusal of a message over the servers' `max_payload`, before sending it.
fn sending(oversized: bool, e: impl std::fmt::Display) -> BatchError {
    let refusal = if oversized {
        Refusal::TooLarge
    } else {
        Refusal::Other
    };
    refused(Stage::Sending, refusal, e)
}

/// Publishes `messages` (at most [`BATCH_MAX`]) as one atomic batch: JetStream stores all of
/// them or none. Returns the stream sequence of the last one.
pub(super) async fn publish(
    client: &async_nats::Client,
    js: &jetstream::Context,
    ack_timeout: Duration,
    messages: Vec<Message>,
) -> Result<u64, BatchError> {
    debug_assert!(
        messages.len() <= BATCH_MAX,
        "a batch over the server's limit"
    );
    // While disconnected the client would buffer the messages and send them on reconnect:
    // refused now, they are not stored behind the caller's back later.
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(failed(Stage::Sending, "not connected to any NATS server"));
    }
    let last = messages.len();
    if last == 1 {
        // One message is atomic by itself.
        let Message {
            subject,
            headers,
            payload,
        } = messages.into_iter().next().expect("one message");
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| {
                let oversized =
                    e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded;
                sending(oversized, e)
            })?
            .await
            .map_err(|e| {
                let refusal = api_error(&e).map_or(Refusal::Other, |(code, description)| {
                    Refusal::of(code, &description)
                });
                refused(Stage::Storing, refusal, e)
            })?;
        return Ok(ack.sequence);
    }
    let batch = format!("{:032x}", rand::random::<u128>());
    let mut sequence = 0;
    for (n, message) in messages.into_iter().enumerate() {
        let n = n + 1;
        let Message {
            subject,
            mut headers,
            payload,
        } = message;
        headers.insert("Nats-Batch-Id", batch.as_str());
        headers.insert("Nats-Batch-Sequence", n.to_string().as_str());
        if n == last {
            headers.insert("Nats-Batch-Commit", "1");
        }
        // The first message is acknowledged (a stream that refuses batches says so at once)
        // and the commit answers for the whole batch; the rest are sent without waiting, in
        // order on this connection.
        if n == 1 || n == last {
            let answer = tokio::time::timeout(
                ack_timeout,
                client.request_with_headers(subject, headers, payload),
            )
            .await
            .map_err(|_| failed(Stage::Waiting, "timed out"))?
            .map_err(|e| {
                sending(
                    e.kind() == async_nats::RequestErrorKind::MaxPayloadExceeded,
                    e,
                )
            })?;
            if !answer.payload.is_empty() {
                sequence = answer_of(&answer.payload)
                    .map_err(|(code, e)| refused(Stage::Storing, Refusal::of(code, &e), e))?;
            }
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| {
                    sending(
                        e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded,
                        e,
                    )
                })?;
        }
    }
    Ok(sequence)
}

/// JetStream's error behind a failed publish, as its code and description: the client names
/// only some codes in its error's kind, and keeps the rest in its source.
pub(super) fn api_error(e: &jetstream::context::PublishError) -> Option<(u64, String)> {
    let api = std::error::Error::source(e)?.downcast_ref::<jetstream::Error>()?;
    // Its description is private but serialized (`code()` is the HTTP-like status).
    let description = serde_json::to_value(api)
        .ok()
        .and_then(|v| v.get("description")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    Some((api.error_code().0, description))
}

/// Reads JetStream's answer to a batch message: the sequence stored, or its error's code
/// (0 when it has none) and description.
fn answer_of(payload: &[u8]) -> Result<u64, (u64, String)> {
    #[derive(Deserialize)]
    struct ApiError {
        #[serde(default)]
        err_code: u64,
        description: String,
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        seq: u64,
        error: Option<ApiError>,
    }
    let answer: Answer = serde_json::from_slice(payload)
        .map_err(|e| (0, format!("unreadable answer from JetStream: {e}")))?;
    match answer.error {
        Some(error) => Err((error.err_code, error.description)),
        None => Ok(answer.seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_is_its_sequence_or_its_error() {
        assert_eq!(
            answer_of(br#"{"stream":"S_KV","seq":42,"batch":"b","count":3}"#),
            Ok(42)
        );
        assert_eq!(
            answer_of(br#"{"error":{"code":400,"err_code":10174,"description":"atomic publish is disabled"}}"#),
            Err((10174, "atomic publish is disabled".into()))
        );
    }

    #[test]
    fn a_refusal_is_classed_by_its_code_whatever_its_words() {
        let answer = |json: &str| {
            let (code, message) = answer_of(json.as_bytes()).unwrap_err();
            refused(Stage::Storing, Refusal::of(code, &message), message)
        };
        // Both of nats-server's wrong-last-sequence codes, the second without the sequence.
        for json in [
            r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"}}"#,
            r#"{"error":{"code":400,"err_code":10164,"description":"wrong last sequence"}}"#,
        ] {
            let e = answer(json);
            assert!(e.superseded() && !e.too_large(), "{e}");
        }
        for json in [
            r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#,
            r#"{"error":{"code":400,"err_code":10199,"description":"atomic publish batch is too large: 1001"}}"#,
        ] {
            let e = answer(json);
            assert!(e.too_large() && !e.superseded(), "{e}");
        }
        for json in [
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}}"#,
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages per subject exceeded"}}"#,
        ] {
            let e = answer(json);
            assert!(e.stream_full() && !e.too_large() && !e.superseded(), "{e}");
        }
        // A store that failed otherwise is not backpressure.
        let e = answer(
            r#"{"error":{"code":503,"err_code":10077,"description":"no space left on device"}}"#,
        );
        assert!(!e.stream_full(), "{e}");
        // Words alone decide nothing: a transient refusal that mentions a sequence is not a
        // lost compare-and-swap, and one without a code is nothing in particular.
        for json in [
            r#"{"error":{"code":429,"err_code":10210,"description":"atomic publish too many inflight, wrong last sequence"}}"#,
            r#"{"error":{"code":503,"description":"message size exceeds maximum allowed"}}"#,
            "not json",
        ] {
            let e = answer(json);
            assert!(!e.superseded() && !e.too_large(), "{e}");
        }
    }
}
