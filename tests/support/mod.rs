//! Test support: run the real rolld binary on a fixture config with free ports, wait on
//! conditions with deadlines, and clean up every process even when a test fails.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const ROLLD: &str = env!("CARGO_BIN_EXE_rolld");
pub const BACKEND: &str = env!("CARGO_BIN_EXE_rolld-example-backend");

/// A generous deadline for anything that should happen "soon" on a loaded machine.
pub const SOON: Duration = Duration::from_secs(30);

/// Ports that were free a moment ago, all distinct, and outside the kernel's ephemeral
/// range: a port from that range can be taken as the source port of any outgoing
/// connection (a health check, a client) between this check and the app's bind.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below the ephemeral range (32768 on most systems, read from the kernel), above the
    // well-known ports; each test process starts at its own offset so that test binaries
    // running side by side rarely meet, and every port is checked free by binding it.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = 10_000;
    let high: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
        .clamp(low + 2_000, 65_535);
    let span = high - low;
    let _ = NEXT.compare_exchange(
        0,
        1 + std::process::id().wrapping_mul(7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut ports = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let port = (low + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        // Held until all are picked, so that one call never returns a port twice.
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "{n} free ports below the ephemeral range");
    ports
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (a zombie counts as dead: it runs no code and holds
/// no port; only its parent, or init, can still reap it).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let fields: Vec<String> = stat
                        .rsplit(')')
                        .next()?
                        .split_whitespace()
                        .map(String::from)
                        .collect();
                    Some(fields.get(2)?.parse::<i32>().ok()? == pgid && fields[0] != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// A config for `backend` processes on two worksets of `per_set` free ports, behind the
/// proxy on a free port. `extra` is appended under `app-servers:`.
pub struct Fixture {
    pub listen: u16,
    pub sets: Vec<Vec<u16>>,
    pub cmd: String,
    pub extra: String,
}

impl Fixture {
    pub fn new(per_set: usize) -> Fixture {
        let ports = free_ports(1 + 2 * per_set);
        Fixture {
            listen: ports[0],
            sets: vec![
                ports[1..1 + per_set].to_vec(),
                ports[1 + per_set..].to_vec(),
            ],
            cmd: format!("{BACKEND} {{port}}"),
            extra: String::new(),
        }
    }

    pub fn cmd(mut self, cmd: impl Into<String>) -> Self {
        self.cmd = cmd.into();
        self
    }

    pub fn extra(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self
    }

    pub fn yaml(&self) -> String {
        let sets: String = self
            .sets
            .iter()
            .map(|s| format!("    - numprocs: {s:?}\n"))
            .collect();
        format!(
            "listen: 127.0.0.1:{}\napp-servers:\n  cmd: '{}'\n  workset:\n{sets}  health: {{path: /health, interval: 20ms, start_timeout: 20s}}\n  smoke_test:\n    - check_all_http_ports: numprocs\n  stop_timeout: 5s\n{}",
            self.listen, self.cmd, self.extra
        )
    }
}

/// A running rolld. Dropping it kills it and every process it started.
pub struct Rolld {
    pub child: Option<Child>,
    /// The folder rolld runs in; its log is `rolld.log` here.
    pub dir: tempfile::TempDir,
    /// The config file, relative to `dir`.
    pub config: PathBuf,
    pub listen: u16,
}

impl Rolld {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(&self.config)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("rolld.log")
    }

    /// Starts rolld on `fixture` and waits until its first set serves.
    pub fn start(fixture: &Fixture) -> Rolld {
        let rolld = Rolld::spawn(&fixture.yaml(), fixture.listen);
        rolld.wait_log("roll finished", 1);
        rolld
    }

    /// Starts rolld on `yaml` without waiting for anything.
    pub fn spawn(yaml: &str, listen: u16) -> Rolld {
        Rolld::spawn_with(yaml, listen, |_| {})
    }

    /// Like [`spawn`](Self::spawn), after `prepare` has written files beside the config.
    pub fn spawn_with(yaml: &str, listen: u16, prepare: impl FnOnce(&Path)) -> Rolld {
        Rolld::launch(yaml, listen, prepare, &[], &[])
    }

    /// Starts rolld with extra arguments and environment variables.
    pub fn launch(
        yaml: &str,
        listen: u16,
        prepare: impl FnOnce(&Path),
        args: &[&str],
        env: &[(&str, String)],
    ) -> Rolld {
        let dir = tempfile::tempdir().expect("temp dir");
        prepare(dir.path());
        fs::write(dir.path().join("rolld.yml"), yaml).expect("write config");
        Rolld::run_in(dir, Path::new("rolld.yml"), listen, args, env)
    }

    /// Starts `rolld ARGS CONFIG` in `dir` (its working directory), `config` being
    /// relative to it, as a user types it in a terminal.
    pub fn run_in(
        dir: tempfile::TempDir,
        config: &Path,
        listen: u16,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Rolld {
        let log = fs::File::create(dir.path().join("rolld.log")).expect("log file");
        let out = fs::File::create(dir.path().join("rolld.out")).expect("out file");
        let child = Command::new(ROLLD)
            .args(args)
            .arg(config)
            .current_dir(dir.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("start rolld");
        Rolld {
            child: Some(child),
            dir,
            config: config.to_path_buf(),
            listen,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("signal rolld");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until `needle` appears `times` times in rolld's log.
    pub fn wait_log(&self, needle: &str, times: usize) {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.matches(needle).count() >= times {
                return;
            }
            assert!(
                start.elapsed() < SOON,
                "timed out waiting for {times}x `{needle}` in rolld's log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of generation `generation`'s processes, from the log.
    pub fn pids_of(&self, generation: u64) -> Vec<i32> {
        let tag = format!("process started generation={generation} ");
        self.log()
            .lines()
            .filter(|l| l.contains(&tag))
            .filter_map(|l| l.rsplit("pid=").next()?.trim().parse().ok())
            .collect()
    }

    /// Every pid rolld logged as started.
    pub fn all_pids(&self) -> Vec<i32> {
        self.log()
            .lines()
            .filter(|l| l.contains("process started"))
            .filter_map(|l| l.rsplit("pid=").next()?.trim().parse().ok())
            .collect()
    }

    /// Waits for rolld to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("rolld still ours");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "rolld did not exit within {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `rolld SUBCOMMAND -c CONFIG ARGS...` and returns (exit code, stdout, stderr).
    pub fn control(&self, subcommand: &str, args: &[&str]) -> (Option<i32>, String, String) {
        let out = output_within(
            Command::new(ROLLD)
                .arg(subcommand)
                .arg("-c")
                .arg(self.config_path())
                .args(args),
            Duration::from_secs(120),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `rolld status --json`, which must succeed.
    pub fn status_json(&self) -> serde_json::Value {
        let (code, stdout, stderr) = self.control("status", &["--json"]);
        assert_eq!(code, Some(0), "{stderr}");
        serde_json::from_str(&stdout).expect("status JSON")
    }

    /// Waits until the proxy counts `n` requests in flight on the serving set.
    pub fn wait_in_flight(&self, n: usize) {
        wait_until(&format!("{n} request(s) in flight"), SOON, || {
            let (_, stdout, _) = self.control("status", &["--json"]);
            serde_json::from_str::<serde_json::Value>(&stdout)
                .ok()
                .and_then(|s| {
                    Some(
                        s["upstreams"]
                            .as_array()?
                            .iter()
                            .filter_map(|u| u["in_flight"].as_u64())
                            .sum::<u64>(),
                    )
                })
                .is_some_and(|sum| sum >= n as u64)
        });
    }

    pub fn write_config(&self, yaml: &str) {
        // Write then rename, so rolld never reads half a file.
        let tmp = self.dir.path().join("rolld.yml.tmp");
        fs::write(&tmp, yaml).expect("write config");
        fs::rename(&tmp, self.config_path()).expect("replace config");
    }
}

impl Drop for Rolld {
    fn drop(&mut self) {
        let pids = self.all_pids();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in pids {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- rolld log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
    }
}

/// Runs `command` to its end and returns its output; a command still running after
/// `deadline` is killed and the test fails saying so (a regression fails, not hangs).
pub fn output_within(command: &mut Command, deadline: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a command");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.expect("wait for a command"),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("{command:?} did not finish within {deadline:?}");
        }
    }
}

/// A small HTTP/1.1 keep-alive client for the tests.
pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// Sends a request and reads the whole answer.
pub async fn request(
    client: &HttpClient,
    method: &str,
    port: u16,
    path: &str,
    body: &[u8],
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok((status, headers, body))
}

/// An HTTP/2 connection with prior knowledge (h2c) to rolld's `port`, driven by a task
/// of the current runtime.
pub async fn h2c<B>(port: u16) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    send
}

pub async fn get(client: &HttpClient, port: u16, path: &str) -> Result<(u16, String), String> {
    let (status, _, body) = request(client, "GET", port, path, b"").await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A blocking GET on a fresh runtime, for tests that are otherwise synchronous.
pub fn get_blocking(port: u16, path: &str) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async { get(&client(), port, path).await })
}

/// A copy of the executable `program` in a new folder that every user can read and
/// search, for tests that run it as another user: the checkout's own folders may be
/// private (a clone under a private temporary folder).
pub fn world_readable_copy(program: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let name = Path::new(program).file_name().expect("a file name");
    let copy = dir.path().join(name);
    fs::copy(program, &copy).expect("copy the program");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod program");
    (dir, copy)
}

/// Whether the tests run as root; if not, says why a test is skipped (and fails under
/// CI, which runs as root).
/// Whether the test runs as root. A test that needs root fails without it, saying so,
/// unless `ROLLD_SKIP_ROOT=1` asks to skip it (said loudly); CI runs as root and never
/// skips.
pub fn root_or_skip(why: &str) -> bool {
    if nix::unistd::getuid().is_root() {
        return true;
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let skip = std::env::var("ROLLD_SKIP_ROOT").as_deref() == Ok("1");
    assert!(
        skip && !ci,
        "{why} needs root: run the tests as root, or set ROLLD_SKIP_ROOT=1 to skip this test"
    );
    eprintln!("SKIPPED (ROLLD_SKIP_ROOT=1): {why} needs root; this test did not run");
    false
}

/// A free port below 1024, which only root can bind.
pub fn free_privileged_port() -> u16 {
    // Each call of this test process starts below the last one's port: two tests running
    // side by side never get the same port.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1023);
    loop {
        let port = NEXT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        assert!(port >= 900, "a free port between 900 and 1023");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Fails, with the first few errors, unless every request of a load was answered well.
pub fn assert_none_failed(ok: usize, errors: &[String]) {
    assert!(
        errors.is_empty(),
        "{} of {} requests failed, first: {:?}",
        errors.len(),
        ok + errors.len(),
        &errors[..errors.len().min(5)]
    );
}

/// GET load from `workers` concurrent clients, each request on a new connection, every
/// answer checked to be the example backend's `hello`. Bounded in time and count.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Answers (good or not) by the port of the process that wrote them.
    by_port: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u16, usize>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

/// Whether a client tool the tests drive (curl, openssl) is installed. Fails loudly under
/// CI (which must install it); skips only when `ROLLD_SKIP_TLS_TOOLS=1` asks.
pub fn tool(name: &str) -> bool {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || Command::new(name)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !found {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        let skip = std::env::var("ROLLD_SKIP_TLS_TOOLS").as_deref() == Ok("1");
        assert!(
            skip && !ci,
            "{name} is not installed: `apt-get install -y {name}`, or set ROLLD_SKIP_TLS_TOOLS=1 to skip{}",
            if ci { " (under CI: .ci/run must install it)" } else { "" }
        );
        eprintln!(
            "SKIPPED (ROLLD_SKIP_TLS_TOOLS=1): {name} is not installed; this test did not run"
        );
    }
    found
}

/// The port in an example backend's answer (`hello from PORT ...`, `... from PORT ...`).
pub fn answered_by(body: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(body).ok()?;
    let after = &text[text.find(" from ")? + 6..];
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl Load {
    pub fn start(port: u16, workers: u64) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let by_port = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let workers = (0..workers)
            .map(|w| {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                let by_port = by_port.clone();
                rt.spawn(async move {
                    // A new connection per request: behind nginx, what is measured is
                    // rolld's drain, not nginx closing idle connections of old workers.
                    let client = Client::builder(TokioExecutor::new())
                        .pool_max_idle_per_host(0)
                        .build_http::<Full<Bytes>>();
                    let started = Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(120)
                        && n < 100_000
                    {
                        n += 1;
                        let delay = (n * 37 + w) % 150;
                        let answer =
                            request(&client, "GET", port, &format!("/?delay={delay}"), b"").await;
                        if let Some(from) = answer.as_ref().ok().and_then(|a| answered_by(&a.2)) {
                            *by_port.lock().expect("lock").entry(from).or_insert(0) += 1;
                        }
                        match answer {
                            Ok((200, _, body)) if body.starts_with(b"hello from ") => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, _, body)) => errors
                                .lock()
                                .expect("lock")
                                .push(format!("{status}: {}", String::from_utf8_lossy(&body))),
                            Err(e) => errors.lock().expect("lock").push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            errors,
            by_port,
            workers,
            rt,
        }
    }

    /// Answers so far by the port of the process that wrote them.
    pub fn by_port(&self) -> std::collections::HashMap<u16, usize> {
        self.by_port.lock().expect("lock").clone()
    }

    /// Requests answered well so far.
    pub fn ok(&self) -> usize {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have been answered well.
    pub fn wait_for_more(&self, n: usize) {
        let before = self.ok();
        wait_until(&format!("{n} more answered requests"), SOON, || {
            self.ok() >= before + n
        });
    }

    /// Stops the load and returns (answered well, errors).
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let workers = self.workers;
        self.rt.block_on(async {
            for w in workers {
                w.await.expect("load worker");
            }
        });
        let errors = std::mem::take(&mut *self.errors.lock().expect("lock"));
        (self.ok.load(std::sync::atomic::Ordering::Relaxed), errors)
    }
}
