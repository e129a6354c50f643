//! Serving HTTP on a socket that hostile peers can reach.
//!
//! `axum::serve` runs connections without a timer, so a peer that opens a
//! connection and never finishes its request head (slowloris), or never
//! finishes a TLS handshake, holds a socket, a task and up to ~400 KB of
//! buffer forever; enough of them exhaust the process's file descriptors
//! and no notification gets through. Both the listener and the admin API are
//! served by [`serve`] instead, which bounds every stage before a request
//! reaches a handler:
//!
//! - at most [`ServeLimits::max_connections`] connections at once. A peer
//!   that comes while they are all held has the oldest connection of the
//!   peer holding the most asked to close (after the request it is serving,
//!   if any), as nginx drains idle keep-alive connections when it runs out:
//!   else a few peers each holding their share with a request every few
//!   seconds would keep everyone else, Prism included, out for good. Until
//!   a slot frees, that one peer waits accepted, the rest in the kernel's
//!   accept queue;
//! - at most [`ServeLimits::max_connections_per_peer`] of them from one
//!   peer (an IPv4 address, an IPv6 /64): more from it are closed as they
//!   are accepted, so that one host cannot hold every slot and starve
//!   Prism;
//! - the TLS handshake within [`ServeLimits::tls_handshake_timeout`];
//! - each request head within [`ServeLimits::header_read_timeout`], counted
//!   from the moment the connection is idle (hyper starts the same timer
//!   between requests, so it also closes idle keep-alive connections);
//! - at most [`ServeLimits::max_header_bytes`] of buffered head per
//!   connection (431 beyond), so the memory held before authentication is
//!   at most connections × that;
//! - HTTP/1.1 only (over TLS too: ALPN offers nothing else), so every
//!   connection is under the head timer;
//! - an answer's bytes taken by the peer within
//!   [`ServeLimits::write_stall_timeout`] of each other ([`StallGuard`]):
//!   hyper reads no further request while an answer is unsent, so a peer
//!   that pipelines requests and never reads the answers (slow read) would
//!   otherwise hold its connection, out of every timer's reach, forever.
//!
//! Bodies are bounded by the handlers, which know whether the sender is
//! authenticated, with [`read_body`] (size and deadline). At shutdown,
//! requests in flight get [`DRAIN`] to finish; the connections still open
//! then are closed.

pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Sleep;

use prismhook_core::text::LogThrottle;

/// How long in-flight requests may take to finish once shutdown begins.
pub const DRAIN: Duration = Duration::from_secs(10);

pub use prismhook_core::config::{ServeLimits, MIN_HEADER_BYTES};

/// Serves `router` on `tcp` (over TLS when `tls` is given) within `limits`
/// until `shutdown` resolves, then lets in-flight requests finish for a
/// while. `name` says which socket in the logs; `stats` counts what the
/// limits turned away, for metrics.
pub async fn serve(
    name: &'static str,
    tcp: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ServeLimits,
    stats: Arc<ServeStats>,
    shutdown: impl Future<Output = ()>,
) {
    // HTTP/1.1 only: Prism, the CLI and browsers on the status page all
    // speak it, and hyper's HTTP/2 server has no timer for a connection
    // that sends its preface and then idles, which would hold a slot of the
    // connection cap forever.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
    let builder = Arc::new(builder);
    let max_connections = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max_connections));
    let peers = Peers::new(limits.max_connections_per_peer);
    // Asks every connection to finish its request and close, at shutdown.
    let (draining, drain) = watch::channel(false);
    // Ends the connections still open when the drain is over: dropped,
    // their sockets close, and nothing of them outlives `serve`.
    let (closing, closed) = watch::channel(false);
    let full = LogThrottle::new(1, REFUSALS_LOGGED_EVERY);
    tokio::pin!(shutdown);
    'accepting: loop {
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: retrying at once would spin.
                    tracing::warn!(socket = name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(mut slot) = peers.take(peer.ip()) else {
            stats.refused_per_peer.fetch_add(1, Ordering::Relaxed);
            peers.refused(name, peer.ip());
            drop(stream);
            continue;
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => loop {
                // Every slot held and someone waiting: the oldest
                // connection of the peer holding the most is asked to
                // close, and another a while later if that frees nothing
                // (a request it serves can take its time).
                if let Some(from) = peers.evict_one() {
                    stats.evicted.fetch_add(1, Ordering::Relaxed);
                    if let Some(unlogged) = full.admit() {
                        tracing::warn!(
                            socket = name,
                            max_connections,
                            peer = %from,
                            times_unlogged = unlogged,
                            "every connection is held: closing the oldest of the peer holding the most for a new one"
                        );
                    }
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => break p.expect("the semaphore is never closed"),
                    () = tokio::time::sleep(EVICTION_PATIENCE) => {}
                    () = &mut shutdown => break 'accepting,
                }
            },
        };
        let evict = peers.evictable(&mut slot);
        let _ = stream.set_nodelay(true);
        // Under TLS too, so that the handshake's and every record's bytes
        // are held to the same limit.
        let stream = StallGuard::new(stream, limits.write_stall_timeout);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let tls = tls.clone();
        let ends = Ends {
            evict,
            drain: drain.clone(),
        };
        let connection = async move {
            match tls {
                None => drive(name, peer, &builder, ends, stream, service).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    let stream =
                        match tokio::time::timeout(limits.tls_handshake_timeout, handshake).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(socket = name, %peer, "TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(socket = name, %peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    drive(name, peer, &builder, ends, stream, service).await;
                }
            }
        };
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            tokio::select! {
                () = connection => {}
                _ = closed.wait_for(|c| *c) => {}
            }
        });
    }
    drop(tcp);
    let _ = draining.send(true);
    // Every connection gives its permit back as it ends.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            socket = name,
            "requests still in flight after {DRAIN:?}; closing them"
        );
    }
    let _ = closing.send(true);
}

