//! Request and response buffering, so that a slow client costs rolld a buffer and never
//! an app worker.
//!
//! Synchronous app servers (gunicorn's sync worker, unicorn, one-thread Puma) give each
//! request a whole worker for as long as its client takes to send the request and read
//! the answer. rolld therefore reads a request body completely before it picks an
//! upstream, and reads an answer as fast as the app writes it, feeding the client at
//! the client's pace afterwards (nginx's `proxy_request_buffering` and
//! `proxy_buffering`, both on by default there too).
//!
//! A buffer is a [`Spool`]: chunks in memory up to a per-message limit, then an unlinked
//! temporary file (it vanishes with its last descriptor, even if rolld is killed).
//! [`Buffers`] bounds the total: memory taken by every spool against one budget (a
//! message that finds it used up goes to disk), disk against one cap (a message that
//! finds it used up waits for room). The file is written and read with plain blocking
//! calls in small chunks, as nginx does without `aio threads`: they land in the page
//! cache, and a proxy's worker threads each run their own event loop, where handing
//! each chunk to a thread pool would cost more than the copy.
//!
//! The answer's lease ([`InFlight`]) and its upstream connection are let go the moment
//! the app has sent everything: the drain of a set counts an answer held in rolld's
//! buffer as finished, so an old set can stop while its slow clients still download.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use crate::access::AccessLog;
use crate::exchange::Answer;
use crate::upstream::InFlight;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body could not be buffered (`forward` maps each to its status).
#[derive(Debug)]
pub(crate) enum SpoolError {
    /// No byte within `body_idle_timeout` (408).
    Idle,
    /// Over `max_body_size` (413).
    TooLarge,
    /// The client's body could not be read (400).
    Unreadable,
    /// No disk room came free within `body_idle_timeout` (503).
    Full,
    /// The temporary file failed (500).
    Io(io::Error),
}

/// How requests and answers are buffered. [`Default`] buffers both, as nginx does.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferConfig {
    /// Buffer request bodies and answers (except the streaming kinds); false streams
    /// everything both ways, as rolld did before buffering existed.
    pub enabled: bool,
    /// Bytes of one request body kept in memory; the rest goes to a temporary file.
    pub request_buffer: usize,
    /// Bytes of one answer kept in memory; the rest goes to a temporary file.
    pub response_buffer: usize,
    /// Bytes all buffers may keep in memory together; beyond, they spill to disk.
    pub memory: u64,
    /// Bytes all temporary files may hold together; beyond, a message waits for room.
    pub disk: u64,
    /// Bytes one answer may hold on disk; beyond, rolld reads the app only as fast as
    /// the client takes the answer (nginx's `proxy_max_temp_file_size`).
    pub max_response_file: u64,
    /// Where the temporary files are created (and at once unlinked).
    pub dir: PathBuf,
    /// Requests whose path starts with one of these are streamed both ways.
    pub unbuffered_paths: Vec<String>,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            enabled: true,
            request_buffer: 64 * 1024,
            response_buffer: 64 * 1024,
            memory: 64 * 1024 * 1024,
            disk: 1024 * 1024 * 1024,
            max_response_file: 1024 * 1024 * 1024,
            dir: std::env::temp_dir(),
            unbuffered_paths: Vec::new(),
        }
    }
}

/// Largest chunk read back from a temporary file at once: what one slow client holds
/// in flight outside the budget.
const FILE_CHUNK: usize = 16 * 1024;
/// `X-Accel-Buffering: no` from the app turns buffering off for its answer (as for
/// nginx); the header is rolld's, never the client's.
pub(crate) static X_ACCEL_BUFFERING: http::HeaderName =
    http::HeaderName::from_static("x-accel-buffering");

/// The buffers of one proxy: their settings, the memory and disk they take, counters.
#[derive(Debug)]
pub(crate) struct Buffers {
    config: BufferConfig,
    memory: AtomicU64,
    disk: AtomicU64,
    requests_spilled: AtomicU64,
    responses_spilled: AtomicU64,
    /// Woken whenever a spool gives disk space back, for those waiting for room.
    disk_freed: tokio::sync::Notify,
}

