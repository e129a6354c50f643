//! Following a stream for as long as a handle lives: the ledger's fold and the plugins' kv
//! mirror both read every message of their stream in order, from the start and then live.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

/// How long a follower may lag behind a write this host has had acknowledged before it is
/// restarted.
const STALL: Duration = Duration::from_secs(2);

/// Restarts the followers of one connection's streams: after a reconnect, and when one has
/// fallen behind a write this host had acknowledged. The second happens when the server holding
/// a follower's consumer dies while this host's connection is to another one: nothing tells the
/// client but missed heartbeats, seconds later.
#[derive(Debug, Default)]
pub(super) struct Restarts {
    count: watch::Sender<u64>,
    last_stall: Mutex<Option<Instant>>,
}

impl Restarts {
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.count.subscribe()
    }

    pub fn restart(&self) {
        self.count.send_modify(|n| *n += 1);
    }

    /// Restarts for a stall, at most once per [`STALL`] whoever notices it.
    pub fn stalled(&self, what: &str, seq: u64) {
        let mut last = self.last_stall.lock().expect("restart lock poisoned");
        if last.is_none_or(|at| at.elapsed() >= STALL) {
            *last = Some(Instant::now());
            warn!(
                what,
                seq, "following the stream again: it fell behind a stored write"
            );
            self.restart();
        }
    }
}

/// Waits until `applied` reaches `seq`, restarting the followers while it stalls; gives up
/// after `limit` (never, if `None`). `false` when it gave up or the follower is gone.
pub(super) async fn reached(
    what: &str,
    applied: &watch::Sender<u64>,
    seq: u64,
    restarts: &Restarts,
    limit: Option<Duration>,
) -> bool {
    let started = Instant::now();
    let mut applied = applied.subscribe();
    loop {
        let wait = limit.map_or(STALL, |l| l.saturating_sub(started.elapsed()).min(STALL));
        match tokio::time::timeout(wait, applied.wait_for(|&at| at >= seq)).await {
            Ok(done) => return done.is_ok(),
            Err(_) if limit.is_some_and(|l| started.elapsed() >= l) => return false,
            Err(_) => restarts.stalled(what, seq),
        }
    }
}

/// What a stream is folded into.
pub(super) trait Fold: Send + Sync + 'static {
    /// The highest sequence folded in so far; following resumes after it.
    fn applied(&self) -> u64;

    fn fold(&self, seq: u64, subject: &str, headers: Option<&HeaderMap>, payload: &[u8]);
}

/// Reads `filter` of `stream` into `into` until aborted. Reports on `ready` once it has caught
/// up with what the stream held when it started. Starts again whenever `restarts` changes.
pub(super) async fn follow(
    what: &'static str,
    stream: stream::Stream,
    filter: String,
    into: Arc<dyn Fold>,
    mut reconnects: watch::Receiver<u64>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        let mut pause = true;
        reconnects.borrow_and_update();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: into.applied() + 1,
                },
                ..Default::default()
            })
            .await;
        let messages = match consumer {
            Ok(consumer) => {
                let caught_up = consumer.cached_info().num_pending == 0;
                let messages = consumer.messages().await.map_err(|e| e.to_string());
                if caught_up && messages.is_ok() {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                messages
            }
            Err(e) => Err(e.to_string()),
        };
        match messages {
            Ok(mut messages) => loop {
                // An ordered consumer lives on the server it was made on; after a reconnect it
                // is followed again from where the fold stands, rather than after its missed
                // heartbeats.
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = reconnects.changed() => {
                        info!(what, "following the stream again");
                        break;
                    }
                };
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        warn!(what, %error, "the view of the stream was interrupted; resuming");
                        break;
                    }
                    None => break,
                };
                let Ok(info) = message.info() else {
                    warn!(what, subject = %message.subject, "skipping a message without stream metadata");
                    continue;
                };
                let (seq, pending) = (info.stream_sequence, info.pending);
                if seq <= into.applied() {
                    // The client recreated the consumer from the start of the stream: it does
                    // that for an ordered consumer whose server went away before it delivered
                    // anything (async-nats 0.51 recreates one that has seen no message with
                    // `DeliverPolicy::All`, whatever it was made with). Folded again, old events
                    // would be pending once more until their marks came round, and be delivered
                    // again after newer ones. Followed again, at once, from where the fold is.
                    info!(
                        what,
                        seq,
                        applied = into.applied(),
                        "the stream came again from an earlier message; following it from where the fold is"
                    );
                    pause = false;
                    break;
                }
                into.fold(
                    seq,
                    &message.subject,
                    message.headers.as_ref(),
                    &message.payload,
                );
                if pending == 0 {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
            },
            Err(error) => warn!(what, error, "cannot follow the stream; retrying"),
        }
        if pause {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU64, Ordering};

    use async_nats::jetstream;

    /// Remembers the sequences folded in, as the ledger's fold and the kv mirror do.
    #[derive(Default)]
    struct Seen {
        folded: Mutex<Vec<u64>>,
        applied: AtomicU64,
    }

    impl Fold for Seen {
        fn applied(&self) -> u64 {
            self.applied.load(Ordering::SeqCst)
        }

        fn fold(&self, seq: u64, _: &str, _: Option<&HeaderMap>, _: &[u8]) {
            self.folded.lock().unwrap().push(seq);
            self.applied.fetch_max(seq, Ordering::SeqCst);
        }
    }

    async fn consumers(stream: &stream::Stream) -> Vec<String> {
        let names: Vec<_> = stream.consumer_names().collect().await;
        names.into_iter().map(Result::unwrap).collect()
    }

    /// The client recreates a follower's consumer from the start of the stream when its server
    /// drops it before it delivered anything: what was folded is not folded a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_recreated_from_the_start_folds_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let client = async_nats::connect(nats.urls().join(",")).await.unwrap();
        let js = jetstream::new(client);
        let stream = js
            .create_stream(stream::Config {
                name: "S".into(),
                subjects: vec!["s.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        for n in 1..=5 {
            js.publish(format!("s.{n}"), "old".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        // Everything stored so far is folded already, as by a follower before this one.
        let seen = Arc::new(Seen::default());
        seen.applied.store(5, Ordering::SeqCst);
        let (ready_tx, ready) = oneshot::channel();
        let restarts = Restarts::default();
        let follower = tokio::spawn(follow(
            "test",
            stream.clone(),
            "s.>".into(),
            seen.clone(),
            restarts.subscribe(),
            ready_tx,
        ));
        ready.await.unwrap();

        // Its consumer goes, as with the server it lived on; the client makes a new one.
        let names = consumers(&stream).await;
        assert_eq!(names.len(), 1, "{names:?}");
        stream.delete_consumer(&names[0]).await.unwrap();
        let recreated = Instant::now();
        loop {
            if consumers(&stream).await.iter().any(|n| *n != names[0]) {
                break;
            }
            // The client learns of the deletion from the pull in flight,
            // or else from two missed heartbeats (10 s), or when that pull
            // expires (30 s): a CI run under load once took past 30 s.
            assert!(
                recreated.elapsed() < Duration::from_secs(75),
                "no new consumer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        js.publish("s.6", "new".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while seen.applied() < 6 {
            assert!(Instant::now() < until, "message 6 not folded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        follower.abort();
        assert_eq!(*seen.folded.lock().unwrap(), [6]);
    }
}
