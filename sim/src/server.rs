//! The simulators' HTTP server loop: hyper connections that a handler can
//! drop unanswered (the `drop_connections` fault) and that drain within a
//! grace period at shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::service::{service_fn, Service as _};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// How long `shutdown` lets in-flight requests finish before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Lets a request handler close its own connection without answering
/// (a request extension).
#[derive(Clone)]
pub(crate) struct ConnectionKill(Arc<Notify>);

impl ConnectionKill {
    /// Drops the connection the request came on, unanswered.
    pub(crate) fn kill(&self) {
        self.0.notify_one();
    }
}

/// Serves `router` until `shutdown` changes (a send or a dropped sender);
/// `name` says which simulator in the logs.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    name: &'static str,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    debug!(%peer, "{name} simulator accepted a connection");
                    connections.spawn(serve_connection(stream, router.clone(), shutdown.clone(), name));
                }
                Err(error) => {
                    // Typically EMFILE; give connections a moment to close.
                    warn!(%error, "{name} simulator failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // A send or a dropped simulator handle: stop either way.
            _ = shutdown.changed() => break,
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    debug!("{name} simulator stopped");
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    name: &'static str,
) {
    let kill = Arc::new(Notify::new());
    let handle = ConnectionKill(Arc::clone(&kill));
    let tower = TowerToHyperService::new(router);
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(handle.clone());
        tower.call(request)
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%error, "{name} simulator connection ended with an error");
                }
                return;
            }
            // Returning drops the connection and with it the socket, unanswered.
            () = kill.notified() => {
                debug!("{name} simulator dropped a connection (drop_connections fault)");
                return;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
