//! The service manager's readiness protocol (`sd_notify(3)`), so that
//! `systemctl start` returns once the listener accepts and the plugins are
//! loaded (`Type=notify`), `systemctl reload` once a reload is done
//! (`Type=notify-reload`, systemd 253), and the manager knows a stop is
//! under way. Datagrams to the socket `NOTIFY_SOCKET` names; without it,
//! as under any other supervisor, every call does nothing.

use std::os::unix::net::UnixDatagram;

/// The host is serving (again, after a reload).
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// A reload begins; [`ready`] ends it.
pub fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// Shutdown begins.
pub fn stopping() {
    notify("STOPPING=1");
}

fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = target.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket: no file, a name in the kernel.
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            _ => socket.send_to(state.as_bytes(), &target),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(socket = ?target, "telling the service manager `{}` failed: {e}", state.lines().next().unwrap_or_default());
    }
}

/// `CLOCK_MONOTONIC` in microseconds, which systemd matches a reload's
/// messages by.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
}
