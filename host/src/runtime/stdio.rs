//! A guest's stdout and stderr, turned into host log lines tagged with the
//! plugin's name, within the call's log budget.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use prismhook_core::text::one_line;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// What one line costs the budget beyond its text: about what the host adds
/// to it (time, level, plugin, events), so that a plugin cannot multiply
/// the host's log with empty or one-byte lines.
pub const LINE_COST: usize = 32;

/// Log output left for the current call, shared by the `log` import and the
/// guest's stdout/stderr streams; each line costs its text and [`LINE_COST`].
#[derive(Clone)]
pub struct LogBudget {
    left: Arc<AtomicI64>,
    exhausted: Arc<AtomicBool>,
}

impl LogBudget {
    pub fn new(bytes: usize) -> LogBudget {
        LogBudget {
            left: Arc::new(AtomicI64::new(bytes as i64)),
            exhausted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Takes a line of `bytes` from the budget. `Err(true)` the first time
    /// it runs out (so the host can say so once), `Err(false)` afterwards.
    pub fn take_line(&self, bytes: usize) -> Result<(), bool> {
        let bytes = bytes.saturating_add(LINE_COST);
        if self.left.fetch_sub(bytes as i64, Ordering::Relaxed) >= bytes as i64 {
            Ok(())
        } else {
            Err(!self.exhausted.swap(true, Ordering::Relaxed))
        }
    }
}

/// A call's stdout or stderr. Every handle the guest opens on it writes to
/// the one partial line, straight from the guest's write: wasmtime's
/// default stream gives each handle a task and an 8 KiB buffer, and a guest
/// may open thousands of handles in one call.
#[derive(Clone)]
pub struct GuestOutput {
    line: Arc<Line>,
}

/// How much one write may carry (`check-write`'s permit).
const WRITE_PERMIT: usize = 8 << 10;

/// The longest line kept; the rest of a longer one is dropped.
const MAX_LINE: usize = 16 << 10;

struct Line {
    plugin: String,
    /// The event ids of the call's batch, as on the `log` import's lines.
    events: Arc<str>,
    stream: &'static str,
    budget: LogBudget,
    text: Mutex<Vec<u8>>,
}

impl GuestOutput {
    pub fn new(
        plugin: &str,
        events: Arc<str>,
        stream: &'static str,
        budget: LogBudget,
    ) -> GuestOutput {
        GuestOutput {
            line: Arc::new(Line {
                plugin: plugin.to_owned(),
                events,
                stream,
                budget,
                text: Mutex::new(Vec::new()),
            }),
        }
    }

    fn write_bytes(&self, buf: &[u8]) {
        let mut text = self.line.text.lock().unwrap_or_else(|e| e.into_inner());
        for &b in buf {
            if b == b'\n' {
                self.line.emit(&mut text);
            } else if text.len() < MAX_LINE {
                text.push(b);
            }
        }
    }
}

impl Line {
    /// Logs the line so far, so one `println!` in the guest is one log
    /// event in the host.
    fn emit(&self, line: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if !text.is_empty() {
            // Charged as the log shows it: escaped control characters and
            // replaced invalid bytes take up to six times the guest's bytes.
            let shown = one_line(text);
            match self.budget.take_line(shown.len()) {
                Ok(()) => tracing::info!(
                    target: "prismhook::plugin",
                    plugin = %self.plugin,
                    events = %self.events,
                    stream = self.stream,
                    "{shown}"
                ),
                Err(true) => tracing::warn!(
                    plugin = %self.plugin,
                    events = %self.events,
                    "log budget for this call used up; further plugin output is dropped"
                ),
                Err(false) => {}
            }
        }
        line.clear();
    }
}

impl Drop for Line {
    /// The last handle (or the call's context) is gone: a line without its
    /// newline is still shown.
    fn drop(&mut self) {
        let mut text = std::mem::take(self.text.get_mut().unwrap_or_else(|e| e.into_inner()));
        self.emit(&mut text);
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_costs_its_text_and_what_the_host_adds_so_empty_lines_are_not_free() {
        let budget = LogBudget::new(3 * LINE_COST + 5);
        for _ in 0..3 {
            assert_eq!(budget.take_line(0), Ok(()));
        }
        assert_eq!(
            budget.take_line(0),
            Err(true),
            "the first line over says so"
        );
        assert_eq!(budget.take_line(0), Err(false));
    }

    #[test]
    fn a_line_costs_what_the_log_shows_of_it_escapes_and_all() {
        let budget = LogBudget::new(1000);
        let out = GuestOutput::new("p", Arc::from("1"), "stdout", budget.clone());
        let line = "\u{1}".repeat(20);
        let shown = one_line(&line).len();
        assert!(shown > line.len());
        out.write_bytes(format!("{line}\n").as_bytes());
        assert_eq!(
            budget.left.load(Ordering::Relaxed),
            (1000 - shown - LINE_COST) as i64
        );
    }

    #[test]
    fn every_handle_writes_to_one_line_shown_once_the_last_handle_is_gone() {
        let budget = LogBudget::new(1000);
        let out = GuestOutput::new("p", Arc::from("1"), "stdout", budget.clone());
        let mut handles: Vec<Box<dyn OutputStream>> = (0..3).map(|_| out.p2_stream()).collect();
        for (handle, part) in handles.iter_mut().zip(["one ", "line ", "split"]) {
            assert!(handle.check_write().unwrap() >= part.len());
            handle.write(Bytes::from(part)).unwrap();
        }
        let left = |b: &LogBudget| b.left.load(Ordering::Relaxed);
        assert_eq!(left(&budget), 1000, "nothing shown before the line ends");
        drop(handles);
        assert_eq!(left(&budget), 1000, "the context's stream still holds it");
        drop(out);
        assert_eq!(
            left(&budget),
            (1000 - "one line split".len() - LINE_COST) as i64
        );
    }
}
