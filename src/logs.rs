//! rolld's own output: its log lines and the app output that goes to rolld's
//! stdout/stderr. Nothing that serves or supervises ever writes to a descriptor itself.
//!
//! A stuck log collector must not stop the proxy or the supervisor, and a closed one
//! must not kill rolld. So every line goes into a bounded queue read by one writer
//! thread per stream; when the queue is full (the reader stalls) the line is dropped and
//! counted, and a write that fails (EPIPE: the reader is gone) is dropped and counted
//! too. Only that thread ever blocks on the pipe. The count (with the lines of apps' log
//! files dropped the same way, see `output`) is in `rolld status` and `/metrics`
//! (`rolld_log_lines_dropped_total`).
//!
//! The CLI commands (`check`, `status`, `reload`, `stop`) print their answer with
//! [`print`] instead: there blocking is right, and a failed write is ignored (never
//! `println!`, which panics on EPIPE).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines waiting for a stream's writer thread; more are dropped.
const QUEUE_LINES: usize = 4 * 1024;

/// Lines dropped because a queue was full or a write failed, since start.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// One of rolld's standard streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The queue to one stream's writer thread.
struct Queue {
    stream: Stream,
    tx: SyncSender<Vec<u8>>,
    /// The queue's far end until its writer thread starts (see [`hold`]).
    parked: Mutex<Option<Receiver<Vec<u8>>>>,
    /// Lines queued and not yet written (or dropped), for [`flush`].
    pending: Arc<AtomicUsize>,
}

static STDOUT: OnceLock<Queue> = OnceLock::new();
static STDERR: OnceLock<Queue> = OnceLock::new();
/// While set, writer threads are not started: lines wait in their queue.
static HELD: AtomicBool = AtomicBool::new(false);

impl Queue {
    fn new(stream: Stream) -> Queue {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE_LINES);
        let queue = Queue {
            stream,
            tx,
            parked: Mutex::new(Some(rx)),
            pending: Arc::new(AtomicUsize::new(0)),
        };
        if !HELD.load(Ordering::Acquire) {
            queue.start();
        }
        queue
    }

    /// Starts the writer thread, once.
    fn start(&self) {
        let Some(rx) = self.parked.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let stream = self.stream;
        let left = self.pending.clone();
        let name = match stream {
            Stream::Stdout => "rolld-stdout",
            Stream::Stderr => "rolld-stderr",
        };
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for line in rx {
                    let written = match stream {
                        Stream::Stdout => std::io::stdout().lock().write_all(&line),
                        Stream::Stderr => std::io::stderr().lock().write_all(&line),
                    };
                    if written.is_err() {
                        DROPPED.fetch_add(1, Ordering::Relaxed);
                    }
                    left.fetch_sub(1, Ordering::Release);
                }
            });
        // Without its thread, the queue fills and the stream's lines are dropped (and
        // counted); nothing else can be done about it.
        drop(spawned);
    }

    fn get(stream: Stream) -> &'static Queue {
        match stream {
            Stream::Stdout => STDOUT.get_or_init(|| Queue::new(Stream::Stdout)),
            Stream::Stderr => STDERR.get_or_init(|| Queue::new(Stream::Stderr)),
        }
    }

    fn send(&self, line: Vec<u8>) {
        self.pending.fetch_add(1, Ordering::Acquire);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.pending.fetch_sub(1, Ordering::Release);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the writer threads held back by [`hold`]; the lines queued meanwhile follow.
pub fn release() {
    HELD.store(false, Ordering::Release);
    for queue in [STDOUT.get(), STDERR.get()].into_iter().flatten() {
        queue.start();
    }
}

/// Queues `line` (a whole line, newline included) for `stream`; never blocks.
pub fn send(stream: Stream, line: Vec<u8>) {
    Queue::get(stream).send(line);
}

/// Counts a line dropped elsewhere (an app's log file whose writer stalled or failed).
pub fn count_dropped() {
    DROPPED.fetch_add(1, Ordering::Relaxed);
}

/// Lines dropped so far because rolld's stdout or stderr, or an app's log file, was
/// full, stalled or closed.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Waits until the queued lines are written, up to `timeout` (a stalled stream must not
/// keep rolld from exiting).
pub fn flush(timeout: Duration) {
    release();
    let deadline = Instant::now() + timeout;
    for queue in [STDOUT.get(), STDERR.get()].into_iter().flatten() {
        while queue.pending.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The tracing writer: each event is one `write` of a whole formatted line.
#[derive(Clone, Copy, Debug)]
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        send(Stream::Stderr, buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Writer;

    fn make_writer(&'a self) -> Writer {
        Writer
    }
}

/// Prints `text` on stdout for a CLI command; a closed stdout is not an error worth a panic.
pub fn print(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = sync_channel::<Vec<u8>>(2);
        let queue = Queue {
            stream: Stream::Stderr,
            tx,
            parked: Mutex::new(Some(rx)),
            pending: Arc::new(AtomicUsize::new(0)),
        };
        let before = dropped();
        for _ in 0..5 {
            queue.send(b"line\n".to_vec());
        }
        assert!(dropped() >= before + 3, "three of five lines dropped");
        assert_eq!(queue.pending.load(Ordering::Relaxed), 2);
    }
}
