//! A TCP load balancer on loopback, as an operator puts in front of hosts
//! that share one URL: each connection goes to the next backend in turn
//! that accepts it, so a dead host's share moves to the others.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Balancer {
    addr: SocketAddr,
    accepting: JoinHandle<()>,
}

impl Balancer {
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(backends);
        let turn = Arc::new(AtomicUsize::new(0));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let (backends, turn) = (backends.clone(), turn.clone());
                tokio::spawn(async move {
                    let first = turn.fetch_add(1, Ordering::Relaxed);
                    for i in 0..backends.len() {
                        let backend = backends[(first + i) % backends.len()];
                        if let Ok(mut server) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                    // No backend is up: the client sees the connection
                    // closed, as behind a balancer with no healthy member.
                });
            }
        });
        Balancer { addr, accepting }
    }

    /// `http://127.0.0.1:PORT`, the URL every host gives as its own.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
