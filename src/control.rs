//! The control socket: `rolld reload`, `status`, `stop`, `promote` and `rollback` talk to a running
//! rolld over a Unix socket, one JSON object per line.
//!
//! The server side turns requests into the same [`Command`]s as signals, with a channel
//! on which a reload's progress and outcome come back; the client side is what the CLI
//! runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::rollout::Decision;
use crate::signals::{Command, RollEvent, StopFrom};
use crate::status::{Board, Snapshot};

/// A request from the CLI.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Reload {
        wait: bool,
    },
    Status,
    Stop,
    /// End the canary or bake in progress for the new set.
    Promote,
    /// Switch back to the old set during a canary or bake.
    Rollback,
}

/// One line of an answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Answer {
    /// A roll was asked for; with `--no-wait` that is all.
    Accepted,
    Progress {
        message: String,
    },
    Done {
        ok: bool,
        message: String,
    },
    Status {
        status: Box<Snapshot>,
    },
    Error {
        message: String,
    },
}

/// The bound socket; its file is removed when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another rolld is running with control socket {0} (stop it first, or set `control_socket` to another path)")]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ControlSocket {
    /// Binds `path` with mode 0600. A socket file left by a rolld that died is replaced;
    /// one that a live rolld answers on is not.
    pub fn bind(path: &Path) -> Result<ControlSocket, SocketError> {
        let io = |source| SocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io(std::io::Error::other(
                    "the path exists and is not a socket; rolld will not replace it",
                )));
            }
            match StdUnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    info!(path = %path.display(), "replacing the stale control socket of a rolld that is gone");
                    std::fs::remove_file(path).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        }
        // Nobody else may connect: the socket is created 0600 by `bind` itself (umask;
        // no other thread creates files yet), not chmod-ed afterwards through a path that
        // could by then name something else.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            listener: Some(listener),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the socket to `chown` before privileges are dropped, so rolld can still
    /// remove it at exit.
    pub fn chown(&self, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> nix::Result<()> {
        // A socket cannot be opened, so no fchown; at least never through a symlink.
        nix::unistd::fchownat(
            None,
            &self.path,
            Some(uid),
            Some(gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }

    /// Serves requests until the runtime stops.
    pub fn serve(
        &mut self,
        commands: mpsc::UnboundedSender<Command>,
        board: Arc<Board>,
        upstreams: Option<Arc<rolld_proxy::Upstreams>>,
    ) -> std::io::Result<()> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let listener = UnixListener::from_std(listener)?;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        accept_failed("control", &err).await;
                        continue;
                    }
                };
                let (commands, board, upstreams) =
                    (commands.clone(), board.clone(), upstreams.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = answer(stream, commands, board, upstreams).await {
                        debug!("control connection: {e}");
                    }
                });
            }
        });
        Ok(())
    }
}

/// Control connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;

/// An accept that failed (out of descriptors, most often): back off instead of spinning
/// on a listener that stays readable, and say so at most every 10 s.
pub async fn accept_failed(listener: &str, err: &std::io::Error) {
    static LAST_WARNED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST_WARNED.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
            warn!(listener, error = %err, "accept failed; backing off");
            *last = Some(std::time::Instant::now());
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(path = %self.path.display(), "cannot remove the control socket: {e}");
        }
    }
}