/// How long a new peer waits for the connection it had closed before
/// another is asked to close.
const EVICTION_PATIENCE: Duration = Duration::from_secs(1);

/// Why a request's body could not be had whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    /// The peer went away or broke the chunked framing.
    #[error("the body could not be read: {0}")]
    Broken(axum::Error),
    #[error("the body did not arrive within {}s", .0.as_secs_f64())]
    Late(Duration),
}

impl BodyError {
    /// The answer it calls for: 413, 400 or 408.
    pub fn status(&self) -> http::StatusCode {
        match self {
            BodyError::TooLarge(_) => http::StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Broken(_) => http::StatusCode::BAD_REQUEST,
            BodyError::Late(_) => http::StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// `body`, whole, if it holds at most `max` bytes and arrives within
/// `timeout`: once its head is read, hyper times nothing of a request, and
/// a peer that announces a body and sends none would hold its connection
/// slot for as long as it likes.
pub async fn read_body(
    body: axum::body::Body,
    max: usize,
    timeout: Duration,
) -> Result<axum::body::Bytes, BodyError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if over_limit(&e) => Err(BodyError::TooLarge(max)),
        Ok(Err(e)) => Err(BodyError::Broken(e)),
        Err(_) => Err(BodyError::Late(timeout)),
    }
}

/// Whether reading a body failed because it passed the cap, rather than
/// because the peer broke off.
fn over_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// What [`serve`] turned away.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections closed as they came, their peer holding
    /// [`ServeLimits::max_connections_per_peer`] already.
    pub refused_per_peer: AtomicU64,
    /// Connections asked to close for a new peer, every slot of
    /// [`ServeLimits::max_connections`] being held.
    pub evicted: AtomicU64,
}

/// Connections held per peer, against
/// [`ServeLimits::max_connections_per_peer`], and which of them to close
/// when a new peer finds every slot held. A peer is an IPv4 address or an
/// IPv6 /64, which one host commonly holds whole.
struct Peers {
    max: usize,
    held: Held,
    /// Numbers the connections in the order they were accepted.
    next: AtomicU64,
    /// At most one line a minute, whatever a peer does.
    refusals: LogThrottle,
}

/// One connection's place in [`Peers`], given back when dropped.
struct PeerSlot {
    peer: IpAddr,
    /// Its number, once it may be asked to close.
    number: Option<u64>,
    held: Held,
}

/// One peer's connections.
#[derive(Default)]
struct PeerConnections {
    count: usize,
    /// Those that may be asked to close, oldest first, each with what asks.
    closable: std::collections::BTreeMap<u64, Arc<Notify>>,
}

/// Connections held, by peer.
type Held = Arc<std::sync::Mutex<HashMap<IpAddr, PeerConnections>>>;

/// The counts, whatever a panic elsewhere left them as: a count is never
/// half-updated.
fn lock_held(held: &Held) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerConnections>> {
    held.lock().unwrap_or_else(|e| e.into_inner())
}