/// What the buffers hold now, and how many messages went to disk so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferStats {
    /// Bytes of requests and answers held in memory.
    pub memory_bytes: u64,
    /// Bytes of requests and answers held in temporary files.
    pub disk_bytes: u64,
    /// Request bodies larger than their memory share (or than the budget left).
    pub requests_spilled: u64,
    /// Answers larger than their memory share (or than the budget left).
    pub responses_spilled: u64,
}

/// Memory of the budget held by an answer read whole; given back when dropped, once
/// the answer has been sent (or the client left).
#[derive(Debug)]
pub(crate) struct MemoryShare {
    buffers: Arc<Buffers>,
    len: u64,
}

impl Drop for MemoryShare {
    fn drop(&mut self) {
        self.buffers.give_memory(self.len);
    }
}

/// Which way a message goes to disk, for its counter.
#[derive(Clone, Copy)]
enum Direction {
    Request,
    Response,
}

impl Buffers {
    pub(crate) fn new(config: BufferConfig) -> Arc<Self> {
        Arc::new(Buffers {
            config,
            memory: AtomicU64::new(0),
            disk: AtomicU64::new(0),
            requests_spilled: AtomicU64::new(0),
            responses_spilled: AtomicU64::new(0),
            disk_freed: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn stats(&self) -> BufferStats {
        BufferStats {
            memory_bytes: self.memory.load(Ordering::Relaxed),
            disk_bytes: self.disk.load(Ordering::Relaxed),
            requests_spilled: self.requests_spilled.load(Ordering::Relaxed),
            responses_spilled: self.responses_spilled.load(Ordering::Relaxed),
        }
    }

    /// Whether requests to `path` are buffered at all (the global switch and the
    /// per-path opt-out).
    pub(crate) fn buffers_path(&self, path: &str) -> bool {
        self.config.enabled
            && !self
                .config
                .unbuffered_paths
                .iter()
                .any(|prefix| path.starts_with(prefix.as_str()))
    }

    /// Whether an answer with these headers is buffered, for a request whose path is
    /// buffered: server-sent events and answers marked `X-Accel-Buffering: no` (the
    /// header nginx users already set) stream. Takes `X-Accel-Buffering` out: it is for
    /// rolld, as for nginx, not for the client.
    pub(crate) fn buffers_answer(headers: &mut HeaderMap) -> bool {
        // One pass over the fields costs less than a lookup of each name; the first
        // field of each name decides, as a lookup would.
        let (mut accel, mut content_type) = (None, None);
        for (name, value) in headers.iter() {
            if name == http::header::CONTENT_TYPE {
                content_type = content_type.or(Some(value));
            } else if name == X_ACCEL_BUFFERING {
                accel = accel.or(Some(value));
            }
        }
        let event_stream = content_type
            .and_then(|v| v.as_bytes().split(|b| *b == b';').next())
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"text/event-stream"));
        let opted_out = accel.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no"));
        if accel.is_some() {
            headers.remove(&X_ACCEL_BUFFERING);
        }
        !event_stream && !opted_out
    }

    /// A share of `buffer_memory` for an answer of `len` bytes that is read whole before
    /// it is sent, if it fits its per-message part (`response_buffer`) and the budget
    /// has room; `None` sends it through the pump (and to disk) instead.
    pub(crate) fn memory_share(self: &Arc<Self>, len: u64) -> Option<MemoryShare> {
        (len <= self.config.response_buffer as u64
            && Self::take(&self.memory, len, self.config.memory))
        .then(|| MemoryShare {
            buffers: self.clone(),
            len,
        })
    }

    fn take(counter: &AtomicU64, n: u64, limit: u64) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    fn give_memory(&self, n: u64) {
        if n > 0 {
            self.memory.fetch_sub(n, Ordering::AcqRel);
        }
    }

    fn give_disk(&self, n: u64) {
        if n > 0 {
            self.disk.fetch_sub(n, Ordering::AcqRel);
            self.disk_freed.notify_waiters();
        }
    }

    /// Reads a request body completely into a spool, under the same limits as a
    /// streamed one: `max_body_size` (413) and `body_idle_timeout` between chunks (408).
    /// Waiting for disk room counts as idleness; none within `idle` answers 503.
    pub(crate) async fn spool_request(
        self: &Arc<Self>,
        body: &mut crate::body::ClientBody,
        limit: Option<u64>,
        idle: Duration,
    ) -> Result<SpooledBody, SpoolError> {
        let limit = limit.unwrap_or(u64::MAX);
        let mut spool = Spool::new(
            self.clone(),
            self.config.request_buffer,
            limit,
            Direction::Request,
        );
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => return Err(SpoolError::Idle),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(SpoolError::Unreadable),
                Ok(Some(Ok(frame))) => frame,
            };
            // Request trailers are not forwarded (no app server reads them).
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if spool.len + data.len() as u64 > limit {
                return Err(SpoolError::TooLarge);
            }
            let deadline = tokio::time::Instant::now() + idle;
            loop {
                let freed = self.disk_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                match spool.push(data).map_err(SpoolError::Io)? {
                    None => break,
                    Some(back) => data = back,
                }
                if tokio::time::timeout_at(deadline, freed).await.is_err() {
                    return Err(SpoolError::Full);
                }
            }
        }
        Ok(SpooledBody { spool })
    }
}

