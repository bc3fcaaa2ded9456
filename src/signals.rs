//! Signals become [`Command`]s here; no other module sees a signal number.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::info;

/// What an operator can ask of a running rolld.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Roll to a new generation (SIGHUP).
    Roll,
    /// Stop gracefully (SIGTERM, SIGINT); a second one stops at once.
    Shutdown,
    /// Reopen child log files (SIGUSR1), after log rotation.
    ReopenLogs,
}

/// Installs the handlers and forwards each signal as a command.
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Command>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, command, name) in [
        (SignalKind::hangup(), Command::Roll, "SIGHUP"),
        (SignalKind::terminate(), Command::Shutdown, "SIGTERM"),
        (SignalKind::interrupt(), Command::Shutdown, "SIGINT"),
        (SignalKind::user_defined1(), Command::ReopenLogs, "SIGUSR1"),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!("received {name}");
                if tx.send(command).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}