impl Peers {
    fn new(max: usize) -> Peers {
        Peers {
            max,
            held: Arc::default(),
            next: AtomicU64::new(0),
            refusals: LogThrottle::new(1, REFUSALS_LOGGED_EVERY),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerConnections>> {
        lock_held(&self.held)
    }

    /// A slot for a connection from `ip`, or `None` when its peer holds
    /// the most it may (`max_connections_per_peer`, 0 = no cap).
    fn take(&self, ip: IpAddr) -> Option<PeerSlot> {
        let peer = peer_of(ip);
        let mut held = self.lock();
        let connections = held.entry(peer).or_default();
        if self.max > 0 && connections.count >= self.max {
            return None;
        }
        connections.count += 1;
        Some(PeerSlot {
            peer,
            number: None,
            held: self.held.clone(),
        })
    }

    /// Lets `slot`'s connection be asked to close from now on: what asks.
    fn evictable(&self, slot: &mut PeerSlot) -> Arc<Notify> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let ask = Arc::new(Notify::new());
        if let Some(connections) = self.lock().get_mut(&slot.peer) {
            connections.closable.insert(number, ask.clone());
        }
        slot.number = Some(number);
        ask
    }

    /// Asks the oldest connection of the peer holding the most to close;
    /// that peer, or `None` when no connection is left to ask.
    fn evict_one(&self) -> Option<IpAddr> {
        let mut held = self.lock();
        let (peer, connections) = held
            .iter_mut()
            .filter(|(_, c)| !c.closable.is_empty())
            .max_by_key(|(_, c)| c.count)?;
        let (_, ask) = connections.closable.pop_first()?;
        // Stored when the connection is not yet waiting for it (still in
        // its TLS handshake): it closes as soon as it serves.
        ask.notify_one();
        Some(*peer)
    }

    fn refused(&self, socket: &'static str, ip: IpAddr) {
        let Some(held_back) = self.refusals.admit() else {
            return;
        };
        tracing::warn!(
            socket,
            peer = %peer_of(ip),
            max_connections_per_peer = self.max,
            refused = held_back + 1,
            "a peer holds the most connections it may; closing the ones it opens beyond (refused counts those since the last such line)"
        );
    }
}

const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(60);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = lock_held(&self.held);
        if let Some(connections) = held.get_mut(&self.peer) {
            connections.count -= 1;
            if let Some(number) = self.number {
                connections.closable.remove(&number);
            }
            if connections.count == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// The peer an address belongs to: an IPv4 address (an IPv4-mapped IPv6
/// address is one), or the /64 of an IPv6 address.
fn peer_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

type Service = hyper_util::service::TowerToHyperService<Router>;

/// What asks one connection to close: [`Peers::evict_one`], or the
/// server's shutdown.
struct Ends {
    evict: Arc<Notify>,
    drain: watch::Receiver<bool>,
}

/// Serves one connection until it ends; asked to close, it finishes the
/// request it serves (answered with `Connection: close`), or closes at once
/// between requests.
async fn drive<S>(
    name: &'static str,
    peer: std::net::SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    mut ends: Ends,
    stream: S,
    service: Service,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut asked = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(socket = name, %peer, "connection ended: {e}");
                }
                return;
            }
            () = ends.evict.notified(), if !asked => {
                tracing::debug!(socket = name, %peer, "closing a connection for a new peer");
                asked = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = ends.drain.wait_for(|d| *d), if !asked => {
                asked = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A socket whose writes fail once the peer has taken none of their bytes
/// for `limit`: the connection then ends like one the peer reset. Reads are
/// passed through (hyper's head timer and the handlers' body deadlines
/// bound them).
pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    /// Armed by the first write that found the socket full, disarmed by
    /// any write that makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// What a write that found the socket full returns: still pending, or
    /// the error that ends the connection once the peer has stalled for
    /// longer than the limit.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer took no bytes of the answer for {limit:?}"),
            ))),
        }
    }

    fn progress<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(result, cx)
    }
}