/// One message's buffer: chunks in memory, then a temporary file. Data goes to memory
/// only while the file holds nothing unread, so memory always holds the older bytes.
struct Spool {
    buffers: Arc<Buffers>,
    direction: Direction,
    /// This message's share of memory.
    memory_limit: usize,
    /// This message's share of disk.
    file_limit: u64,
    memory: VecDeque<Bytes>,
    in_memory: usize,
    file: Option<File>,
    /// Bytes in the file (all counted against the disk cap until it is emptied).
    written: u64,
    /// Bytes of the file read back.
    read: u64,
    /// Bytes pushed in all.
    len: u64,
    spilled: bool,
}

impl Spool {
    fn new(
        buffers: Arc<Buffers>,
        memory_limit: usize,
        file_limit: u64,
        direction: Direction,
    ) -> Self {
        Spool {
            buffers,
            direction,
            memory_limit,
            file_limit,
            memory: VecDeque::new(),
            in_memory: 0,
            file: None,
            written: 0,
            read: 0,
            len: 0,
            spilled: false,
        }
    }

    /// Stores `data`, or gives back what neither memory nor disk has room for now. An
    /// answer's empty spool always takes up to 16 KiB, over its share and the budget if
    /// need be: the answer then moves at its client's pace, as a streamed one does, and
    /// never waits for room that only its own client could free. (A request body waits
    /// for room, within `body_idle_timeout`.)
    fn push(&mut self, data: Bytes) -> io::Result<Option<Bytes>> {
        match self.store(data)? {
            Some(mut back) if matches!(self.direction, Direction::Response) && self.is_empty() => {
                let head = back.split_to(back.len().min(FILE_CHUNK));
                self.buffers
                    .memory
                    .fetch_add(head.len() as u64, Ordering::AcqRel);
                self.in_memory += head.len();
                self.len += head.len() as u64;
                self.memory.push_back(head);
                Ok((!back.is_empty()).then_some(back))
            }
            other => Ok(other),
        }
    }

    /// Whether it holds no unread byte.
    fn is_empty(&self) -> bool {
        self.in_memory == 0 && self.written == self.read
    }