async fn answer(
    stream: UnixStream,
    commands: mpsc::UnboundedSender<Command>,
    board: Arc<Board>,
    upstreams: Option<Arc<rolld_proxy::Upstreams>>,
) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One request line, bounded in size and time.
    let mut reader = AsyncBufReader::new(read).take(64 * 1024);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reader.read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within 10 s"))??;
    // The socket file is 0600, but a directory or a mode changed by hand must not open
    // rolld to every local user: only root and rolld's own user may drive it. (Checked
    // once the request is read, so that the client hears why rather than EPIPE.)
    let own = nix::unistd::geteuid().as_raw();
    if peer.uid() != 0 && peer.uid() != own {
        warn!(
            uid = peer.uid(),
            pid = peer.pid(),
            "control connection refused: only root and rolld's own user (uid {own}) may use the control socket"
        );
        let refusal = serde_json::to_string(&Answer::Error {
            message: format!(
                "permission denied: uid {} is neither root nor rolld's user (uid {own})",
                peer.uid()
            ),
        })
        .unwrap_or_default();
        write.write_all(format!("{refusal}\n").as_bytes()).await?;
        return Ok(());
    }
    let send = |answer: Answer| {
        let mut text = serde_json::to_string(&answer)
            .unwrap_or_else(|e| format!("{{\"event\":\"error\",\"message\":\"{e}\"}}"));
        text.push('\n');
        text
    };
    let request = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => request,
        Err(e) => {
            write
                .write_all(
                    send(Answer::Error {
                        message: format!("bad request: {e}"),
                    })
                    .as_bytes(),
                )
                .await?;
            return Ok(());
        }
    };
    match request {
        Request::Status => {
            let status = Box::new(board.snapshot(upstreams.as_deref()));
            write
                .write_all(send(Answer::Status { status }).as_bytes())
                .await?;
        }
        Request::Stop => {
            let _ = commands.send(Command::Shutdown(StopFrom::Control));
            write
                .write_all(
                    send(Answer::Done {
                        ok: true,
                        message: "stopping".into(),
                    })
                    .as_bytes(),
                )
                .await?;
        }
        Request::Promote | Request::Rollback => {
            let decision = match request {
                Request::Promote => Decision::Promote,
                _ => Decision::RollBack,
            };
            let (reply, answer_rx) = oneshot::channel();
            let answered = if commands.send(Command::Rollout { decision, reply }).is_ok() {
                answer_rx
                    .await
                    .unwrap_or_else(|_| Err("the rollout ended before it was decided".into()))
            } else {
                Err("rolld is shutting down".into())
            };
            let (ok, message) = match answered {
                Ok(message) => (true, message),
                Err(message) => (false, message),
            };
            write
                .write_all(send(Answer::Done { ok, message }).as_bytes())
                .await?;
        }
        Request::Reload { wait } => {
            let (tx, mut events) = mpsc::unbounded_channel();
            if commands
                .send(Command::Roll {
                    watcher: wait.then_some(tx),
                })
                .is_err()
            {
                write
                    .write_all(
                        send(Answer::Done {
                            ok: false,
                            message: "rolld is shutting down".into(),
                        })
                        .as_bytes(),
                    )
                    .await?;
                return Ok(());
            }
            if !wait {
                write.write_all(send(Answer::Accepted).as_bytes()).await?;
                return Ok(());
            }
            while let Some(event) = events.recv().await {
                let (answer, last) = match event {
                    RollEvent::Progress(message) => (Answer::Progress { message }, false),
                    RollEvent::Done { ok, message } => (Answer::Done { ok, message }, true),
                };
                write.write_all(send(answer).as_bytes()).await?;
                if last {
                    return Ok(());
                }
            }
            write
                .write_all(
                    send(Answer::Done {
                        ok: false,
                        message: "rolld stopped before the roll ended".into(),
                    })
                    .as_bytes(),
                )
                .await?;
        }
    }
    Ok(())
}

// ---- the client side, as the CLI runs it ---------------------------------------------

/// Longest wait for each answer line of `status` and `stop`, so that a wedged rolld
/// cannot hang a script; `reload` waits as long as its roll takes.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends `request` and calls `each` with every answer line until the server closes.
pub fn call(socket: &Path, request: &Request, mut each: impl FnMut(Answer)) -> Result<(), String> {
    let mut stream = StdUnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach rolld at {}: {e} (is it running with this config?)",
            socket.display()
        )
    })?;
    if !matches!(request, Request::Reload { wait: true }) {
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| format!("cannot set a timeout on the control socket: {e}"))?;
    }
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    // rolld may answer (a refusal) and close before reading the request: what it said
    // is still there to read, and says more than the failed send would.
    let sent = stream.write_all(line.as_bytes());
    let mut answered = false;
    for line in BufReader::new(stream).lines() {
        let line = match line {
            Ok(line) => line,
            Err(_) if sent.is_err() => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "rolld did not answer within {}s",
                    ANSWER_TIMEOUT.as_secs()
                ))
            }
            Err(e) => return Err(format!("reading rolld's answer: {e}")),
        };
        let answer =
            serde_json::from_str(&line).map_err(|e| format!("rolld answered `{line}`: {e}"))?;
        answered = true;
        each(answer);
    }
    match sent {
        Err(e) if !answered => Err(format!("cannot send to rolld: {e}")),
        _ => Ok(()),
    }
}

/// The socket path for `config`: `control_socket` if set, else beside the config file.
pub fn default_path(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map_or_else(|| "rolld".into(), |s| s.to_string_lossy().into_owned());
    config.with_file_name(format!("{stem}.sock"))
}
