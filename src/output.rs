//! Child output: read continuously, each line prefixed with the process's port and
//! appended to its log file.
//!
//! The pipe is always drained, so a child never blocks on a full pipe; when the file
//! cannot be written, rolld says so in its own log, drops the lines and keeps trying.
//! Nothing here blocks the supervision runtime: a log file is opened and written by a
//! thread of its own behind a bounded queue (the path may be a FIFO nobody reads, or
//! on a stalled disk), and output for rolld's own stdout/stderr goes through [`logs`]'
//! queues. Both drop (and count) lines rather than block when their writer stalls.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tracing::{info, warn};

use crate::logs::{self, Stream};

/// Bumped to make every writer reopen its file (log rotation).
pub static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Longest line kept whole; longer ones are split.
const MAX_LINE: usize = 64 * 1024;
/// Pause between attempts to open a file that could not be opened.
const RETRY_OPEN: Duration = Duration::from_secs(5);

/// Where one stream of a child goes.
#[derive(Clone, Debug)]
pub enum Sink {
    File(PathBuf),
    Stdout,
    Stderr,
    /// rolld's own log (the output of `run_proc` commands).
    Log,
}

/// Drains `fd` until the child closes it, writing prefixed lines to `sink`.
pub fn capture(fd: OwnedFd, port: u16, sink: Sink) {
    let rx = match pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(err) => {
            warn!(port, error = %err, "cannot read the output of the process");
            return;
        }
    };
    tokio::spawn(pump(rx, port, sink));
}

/// Lines waiting for a log file's writer thread; more are dropped.
const FILE_QUEUE_LINES: usize = 4 * 1024;

async fn pump(mut rx: pipe::Receiver, port: u16, sink: Sink) {
    let mut writer = Writer::new(sink);
    // The original rolld's prefix, so that what reads these logs keeps working.
    let prefix = format!("{port}: ");
    let mut buf = Vec::with_capacity(8 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(end) = buf[start..].iter().position(|&b| b == b'\n') {
            writer.line(&prefix, &buf[start..start + end + 1]);
            start += end + 1;
        }
        buf.drain(..start);
        if buf.len() >= MAX_LINE {
            buf.push(b'\n');
            writer.line(&prefix, &buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        buf.push(b'\n');
        writer.line(&prefix, &buf);
    }
}

struct Writer {
    sink: Sink,
    /// The queue to the log file's writer thread, for a [`Sink::File`].
    file: Option<SyncSender<Vec<u8>>>,
}

/// The open log file of a [`Sink::File`], reopened on request and retried on failure.
#[derive(Default)]
struct LogFile {
    file: Option<File>,
    opened_at: u64,
    /// When the last open failed, so opens are retried now and then, not per line.
    failed_at: Option<Instant>,
}

impl Writer {
    fn new(sink: Sink) -> Self {
        let file = match &sink {
            Sink::File(path) => file_writer(path.clone()),
            _ => None,
        };
        Writer { sink, file }
    }

    fn line(&mut self, prefix: &str, line: &[u8]) {
        let mut out = Vec::with_capacity(prefix.len() + line.len());
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
        match &self.sink {
            Sink::Log => {
                let text = String::from_utf8_lossy(line);
                info!(target: "rolld::run_proc", "{}", text.trim_end());
            }
            // Through rolld's output queues: a stalled stdout must not stall this task.
            Sink::Stdout => logs::send(Stream::Stdout, out),
            Sink::Stderr => logs::send(Stream::Stderr, out),
            Sink::File(_) => match &self.file {
                Some(queue) => {
                    if queue.try_send(out).is_err() {
                        logs::count_dropped();
                    }
                }
                None => logs::count_dropped(),
            },
        }
    }
}

/// Starts the thread that opens (creates) the log file at `path` at once, so it exists
/// and a problem shows at start, and then appends the lines it is sent until the
/// process's output ends. None when no thread can be started (its lines are dropped
/// and counted).
fn file_writer(path: PathBuf) -> Option<SyncSender<Vec<u8>>> {
    let (tx, rx) = sync_channel::<Vec<u8>>(FILE_QUEUE_LINES);
    let spawned = std::thread::Builder::new()
        .name("rolld-app-log".into())
        .spawn(move || {
            let mut log = LogFile::default();
            log.file(&path);
            for line in rx {
                let written = match log.file(&path) {
                    Some(file) => file.write_all(&line),
                    None => {
                        logs::count_dropped();
                        continue;
                    }
                };
                if let Err(err) = written {
                    warn!(path = %path.display(), error = %err, "cannot write process output; dropping it until the file is writable");
                    logs::count_dropped();
                    log.file = None;
                    log.failed_at = Some(Instant::now());
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(err) => {
            warn!(error = %err, "cannot start a thread to write process output; dropping it");
            None
        }
    }
}

impl LogFile {
    fn file(&mut self, path: &Path) -> Option<&mut File> {
        let generation = REOPEN.load(Ordering::Relaxed);
        if self.opened_at != generation {
            self.file = None;
            self.failed_at = None;
        }
        if self.file.is_none() {
            if self.failed_at.is_some_and(|t| t.elapsed() < RETRY_OPEN) {
                return None;
            }
            match open_log(path) {
                Ok(file) => {
                    if self.failed_at.take().is_some() {
                        info!(path = %path.display(), "process output file is writable again");
                    }
                    self.file = Some(file);
                    self.opened_at = generation;
                }
                Err(err) => {
                    if self.failed_at.is_none() {
                        warn!(path = %path.display(), error = %err, "cannot open process output file; dropping output until it can be opened");
                    }
                    self.failed_at = Some(Instant::now());
                    return None;
                }
            }
        }
        self.file.as_mut()
    }
}

/// Opens (creates) a process's log file for appending.
///
/// A log path that is a symlink is followed when an admin could have made it (a link
/// into /var/log is common), but not in a folder anyone can write to (/tmp): there the
/// link may be another user's, aimed at a file rolld (root) would then append to.
///
/// Opened non-blocking: for a regular file that changes nothing, and a FIFO (a log
/// collector's) with no reader fails to open, and one whose reader stalls fails the
/// write, instead of holding the writer thread for ever; both are retried later.
fn open_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut options = OpenOptions::new();
    options.create(true).append(true).mode(0o644);
    let mut flags = nix::libc::O_NONBLOCK;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if std::fs::metadata(parent).is_ok_and(|m| m.permissions().mode() & 0o002 != 0) {
            flags |= nix::libc::O_NOFOLLOW;
        }
    }
    options.custom_flags(flags).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_log_symlink_is_followed_only_outside_world_writable_folders() {
        let target_dir = tempfile::tempdir().expect("dir");
        let target = target_dir.path().join("real.log");
        let private = tempfile::tempdir().expect("dir");
        let link = private.path().join("app.log");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        open_log(&link)
            .and_then(|mut f| f.write_all(b"line\n"))
            .expect("an admin's link is followed");
        assert_eq!(std::fs::read(&target).expect("read"), b"line\n");

        let public = tempfile::tempdir().expect("dir");
        std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
        let link = public.path().join("app.log");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(
            open_log(&link).is_err(),
            "a link in a world-writable folder"
        );
        assert_eq!(std::fs::read(&target).expect("read"), b"line\n");
    }
}