    /// Stores `data` within the limits, or gives it back.
    fn store(&mut self, data: Bytes) -> io::Result<Option<Bytes>> {
        let n = data.len();
        if n == 0 {
            return Ok(None);
        }
        if self.written == self.read
            && self.in_memory + n <= self.memory_limit
            && Buffers::take(&self.buffers.memory, n as u64, self.buffers.config.memory)
        {
            self.in_memory += n;
            self.len += n as u64;
            self.memory.push_back(data);
            return Ok(None);
        }
        if self.written + n as u64 > self.file_limit
            || !Buffers::take(&self.buffers.disk, n as u64, self.buffers.config.disk)
        {
            return Ok(Some(data));
        }
        if let Err(err) = self.write(&data) {
            self.buffers.give_disk(n as u64);
            return Err(err);
        }
        self.written += n as u64;
        self.len += n as u64;
        if !self.spilled {
            self.spilled = true;
            match self.direction {
                Direction::Request => &self.buffers.requests_spilled,
                Direction::Response => &self.buffers.responses_spilled,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        Ok(None)
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            slot => slot.insert(tempfile::tempfile_in(&self.buffers.config.dir).map_err(
                |err| {
                    io::Error::new(
                        err.kind(),
                        format!(
                            "cannot create a buffer file in {}: {err}",
                            self.buffers.config.dir.display()
                        ),
                    )
                },
            )?),
        };
        file.write_all_at(data, self.written)
    }

    /// Takes the oldest bytes (for an answer, read once). Once the file is read to its
    /// end it is emptied, its disk share given back, and memory takes new bytes again.
    fn pop(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(data) = self.memory.pop_front() {
            self.in_memory -= data.len();
            self.buffers.give_memory(data.len() as u64);
            return Ok(Some(data));
        }
        let Some(file) = &self.file else {
            return Ok(None);
        };
        if self.read >= self.written {
            return Ok(None);
        }
        let n = (self.written - self.read).min(FILE_CHUNK as u64) as usize;
        let mut buf = vec![0; n];
        file.read_exact_at(&mut buf, self.read)?;
        self.read += n as u64;
        if self.read == self.written {
            file.set_len(0)?;
            self.buffers.give_disk(self.written);
            self.written = 0;
            self.read = 0;
        }
        Ok(Some(Bytes::from(buf)))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.buffers.give_memory(self.in_memory as u64);
        self.buffers.give_disk(self.written);
    }
}

/// A request body read completely. It can be read again as often as needed (a request
/// sent again after a failure): each [`SpooledBody::reader`] starts from its first
/// byte. Its memory and disk count against the budget until it is dropped.
pub struct SpooledBody {
    spool: Spool,
}

impl SpooledBody {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.spool.len
    }

    pub fn is_empty(&self) -> bool {
        self.spool.len == 0
    }

    /// The whole body as one `Bytes` when it is all in memory (no copy for a body of one
    /// chunk); `None` when part of it is on disk.
    pub fn bytes(&self) -> Option<Bytes> {
        if self.spool.written > 0 {
            return None;
        }
        match self.spool.memory.len() {
            0 => Some(Bytes::new()),
            1 => self.spool.memory.front().cloned(),
            _ => {
                let mut all = bytes::BytesMut::with_capacity(self.spool.in_memory);
                for chunk in &self.spool.memory {
                    all.extend_from_slice(chunk);
                }
                Some(all.freeze())
            }
        }
    }

    /// A reader from the first byte.
    pub fn reader(self: &Arc<Self>) -> SpooledReader {
        SpooledReader {
            body: self.clone(),
            chunk: 0,
            offset: 0,
        }
    }
}

/// One pass over a [`SpooledBody`].
pub struct SpooledReader {
    body: Arc<SpooledBody>,
    /// The next memory chunk.
    chunk: usize,
    /// The next byte of the file.
    offset: u64,
}

impl SpooledReader {
    /// The next chunk, `None` at the end.
    pub(crate) fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let spool = &self.body.spool;
        if let Some(data) = spool.memory.get(self.chunk) {
            self.chunk += 1;
            return Ok(Some(data.clone()));
        }
        let Some(file) = &spool.file else {
            return Ok(None);
        };
        if self.offset >= spool.written {
            return Ok(None);
        }
        let n = (spool.written - self.offset).min(FILE_CHUNK as u64) as usize;
        let mut buf = vec![0; n];
        file.read_exact_at(&mut buf, self.offset)?;
        self.offset += n as u64;
        Ok(Some(Bytes::from(buf)))
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> u64 {
        let spool = &self.body.spool;
        let memory: usize = spool.memory.iter().skip(self.chunk).map(Bytes::len).sum();
        memory as u64 + (spool.written - self.offset.min(spool.written))
    }
}

