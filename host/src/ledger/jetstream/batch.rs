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
}

impl BatchError {
    /// Whether JetStream refused the batch because a message's subject had moved on from the
    /// sequence it expected (`Nats-Expected-Last-Subject-Sequence`): someone else wrote it first.
    pub fn superseded(&self) -> bool {
        self.stage == Stage::Storing && self.message.contains("wrong last sequence")
    }

    /// Whether a message or the batch was over a size limit: the servers' `max_payload`,
    /// which the client checks before sending, a stream's largest message (error 10054), or
    /// the servers' largest atomic batch (10199). Sent again, it would be refused again.
    pub fn too_large(&self) -> bool {
        let m = &self.message;
        (self.stage == Stage::Sending && m.contains("Payload size limit"))
            || (self.stage == Stage::Storing
                && (m.contains("message size exceeds maximum")
                    || m.contains("atomic publish batch is too large")))
    }
}

fn failed(stage: Stage, message: impl std::fmt::Display) -> BatchError {
    BatchError {
        stage,
        message: message.to_string(),
    }
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
            .map_err(|e| failed(Stage::Sending, e))?
            .await
            .map_err(|e| failed(Stage::Storing, e))?;
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
            .map_err(|e| failed(Stage::Sending, e))?;
            if !answer.payload.is_empty() {
                sequence = answer_of(&answer.payload).map_err(|e| failed(Stage::Storing, e))?;
            }
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| failed(Stage::Sending, e))?;
        }
    }
    Ok(sequence)
}

/// Reads JetStream's answer to a batch message: the sequence stored, or its error.
fn answer_of(payload: &[u8]) -> Result<u64, String> {
    #[derive(Deserialize)]
    struct ApiError {
        description: String,
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        seq: u64,
        error: Option<ApiError>,
    }
    let answer: Answer = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    match answer.error {
        Some(error) => Err(error.description),
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
            Err("atomic publish is disabled".into())
        );
    }
}
