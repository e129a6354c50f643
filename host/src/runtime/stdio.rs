//! A guest's stdout and stderr, turned into host log lines tagged with the
//! plugin's name, within the call's log budget.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use prismhook_core::text::one_line;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

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

#[derive(Clone)]
pub struct GuestOutput {
    plugin: String,
    /// The event ids of the call's batch, as on the `log` import's lines.
    events: Arc<str>,
    stream: &'static str,
    budget: LogBudget,
}

impl GuestOutput {
    pub fn new(
        plugin: &str,
        events: Arc<str>,
        stream: &'static str,
        budget: LogBudget,
    ) -> GuestOutput {
        GuestOutput {
            plugin: plugin.to_owned(),
            events,
            stream,
            budget,
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            out: self.clone(),
            line: Vec::new(),
        })
    }
}

/// Buffers a partial line until its newline, so one `println!` in the guest
/// is one log event in the host.
struct LineWriter {
    out: GuestOutput,
    line: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end();
        if !text.is_empty() {
            // Charged as the log shows it: escaped control characters and
            // replaced invalid bytes take up to six times the guest's bytes.
            let shown = one_line(text);
            match self.out.budget.take_line(shown.len()) {
                Ok(()) => tracing::info!(
                    target: "prismhook::plugin",
                    plugin = %self.out.plugin,
                    events = %self.out.events,
                    stream = self.out.stream,
                    "{shown}"
                ),
                Err(true) => tracing::warn!(
                    plugin = %self.out.plugin,
                    events = %self.out.events,
                    "log budget for this call used up; further plugin output is dropped"
                ),
                Err(false) => {}
            }
        }
        self.line.clear();
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        for &b in buf {
            if b == b'\n' {
                self.emit();
            } else if self.line.len() < 16 << 10 {
                self.line.push(b);
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.emit();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.emit();
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
        let mut writer = LineWriter {
            out,
            line: line.into_bytes(),
        };
        writer.emit();
        assert_eq!(
            budget.left.load(Ordering::Relaxed),
            (1000 - shown - LINE_COST) as i64
        );
    }
}