/// An answer on its way from the app into rolld's buffer (the pump) and out of it to
/// the client (the [`BufferedResponse`]).
struct Pipe {
    state: Mutex<PipeState>,
    /// Wakes the pump when the client took bytes (room may have come free) or left.
    room: tokio::sync::Notify,
    /// Wakes the pump when the client left.
    gone: tokio::sync::Notify,
    buffers: Arc<Buffers>,
}

struct PipeState {
    spool: Spool,
    end: End,
    /// The client's body, waiting for bytes.
    reader: Option<Waker>,
    /// The client's body was dropped: the pump stops.
    reader_gone: bool,
}

enum End {
    /// The app is still sending.
    Open,
    /// The app sent everything (and these trailers).
    Done(Option<HeaderMap>),
    /// The app's answer broke off.
    Failed,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        // A panic while holding it leaves a spool that is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end(&self, end: End) {
        let waker = {
            let mut state = self.lock();
            state.end = end;
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Stores `data`, waiting while there is no room (memory and disk both used up):
    /// then the app is read only as fast as the client reads. Err when the client left
    /// or the temporary file failed.
    async fn write(&self, data: Bytes) -> Result<(), ()> {
        let mut data = Some(data);
        while let Some(chunk) = data.take() {
            let room = self.room.notified();
            let freed = self.buffers.disk_freed.notified();
            tokio::pin!(room, freed);
            room.as_mut().enable();
            freed.as_mut().enable();
            let waker = {
                let mut state = self.lock();
                if state.reader_gone {
                    return Err(());
                }
                match state.spool.push(chunk) {
                    Ok(back) => data = back,
                    Err(err) => {
                        tracing::warn!(error = %err, "buffering an answer failed");
                        return Err(());
                    }
                }
                // Part of the chunk may have been stored even when the rest waits.
                if state.spool.is_empty() {
                    None
                } else {
                    state.reader.take()
                }
            };
            if let Some(waker) = waker {
                waker.wake();
            }
            if data.is_none() {
                return Ok(());
            }
            tokio::select! {
                () = &mut room => {}
                () = &mut freed => {}
            }
        }
        Ok(())
    }
}

/// Starts reading `body` into a buffer as fast as the app sends it, and returns the
/// body the client gets. Once the app has sent everything its connection goes back to
/// the pool and `lease` is dropped: the drain counts the answer as finished.
pub(crate) fn buffer_answer(
    buffers: &Arc<Buffers>,
    body: Answer,
    lease: InFlight,
    idle: Duration,
    access: Option<Box<AccessLog>>,
) -> BufferedResponse {
    let size = body.size_hint();
    let pipe = Arc::new(Pipe {
        state: Mutex::new(PipeState {
            spool: Spool::new(
                buffers.clone(),
                buffers.config.response_buffer,
                buffers.config.max_response_file,
                Direction::Response,
            ),
            end: End::Open,
            reader: None,
            reader_gone: false,
        }),
        room: tokio::sync::Notify::new(),
        gone: tokio::sync::Notify::new(),
        buffers: buffers.clone(),
    });
    tokio::spawn(pump(pipe.clone(), body, lease, idle));
    BufferedResponse {
        pipe,
        size,
        sent: 0,
        done: false,
        access,
    }
}

/// Reads the app's answer into the pipe until its end, the client's departure, a
/// failure, or `idle` without a byte from the app.
async fn pump(pipe: Arc<Pipe>, mut body: Answer, lease: InFlight, idle: Duration) {
    let mut trailers = None;
    loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(idle, body.frame()) => frame,
            // The connection is closed (dropped mid-answer), the lease ends.
            () = pipe.gone.notified() => return,
        };
        match frame {
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if pipe.write(data).await.is_err() {
                        if !pipe.lock().reader_gone {
                            lease.cut_mid_answer();
                            pipe.end(End::Failed);
                        }
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                tracing::warn!(upstream = %lease.upstream().addr(), "response body cut: {err}");
                lease.cut_mid_answer();
                pipe.end(End::Failed);
                return;
            }
            Err(_) => {
                tracing::warn!(upstream = %lease.upstream().addr(), ?idle, "response body cut: body idle for longer than body_idle_timeout");
                lease.cut_mid_answer();
                pipe.end(End::Failed);
                return;
            }
        }
    }
    if let Some(conn) = body.take_conn() {
        lease.upstream().pool().checkin(conn);
    }
    // The whole answer is in rolld's buffer: the app's worker is free, and the set's
    // drain no longer waits for this request.
    drop(lease);
    pipe.end(End::Done(trailers));
}

