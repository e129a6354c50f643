//! The real `prismhook` binary as a child process, for tests that need a
//! process of its own: killing it, or measuring its memory.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `prismhook` binary running `run --config`, killed if the test ends
/// early.
pub struct HostProcess {
    child: Option<Child>,
}

impl HostProcess {
    pub fn spawn(config: &Path, log: &Path) -> HostProcess {
        HostProcess::spawn_with_env(config, log, &[])
    }

    /// [`HostProcess::spawn`] with these environment variables set.
    pub fn spawn_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> HostProcess {
        HostProcess::spawn_command(
            config,
            log,
            env,
            Command::new(env!("CARGO_BIN_EXE_prismhook")),
        )
    }

    /// [`HostProcess::spawn`] with the files it writes held to `bytes`
    /// (`ulimit -f`): a write past that fails, as on a full disk.
    pub fn spawn_with_file_size_limit(config: &Path, log: &Path, bytes: u64) -> HostProcess {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(env!("CARGO_BIN_EXE_prismhook"));
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        HostProcess::spawn_command(config, log, &[], command)
    }

    fn spawn_command(
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
        mut command: Command,
    ) -> HostProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("PRISMHOOK_LOG", "info,wasmtime=warn,cranelift=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting target/debug/prismhook");
        HostProcess { child: Some(child) }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().unwrap()
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.exited() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub async fn sigkill(&mut self) {
        let _ = self.child().kill();
        let status = self
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("SIGKILL ends the host");
        assert!(!status.success());
    }

    /// SIGTERM: the host stops accepting, finishes batches in hand and exits.
    pub async fn sigterm(&mut self) -> ExitStatus {
        let pid = self.child().id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM {pid}");
        match self.wait_exit(Duration::from_secs(30)).await {
            Some(status) => status,
            None => panic!("the host did not stop within 30 s of SIGTERM"),
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub async fn wait_ready(host: &mut HostProcess, port: u16, log: &Path) {
    wait_ready_within(host, port, log, Duration::from_secs(30)).await
}

/// [`wait_ready`], for up to `limit`.
pub async fn wait_ready_within(host: &mut HostProcess, port: u16, log: &Path, limit: Duration) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = host.exited() {
            panic!(
                "the host exited while starting ({status}); its log ends:\n{}",
                log_tail(log)
            );
        }
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < until,
            "the host did not answer /healthz within {limit:?}; log:\n{}",
            log_tail(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
