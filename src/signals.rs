//! Signals become [`Command`]s here; no other module sees a signal number.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::rollout::Decision;
use tracing::info;

/// What an operator can ask of a running rolld.
#[derive(Debug)]
pub enum Command {
    /// Roll to a new generation (SIGHUP, `rolld reload`). A watcher hears the roll's
    /// progress and outcome.
    Roll { watcher: Option<Watcher> },
    /// Stop gracefully (SIGTERM, SIGINT, `rolld stop`). A second *signal* during the
    /// shutdown stops at once; `rolld stop` never does, so a repeated `rolld stop`, or
    /// `rolld stop` followed by systemd's SIGTERM, keeps the shutdown graceful.
    Shutdown(StopFrom),
    /// Reopen child log files (SIGUSR1), after log rotation.
    ReopenLogs,
    /// End a canary or bake (`rolld promote`, `rolld rollback`); the reply says what
    /// was done, or why nothing was.
    Rollout {
        decision: Decision,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Who asked for a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopFrom {
    /// SIGTERM or SIGINT: a person or a service manager.
    Signal,
    /// `rolld stop` over the control socket.
    Control,
}

/// Where a roll reports to whoever asked for it (`rolld reload`).
pub type Watcher = mpsc::UnboundedSender<RollEvent>;

#[derive(Debug, Clone)]
pub enum RollEvent {
    Progress(String),
    Done { ok: bool, message: String },
}

#[derive(Clone, Copy)]
enum Kind {
    Roll,
    Shutdown,
    ReopenLogs,
}

/// Installs the handlers and forwards each signal as a command. The sender is for other
/// sources of commands (the control socket).
pub fn listen() -> std::io::Result<(
    mpsc::UnboundedSender<Command>,
    mpsc::UnboundedReceiver<Command>,
)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, command, name) in [
        (SignalKind::hangup(), Kind::Roll, "SIGHUP"),
        (SignalKind::terminate(), Kind::Shutdown, "SIGTERM"),
        (SignalKind::interrupt(), Kind::Shutdown, "SIGINT"),
        (SignalKind::user_defined1(), Kind::ReopenLogs, "SIGUSR1"),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!("received {name}");
                let command = match command {
                    Kind::Roll => Command::Roll { watcher: None },
                    Kind::Shutdown => Command::Shutdown(StopFrom::Signal),
                    Kind::ReopenLogs => Command::ReopenLogs,
                };
                if tx.send(command).is_err() {
                    return;
                }
            }
        });
    }
    Ok((tx, rx))
}