/// The TLS acceptor for a PEM certificate chain and key, which serves a
/// renewed pair once its files change ([`tls`]).
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = tls::CertFiles::load(cert, key, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(files));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Caps glibc's malloc arenas at two per core, where glibc's default is
/// eight per core. Each thread that allocates in bursts (the tokio workers,
/// the ledger's writer, the blocking threads plugin calls and kv commits
/// run on) otherwise grows an arena of its own, and glibc gives back little
/// of what is freed inside one: under 1,000 notifications/s the host's
/// peak was about 20 MiB higher. One per core saved more, but then the
/// ledger's writer waited on the listener's arena locks and durable
/// accepts fell by a fifth (BENCHMARKS.md, Memory). Two per core costs
/// about as much when the listener is saturated (same section): the cap
/// buys the memory target, and an operator with memory to spare can set
/// `MALLOC_ARENA_MAX` to glibc's eight per core. An operator's own
/// `GLIBC_TUNABLES` or `MALLOC_ARENA_MAX` setting wins. Call it before the
/// runtime's threads start.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn bound_malloc_arenas() {
    let set_by_operator = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"))
        || std::env::var_os("MALLOC_ARENA_MAX").is_some();
    if set_by_operator {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = libc::c_int::try_from(2 * cores).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets one of malloc's parameters.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } == 0 {
        tracing::debug!(arenas, "glibc refused a cap on malloc arenas");
    }
}

/// Other C libraries keep their own allocators' defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn bound_malloc_arenas() {}

/// Raises the soft limit on open files to the hard limit, so that the
/// connection cap, not the descriptor limit, is what peers run into. Says
/// what it did; a failure only costs headroom.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(
            "cannot read the open-files limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        tracing::info!(limit = limit.rlim_cur, "open-files limit");
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::info!(
            from = soft,
            to = limit.rlim_max,
            "raised the open-files limit to its hard limit"
        );
    } else {
        tracing::warn!(
            limit = soft,
            "cannot raise the open-files limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A write past the file-size limit (`ulimit -f`, `LimitFSIZE=`) then
/// fails with EFBIG, which the ledger reports and stops on, instead of
/// SIGXFSZ killing the process mid-write with its default action.
pub fn fail_writes_past_the_file_size_limit() {
    // SAFETY: setting a signal's disposition to "ignore" runs no code of
    // ours in a handler.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let peer = |s: &str| peer_of(s.parse().unwrap()).to_string();
        assert_eq!(peer("192.0.2.7"), "192.0.2.7");
        assert_eq!(peer("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(peer("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(peer("2001:db8:1:2::1"), peer("2001:db8:1:2:ffff::9"));
        assert_ne!(peer("2001:db8:1:2::1"), peer("2001:db8:1:3::1"));
    }

    #[test]
    fn a_peer_gets_its_slots_back_as_its_connections_end() {
        let peers = Peers::new(2);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let (a, b) = (peers.take(ip).unwrap(), peers.take(ip).unwrap());
        assert!(peers.take(ip).is_none());
        assert!(peers.take("192.0.2.8".parse().unwrap()).is_some());
        drop(a);
        let c = peers.take(ip).unwrap();
        drop((b, c));
        assert!(peers.held.lock().unwrap().is_empty());
        let uncapped = Peers::new(0);
        let slots: Vec<Option<PeerSlot>> = (0..1000).map(|_| uncapped.take(ip)).collect();
        assert!(slots.iter().all(Option::is_some));
        drop(slots);
        assert!(uncapped.held.lock().unwrap().is_empty());
    }

    #[test]
    fn the_peer_holding_the_most_is_asked_to_close_its_oldest_connection_first() {
        let peers = Peers::new(0);
        let (one, many): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.9".parse().unwrap());
        let open = |ip: IpAddr| {
            let mut slot = peers.take(ip).unwrap();
            let ask = peers.evictable(&mut slot);
            (slot, ask)
        };
        let lone = open(one);
        let oldest = open(many);
        let next = open(many);
        let asked = |ask: &Arc<Notify>| {
            let waiting = ask.notified();
            tokio::pin!(waiting);
            // A stored notification makes the first poll ready.
            waiting.as_mut().enable()
        };
        assert_eq!(peers.evict_one(), Some(many));
        assert!(asked(&oldest.1) && !asked(&next.1) && !asked(&lone.1));
        // Asked once only: then the next of the same peer, which still
        // holds as many (the first has not closed yet).
        assert_eq!(peers.evict_one(), Some(many));
        assert!(asked(&next.1));
        drop((oldest, next));
        assert_eq!(peers.evict_one(), Some(one));
        assert!(asked(&lone.1));
        assert_eq!(peers.evict_one(), None, "nothing left to ask");
        drop(lone);
        assert!(peers.held.lock().unwrap().is_empty());
    }
}
