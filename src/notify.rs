//! systemd's readiness protocol (`Type=notify`): a datagram to `$NOTIFY_SOCKET`.
//! Outside systemd the variable is unset and every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

use tracing::{debug, warn};

static SOCKET: OnceLock<Option<String>> = OnceLock::new();

/// Takes `$NOTIFY_SOCKET` out of the environment, so app processes do not inherit it.
/// Call once, before any thread is started.
pub fn init() {
    SOCKET.get_or_init(|| {
        let path = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty());
        // SAFETY-free in edition 2021; no other thread exists yet (see above).
        std::env::remove_var("NOTIFY_SOCKET");
        path
    });
}

/// Sends `state` (e.g. `READY=1`) to systemd, if rolld runs under it.
pub fn notify(state: &str) {
    let Some(Some(path)) = SOCKET.get() else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &addr)
        }
        None => socket.send_to(state.as_bytes(), path),
    });
    match result {
        Ok(_) => debug!("sd_notify {}", state.replace('\n', " ")),
        Err(e) => warn!("cannot notify systemd at {path}: {e}"),
    }
}

/// `RELOADING=1` with the monotonic timestamp newer systemd versions ask for.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