/// The client's side of a buffered answer.
pub(crate) struct BufferedResponse {
    pipe: Arc<Pipe>,
    /// The app's size hint for the whole answer.
    size: SizeHint,
    sent: u64,
    done: bool,
    access: Option<Box<AccessLog>>,
}

/// The app's answer broke off after its head: the client's answer is cut too.
#[derive(Debug)]
struct AnswerCut;

impl std::fmt::Display for AnswerCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the app's answer broke off")
    }
}

impl std::error::Error for AnswerCut {}

impl BufferedResponse {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut state = self.pipe.lock();
        match state.spool.pop() {
            Ok(Some(data)) => {
                drop(state);
                self.pipe.room.notify_one();
                self.sent += data.len() as u64;
                if let Some(access) = self.access.as_mut() {
                    access.bytes += data.len() as u64;
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Ok(None) => {}
            Err(err) => {
                self.done = true;
                tracing::warn!(error = %err, "reading a buffered answer back failed");
                return Poll::Ready(Some(Err(err.into())));
            }
        }
        match &mut state.end {
            End::Open => {
                state.reader = Some(cx.waker().clone());
                Poll::Pending
            }
            End::Done(trailers) => {
                self.done = true;
                match trailers.take() {
                    Some(trailers) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    None => Poll::Ready(None),
                }
            }
            End::Failed => {
                self.done = true;
                Poll::Ready(Some(Err(AnswerCut.into())))
            }
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.done
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.size.exact() {
            Some(total) => SizeHint::with_exact(total.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for BufferedResponse {
    fn drop(&mut self) {
        if !self.done {
            if let Some(access) = self.access.as_mut() {
                access.complete = false;
            }
        }
        self.pipe.lock().reader_gone = true;
        self.pipe.room.notify_one();
        self.pipe.gone.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffers(memory: u64, disk: u64) -> Arc<Buffers> {
        Buffers::new(BufferConfig {
            memory,
            disk,
            ..BufferConfig::default()
        })
    }

    #[test]
    fn a_spool_keeps_order_across_memory_and_file_and_gives_everything_back() {
        let b = buffers(10, 1000);
        let mut spool = Spool::new(b.clone(), 8, 1000, Direction::Response);
        for chunk in ["abcd", "efgh", "ijkl", "mnop"] {
            assert!(spool.push(Bytes::from(chunk)).expect("push").is_none());
        }
        assert_eq!(b.stats().memory_bytes, 8);
        assert_eq!(b.stats().disk_bytes, 8);
        assert_eq!(b.stats().responses_spilled, 1);
        let mut out = Vec::new();
        while let Some(data) = spool.pop().expect("pop") {
            out.extend_from_slice(&data);
        }
        assert_eq!(out, b"abcdefghijklmnop");
        assert_eq!(b.stats().memory_bytes, 0);
        assert_eq!(
            b.stats().disk_bytes,
            0,
            "an emptied file gives its room back"
        );
        // Memory takes new bytes again once the file is read to its end.
        assert!(spool.push(Bytes::from("qr")).expect("push").is_none());
        assert_eq!(b.stats().memory_bytes, 2);
        drop(spool);
        assert_eq!(b.stats().memory_bytes, 0);
    }

    #[test]
    fn an_empty_answer_spool_takes_a_chunk_even_without_room_so_it_never_stalls() {
        let b = buffers(4, 1000);
        let mut spool = Spool::new(b.clone(), 4, 0, Direction::Response);
        let big = Bytes::from(vec![7u8; FILE_CHUNK + 10]);
        let back = spool.push(big).expect("push");
        assert_eq!(back.map(|b| b.len()), Some(10), "at most 16 KiB over");
        assert_eq!(b.stats().memory_bytes, FILE_CHUNK as u64);
        assert_eq!(spool.pop().expect("pop").map(|b| b.len()), Some(FILE_CHUNK));
        assert!(spool
            .push(Bytes::from("0123456789"))
            .expect("push")
            .is_none());
        let back = spool.push(Bytes::from("x")).expect("push");
        assert_eq!(
            back,
            Some(Bytes::from("x")),
            "no file for answers: it waits"
        );
        assert_eq!(spool.pop().expect("pop"), Some(Bytes::from("0123456789")));
        assert!(spool.push(Bytes::from("x")).expect("push").is_none());
        drop(spool);
        assert_eq!(b.stats().memory_bytes, 0);
    }

    #[test]
    fn the_memory_budget_sends_spools_to_disk_and_the_disk_cap_makes_them_wait() {
        let b = buffers(6, 6);
        let mut first = Spool::new(b.clone(), 100, 100, Direction::Request);
        let mut second = Spool::new(b.clone(), 100, 100, Direction::Request);
        assert!(first.push(Bytes::from("abcdef")).expect("push").is_none());
        assert!(second.push(Bytes::from("ghijkl")).expect("push").is_none());
        assert_eq!(b.stats().memory_bytes, 6);
        assert_eq!(b.stats().disk_bytes, 6, "the second went to disk");
        assert_eq!(b.stats().requests_spilled, 1);
        let back = second.push(Bytes::from("m")).expect("push");
        assert_eq!(back, Some(Bytes::from("m")), "no room: given back");
        drop(first);
        let back = second.push(Bytes::from("m")).expect("push");
        assert_eq!(
            back,
            Some(Bytes::from("m")),
            "its file has unread bytes: disk only"
        );
        let mut third = Spool::new(b.clone(), 100, 100, Direction::Request);
        assert!(third.push(Bytes::from("m")).expect("push").is_none());
        assert_eq!(
            b.stats().memory_bytes,
            1,
            "memory given back is taken again"
        );
        drop(second);
        assert_eq!(b.stats().disk_bytes, 0);
    }

    #[test]
    fn a_spooled_body_reads_again_from_its_first_byte() {
        let b = buffers(100, 1000);
        let mut spool = Spool::new(b.clone(), 4, 1000, Direction::Request);
        for chunk in ["ab", "cd", "ef", "gh"] {
            assert!(spool.push(Bytes::from(chunk)).expect("push").is_none());
        }
        let body = Arc::new(SpooledBody { spool });
        assert_eq!(body.len(), 8);
        assert_eq!(body.bytes(), None, "part of it is on disk");
        for _ in 0..2 {
            let mut reader = body.reader();
            assert_eq!(reader.remaining(), 8);
            let mut out = Vec::new();
            while let Some(data) = reader.next_chunk().expect("read") {
                out.extend_from_slice(&data);
            }
            assert_eq!(out, b"abcdefgh");
            assert_eq!(reader.remaining(), 0);
        }
    }

    #[test]
    fn only_streaming_answers_are_exempt() {
        let mut h = HeaderMap::new();
        assert!(Buffers::buffers_answer(&mut h));
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(" Text/Event-Stream ; charset=utf-8"),
        );
        assert!(!Buffers::buffers_answer(&mut h));
        let mut h = HeaderMap::new();
        h.insert("x-accel-buffering", http::HeaderValue::from_static("No"));
        assert!(!Buffers::buffers_answer(&mut h));
        assert!(h.is_empty(), "the field is rolld's, not the client's");
        h.insert("x-accel-buffering", http::HeaderValue::from_static("yes"));
        assert!(Buffers::buffers_answer(&mut h));
        assert!(h.is_empty());
        let b = Buffers::new(BufferConfig {
            unbuffered_paths: vec!["/live/".into()],
            ..BufferConfig::default()
        });
        assert!(!b.buffers_path("/live/feed"));
        assert!(b.buffers_path("/lives"));
    }
}
