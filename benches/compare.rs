//! rolld against nginx and against the backends themselves, side by side in one run.
//!
//! `cargo bench` starts rolld with four example backends, nginx (1 and 2 workers) in front
//! of the same four backends when nginx is installed, and drives each with wrk (HTTP/1.1,
//! HTTPS) and h2load (HTTP/2 without TLS, from `nghttp2-client`). It prints tables, the
//! cost of a roll, memory (idle, 10,000 idle clients, after a burst of 10,000 requests in
//! flight, the hold queue), a chaos run (app processes killed under load, while rolling)
//! and writes `target/rolld-bench.json`. Absolute numbers move with the machine
//! and its load; compare the ratios of one run. Every load is bounded in time.
//!
//! `ROLLD_BENCH_SECS` sets the seconds per load (default 3), `ROLLD_BENCH_ROUNDS` how many
//! rounds each cell runs, in rotated order, the median counting (default 3).
//! `ROLLD_BENCH_CHAOS_SECS` sets the length of the chaos cell (default 20), and
//! `ROLLD_BENCH_ONLY=chaos` or `ROLLD_BENCH_ONLY=instructions` (user-space instructions per
//! request of rolld and nginx, under valgrind) runs that cell alone.
//!
//! `cargo bench -- slow-clients` runs only the slow-clients cell: 100 clients uploading
//! and 100 downloading 1 MiB at 20 KiB/s through rolld in front of a synchronous app, for
//! 20 s, measuring rolld's RSS and what its buffers hold in memory and on disk against
//! their caps (it needs no wrk).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROLLD: &str = env!("CARGO_BIN_EXE_rolld");
const BACKEND: &str = env!("CARGO_BIN_EXE_rolld-example-backend");

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

fn wait_for_port(port: u16, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn which(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// A child process in a process group of its own, stopped with the whole group on drop
/// (nginx's workers outlive a killed master): SIGTERM, then SIGKILL after 5 s.
struct Proc(Child);

impl Proc {
    fn spawn(command: &mut Command) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        command.process_group(0).spawn().map(Proc)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// One wrk run.
#[derive(Clone, Debug, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    /// CPU time of the proxy's own processes per request (0 for direct).
    cpu_us_per_request: f64,
}

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%f p50=%d p99=%d p999=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

fn wrk(wrk: &Path, script: &Path, url: &str, connections: u32, secs: u64) -> Load {
    wrk_with(wrk, script, url, connections, secs, &[])
}

/// [`wrk`] with extra request headers (`Connection: close`: a new connection, and so a
/// new TLS handshake, for every request).
fn wrk_with(
    wrk: &Path,
    script: &Path,
    url: &str,
    connections: u32,
    secs: u64,
    headers: &[&str],
) -> Load {
    let threads = connections.min(2);
    let out = Command::new(wrk)
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("wrk said: {text}"));
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    Load {
        rps: field("rps"),
        p50_ms: field("p50") / 1000.0,
        p99_ms: field("p99") / 1000.0,
        p999_ms: field("p999") / 1000.0,
        errors: field("errors") as u64,
        cpu_us_per_request: 0.0,
    }
}

/// One cell: each target's load in turn, over `rounds` rounds with the order rotated so
/// each sees the same machine; per target the median round by req/s, the errors of all
/// rounds, and the median CPU its processes spent per request.
fn measure(
    targets: &[(String, u16, Vec<u32>)],
    rounds: usize,
    secs: u64,
    mut run: impl FnMut(u16) -> Load,
) -> BTreeMap<String, Load> {
    let mut runs: BTreeMap<String, Vec<Load>> = BTreeMap::new();
    for round in 0..rounds {
        for i in 0..targets.len() {
            let (name, port, pids) = &targets[(i + round) % targets.len()];
            let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
            let mut load = run(*port);
            let ticks = pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>() - before;
            let requests = load.rps * secs as f64;
            if !pids.is_empty() && requests > 0.0 {
                load.cpu_us_per_request = ticks as f64 / ticks_per_sec() * 1e6 / requests;
            }
            runs.entry(name.clone()).or_default().push(load);
        }
    }
    runs.into_iter()
        .map(|(name, mut loads)| {
            loads.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            let errors = loads.iter().map(|l| l.errors).sum();
            let mut cpu: Vec<f64> = loads.iter().map(|l| l.cpu_us_per_request).collect();
            cpu.sort_by(f64::total_cmp);
            let median = loads[loads.len() / 2].clone();
            let load = Load {
                errors,
                cpu_us_per_request: cpu[cpu.len() / 2],
                ..median
            };
            (name, load)
        })
        .collect()
}

/// The best req/s of the nginx targets in `cell` (0 without nginx).
fn best_nginx(cell: &BTreeMap<String, Load>) -> f64 {
    cell.iter()
        .filter(|(name, _)| name.starts_with("nginx"))
        .map(|(_, l)| l.rps)
        .fold(0.0, f64::max)
}

/// A table's header and one row per target of `cell`, rolld's with its ratio to the
/// best nginx.
fn cell_table(
    title: &str,
    connections: u32,
    targets: &[(String, u16, Vec<u32>)],
    cell: &BTreeMap<String, Load>,
    table: &mut String,
) {
    if table.is_empty() {
        let _ = writeln!(
            table,
            "{:<13} {:>4}  {:<10} {:>10} {:>8} {:>8} {:>8} {:>6} {:>8}   {:>10}",
            "cell",
            "conn",
            "target",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "errors",
            "cpu us/r",
            "rolld/best"
        );
    }
    let best = best_nginx(cell);
    for (name, _, _) in targets {
        let Some(l) = cell.get(name) else { continue };
        let ratio = if name == "rolld" && best > 0.0 {
            format!("{:>10.2}", l.rps / best)
        } else {
            String::new()
        };
        let cpu = if l.cpu_us_per_request > 0.0 {
            format!("{:.1}", l.cpu_us_per_request)
        } else {
            "-".into()
        };
        let _ = writeln!(table, "{title:<13} {connections:>4}  {name:<10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>6} {cpu:>8}   {ratio}", l.rps, l.p50_ms, l.p99_ms, l.p999_ms, l.errors);
    }
}

/// One h2load run: `connections` HTTP/2 connections (h2c, prior knowledge) with
/// `streams` concurrent streams each. h2load reports no percentiles: p50 holds the mean
/// and p99.9 the maximum, and p99 stays 0.
fn h2load(h2load: &Path, url: &str, connections: u32, streams: u32, secs: u64) -> Load {
    let out = Command::new(h2load)
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-m",
            &streams.to_string(),
            "-D",
            &secs.to_string(),
        ])
        .arg(url)
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    let after = |prefix: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .map(|rest| {
                rest.split([',', ' '])
                    .filter(|w| !w.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    // "finished in 3.00s, 35310.33 req/s, 3.84MB/s"
    let finished = after("finished in");
    let rps = finished.get(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // "requests: 105931 total, 105995 started, 105931 done, 105931 succeeded, 0 failed, 0 errored, 0 timeout"
    let requests = after("requests:");
    let count = |what: &str| -> u64 {
        requests
            .windows(2)
            .find(|w| w[1] == what)
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0)
    };
    // "status codes: 105931 2xx, 0 3xx, 0 4xx, 0 5xx"
    let statuses = after("status codes:");
    let not_2xx: u64 = statuses
        .windows(2)
        .filter(|w| w[1] != "2xx")
        .filter_map(|w| w[0].parse::<u64>().ok())
        .sum();
    // "time for request:   145us  24.02ms   1.77ms   1.06ms    79.43%"
    let ms = |v: &str| -> f64 {
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().map_or(0.0, |u| u / 1000.0)
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().unwrap_or(0.0)
        } else if let Some(s) = v.strip_suffix('s') {
            s.parse::<f64>().map_or(0.0, |s| s * 1000.0)
        } else {
            0.0
        }
    };
    let times = after("time for request:");
    if rps == 0.0 {
        eprintln!(
            "h2load said: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Load {
        rps,
        p50_ms: times.get(2).map_or(0.0, |v| ms(v)),
        p99_ms: 0.0,
        p999_ms: times.get(1).map_or(0.0, |v| ms(v)),
        errors: count("failed") + count("errored") + count("timeout") + not_2xx,
        cpu_us_per_request: 0.0,
    }
}

/// RSS of `pids` together, in KiB.
fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

/// `n` clients that each connect and send a request that takes `delay_ms` at the app,
/// all before any answer is read, so that all are in flight at once; then every answer
/// is read and the connections stay open, idle. Returns them and how many got 200.
fn burst(port: u16, n: usize, delay_ms: u64) -> (Vec<TcpStream>, usize) {
    let request = format!("GET /?delay={delay_ms} HTTP/1.1\r\nHost: bench\r\n\r\n");
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            break;
        };
        if s.write_all(request.as_bytes()).is_err() {
            break;
        }
        conns.push(s);
    }
    let mut ok = 0;
    for s in &mut conns {
        let mut buf = [0u8; 512];
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        if s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 200"))
        {
            ok += 1;
        }
    }
    (conns, ok)
}

/// The `n` direct children of `pid` (nginx's workers), waiting up to 5 s for all of them:
/// the CPU of every worker counts.
fn children_of(pid: u32, n: usize) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let kids: Vec<u32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|p| {
                        let stat =
                            std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                        stat.rsplit(')')
                            .next()
                            .and_then(|r| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                            == Some(pid)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if kids.len() >= n {
            return kids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} of {n} nginx workers found",
            kids.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let f = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    f(11) + f(12) // utime + stime, in clock ticks
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn reload(config: &Path) -> Duration {
    let start = Instant::now();
    let out = Command::new(ROLLD)
        .args(["reload", "-c"])
        .arg(config)
        .output()
        .expect("rolld reload");
    assert!(
        out.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

fn backend_ports(config: &Path) -> Vec<u16> {
    let out = Command::new(ROLLD)
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    status["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .map(|p| p as u16)
        .collect()
}

/// The same certificate for rolld and nginx: `(port, cert file, key file)`.
type TlsListen<'a> = (u16, &'a Path, &'a Path);

/// How nginx passes a request on, as rolld does: HTTP/1.1 keep-alive to the backends, the
/// client's `Host`, and who the client is. rolld always adds these headers; an operator
/// of nginx in front of an app sets them too, so the app gets the same request from both.
const NGINX_PROXY: &str = "            proxy_pass http://app;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_set_header Host $host;\n            proxy_set_header X-Real-IP $remote_addr;\n            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            proxy_set_header X-Forwarded-Proto $scheme;\n            proxy_set_header X-Forwarded-Host $host;\n";

/// nginx's `user` line when rolld runs as root (else its workers would drop to `nobody`),
/// and the upstream block of the backends, the same for every nginx of the bench:
/// keep-alive connections that are never recycled, `max_fails=0` so that no burst takes a
/// backend out of the set.
fn nginx_user_and_upstream(backends: &[u16]) -> (&'static str, String) {
    let user = if nix::unistd::getuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    let servers: String = backends
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p} max_fails=0;\n"))
        .collect();
    let upstream = format!("    upstream app {{\n{servers}        keepalive 256;\n        keepalive_requests 1000000;\n        keepalive_timeout 300s;\n    }}\n");
    (user, upstream)
}

fn start_nginx(
    nginx: &Path,
    dir: &Path,
    port: u16,
    backends: &[u16],
    workers: u32,
    tls: TlsListen<'_>,
    h2_port: u16,
) -> Proc {
    let (user, upstream) = nginx_user_and_upstream(backends);
    // nginx as a careful operator tunes it for this load: keep-alive to the backends that
    // is never recycled (`keepalive_requests`, both sides), proxy buffers that hold a
    // whole 64 KiB answer in memory (the default 8 x 4 KiB spills it to a temporary file),
    // and the error log at `warn`, where such a spill would show (counted below).
    // `worker_connections` room for the memory cell's 10,000 clients and as many upstream
    // connections in one worker (nginx preallocates them, so more would inflate its
    // memory), and `max_fails=0`: that burst must not take the backends out of the set.
    // HTTPS as nginx's docs advise: TLS 1.2 and 1.3, a shared session cache.
    let (tls_port, cert, key) = tls;
    let https = format!(
        "    server {{\n        listen 127.0.0.1:{tls_port} ssl backlog=1024;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:SSL:10m;\n        keepalive_requests 1000000;\n        location / {{\n{NGINX_PROXY}        }}\n    }}\n",
        cert.display(),
        key.display()
    );
    // HTTP/2 without TLS needs a port of its own in this nginx (1.22: `listen ... http2`).
    let h2c = format!(
        "    server {{\n        listen 127.0.0.1:{h2_port} http2 backlog=1024;\n        keepalive_requests 1000000;\n        location / {{\n{NGINX_PROXY}        }}\n    }}\n"
    );
    let conf = format!(
        "{user}worker_processes {workers};\npid nginx.pid;\nerror_log nginx-error.log warn;\nworker_rlimit_nofile 65536;\nevents {{ worker_connections 24576; }}\nhttp {{\n    access_log off;\n    client_body_temp_path tmp-body;\n    proxy_temp_path tmp-proxy;\n    fastcgi_temp_path tmp-fastcgi;\n    uwsgi_temp_path tmp-uwsgi;\n    scgi_temp_path tmp-scgi;\n{upstream}    server {{\n        listen 127.0.0.1:{port} backlog=1024;\n        keepalive_requests 1000000;\n        location / {{\n{NGINX_PROXY}            proxy_buffer_size 16k;\n            proxy_buffers 16 8k;\n            proxy_busy_buffers_size 32k;\n        }}\n    }}\n{https}{h2c}}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let nginx = Proc::spawn(
        Command::new(nginx)
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .args(["-c", "nginx.conf", "-g", "daemon off;"])
            .stdin(Stdio::null()),
    )
    .expect("start nginx");
    assert!(
        wait_for_port(port, Duration::from_secs(10)),
        "nginx did not start"
    );
    nginx
}

/// Latency of requests sent through `port` by `clients` keep-alive connections for
/// `secs`, with a roll in the middle: p99 of the second around the swap and of a quiet one.
fn swap_cost(port: u16, config: &Path, clients: usize, secs: u64) -> (f64, f64, usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    let start = Instant::now();
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(f64, f64)>::new()));
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (samples, errors) = (samples.clone(), errors.clone());
        tasks.push(rt.spawn(async move {
            let failed = || errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // A failed request counts, and the client goes on on a new connection.
            'connect: while start.elapsed() < Duration::from_secs(secs) {
                let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    failed();
                    continue;
                };
                let Ok((mut send, conn)) = hyper::client::conn::http1::handshake::<
                    _,
                    http_body_util::Empty<bytes::Bytes>,
                >(hyper_util::rt::TokioIo::new(stream))
                .await
                else {
                    failed();
                    continue;
                };
                tokio::spawn(conn);
                while start.elapsed() < Duration::from_secs(secs) {
                    let req = http::Request::get("/")
                        .header("host", "bench")
                        .body(http_body_util::Empty::new())
                        .expect("req");
                    let t = Instant::now();
                    let res = match send.send_request(req).await {
                        Ok(res) => res,
                        Err(_) => {
                            failed();
                            continue 'connect;
                        }
                    };
                    let ok = res.status().is_success();
                    use http_body_util::BodyExt;
                    if res.into_body().collect().await.is_err() || !ok {
                        failed();
                        continue 'connect;
                    }
                    let at = start.elapsed().as_secs_f64();
                    samples
                        .lock()
                        .expect("lock")
                        .push((at, t.elapsed().as_secs_f64() * 1000.0));
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs / 2));
    let roll_start = start.elapsed().as_secs_f64();
    reload(config);
    let roll_end = start.elapsed().as_secs_f64();
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let samples = samples.lock().expect("lock");
    let p99 = |from: f64, to: f64| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, l)| *l)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64) * 0.99) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let mid = (roll_start + roll_end) / 2.0;
    let around = p99((mid - 0.5).min(roll_start), (mid + 0.5).max(roll_end));
    let quiet = p99(1.0, 2.0);
    (
        around,
        quiet,
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// What the chaos cell measured.
#[derive(Debug, Default)]
struct Chaos {
    secs: u64,
    requests: u64,
    kills: u64,
    rolls: u64,
    /// Requests that got anything but their 200 and right body.
    lost: u64,
    /// Requests the access log says were sent again.
    retried: u64,
    p99_retried_ms: f64,
    p99_not_retried_ms: f64,
    /// Requests without an access log line (rolld's log queue drops rather than block).
    unlogged: u64,
}

/// The p99 of `v` (0 when empty).
fn p99_of(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64) * 0.99) as usize)
        .or(v.last())
        .copied()
        .unwrap_or(0.0)
}

/// A random serving process whose upstream is available, when at least two are.
fn chaos_victim(config: &Path, pick: usize) -> Option<i32> {
    let out = Command::new(ROLLD)
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let serving = status["generation"].as_u64()?;
    let available: Vec<String> = status["upstreams"]
        .as_array()?
        .iter()
        .filter(|u| u["available"] == true)
        .filter_map(|u| Some(u["addr"].as_str()?.rsplit(':').next()?.to_string()))
        .collect();
    let pids: Vec<i32> = status["processes"]
        .as_array()?
        .iter()
        .filter(|p| p["generation"] == serving && p["state"] == "running")
        .filter(|p| available.contains(&p["port"].to_string()))
        .filter_map(|p| p["pid"].as_i64().map(|pid| pid as i32))
        .collect();
    (pids.len() >= 2).then(|| pids[pick % pids.len()])
}

/// The chaos cell (issue 16's measurement): 64 keep-alive clients send GETs flat out
/// (each takes ~2 ms in the app) through a rolld of four processes, while a random
/// serving process is SIGKILLed every 0.7 s and rolld rolls every 2 s. Which requests
/// were sent again comes from rolld's access log (`retries=`), by a request id in the
/// path; their p99 is set against the others'.
fn chaos(dir: &Path, secs: u64) -> Chaos {
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let listen = free_ports(1)[0];
    let config = dir.join("chaos.yml");
    let log_path = dir.join("chaos-rolld.log");
    let rolld = start_rolld(
        &config,
        &format!("listen: 127.0.0.1:{listen}\nproxy:\n  access_log: true\napp-servers:\n  cmd: '{BACKEND} {{port}}'\n  processes: 4\n  port_range: 30000-31999\n  health: {{path: /health, interval: 5ms}}\n  drain_timeout: 30s\n  stdout: 'chaos-{{port}}.log'\n"),
        &log_path,
        "warn,rolld::access=info",
        listen,
    );
    let start = Instant::now();
    while backend_ports(&config).len() < 4 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicU64::new(0));
    // (request id, latency ms) of each request answered right.
    let samples = Arc::new(Mutex::new(Vec::<(String, f64)>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..64 {
        let (stop, lost, samples) = (stop.clone(), lost.clone(), samples.clone());
        tasks.push(rt.spawn(async move {
            let mut n = 0u64;
            let mut mine = Vec::new();
            'connect: while !stop.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(secs + 30)
            {
                let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", listen)).await else {
                    lost.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let Ok((mut send, conn)) = hyper::client::conn::http1::handshake::<
                    _,
                    http_body_util::Empty<bytes::Bytes>,
                >(hyper_util::rt::TokioIo::new(stream))
                .await
                else {
                    lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                tokio::spawn(conn);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("{client}-{n}");
                    let req = http::Request::get(format!("/?delay=2&id={id}"))
                        .header("host", "bench")
                        .body(http_body_util::Empty::new())
                        .expect("req");
                    let t = Instant::now();
                    let Ok(res) = send.send_request(req).await else {
                        lost.fetch_add(1, Ordering::Relaxed);
                        continue 'connect;
                    };
                    let ok = res.status().is_success();
                    use http_body_util::BodyExt;
                    match res.into_body().collect().await.map(|b| b.to_bytes()) {
                        Ok(body) if ok && body.starts_with(b"hello from ") => {
                            mine.push((id, t.elapsed().as_secs_f64() * 1000.0));
                        }
                        _ => {
                            lost.fetch_add(1, Ordering::Relaxed);
                            continue 'connect;
                        }
                    }
                }
            }
            samples.lock().expect("lock").extend(mine);
        }));
    }
    // Rolls every 2 s, on their own thread: a roll's round trip takes a while.
    let rolls = Arc::new(AtomicU64::new(0));
    let roller = {
        let (stop, rolls, config) = (stop.clone(), rolls.clone(), config.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(2));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let done = Command::new(ROLLD)
                    .args(["reload", "-c"])
                    .arg(&config)
                    .output()
                    .is_ok_and(|o| o.status.success());
                if done {
                    rolls.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut rng = rand::thread_rng();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(700));
        if let Some(pid) = chaos_victim(&config, rng.gen()) {
            let killed = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if killed.is_ok() {
                kills += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let _ = roller.join();
    drop(rolld);
    // retries= of each request id, from the access log.
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut retries = std::collections::HashMap::new();
    for line in text.lines().filter(|l| l.contains("rolld::access")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .map(str::to_string)
        };
        let (Some(path), Some(n)) = (field("path="), field("retries=")) else {
            continue;
        };
        if let Some(id) = path.split("id=").nth(1) {
            retries.insert(id.to_string(), n.parse::<u32>().unwrap_or(0));
        }
    }
    let samples = std::mem::take(&mut *samples.lock().expect("lock"));
    let (mut retried, mut plain, mut unlogged) = (Vec::new(), Vec::new(), 0);
    for (id, ms) in &samples {
        match retries.get(id) {
            Some(0) => plain.push(*ms),
            Some(_) => retried.push(*ms),
            None => unlogged += 1,
        }
    }
    let lost = lost.load(Ordering::Relaxed);
    Chaos {
        secs,
        requests: samples.len() as u64 + lost,
        kills,
        rolls: rolls.load(Ordering::Relaxed),
        lost,
        retried: retried.len() as u64,
        p99_retried_ms: p99_of(&mut retried),
        p99_not_retried_ms: p99_of(&mut plain),
        unlogged,
    }
}

impl Chaos {
    fn line(&self) -> String {
        format!(
            "chaos ({} s, 64 keep-alive clients, GETs of ~2 ms; a serving process SIGKILLed every 0.7 s, a roll every 2 s): {} requests, {} kills, {} rolls, {} lost; {} sent again: p99 {:.2} ms retried vs {:.2} ms not ({} without an access log line)",
            self.secs,
            self.requests,
            self.kills,
            self.rolls,
            self.lost,
            self.retried,
            self.p99_retried_ms,
            self.p99_not_retried_ms,
            self.unlogged
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "seconds": self.secs,
            "requests": self.requests,
            "kills": self.kills,
            "rolls": self.rolls,
            "lost": self.lost,
            "retried": self.retried,
            "p99_retried_ms": self.p99_retried_ms,
            "p99_not_retried_ms": self.p99_not_retried_ms,
            "unlogged": self.unlogged,
        })
    }
}

/// Opens `n` keep-alive connections, one request on each, and leaves them idle.
fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            break;
        };
        if s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .is_err()
        {
            break;
        }
        let mut buf = [0u8; 512];
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if s.read(&mut buf).unwrap_or(0) == 0 {
            break;
        }
        conns.push(s);
    }
    conns
}

/// What the hold queue costs: see [`held_cell`].
struct Held {
    before_kib: u64,
    held_kib: u64,
    held: usize,
    after_kib: u64,
    refused: usize,
    refuse_ms: f64,
    released_ok: usize,
}

/// Pauses rolld, fills its hold queue (`max_held`, 1024) with one request per
/// connection, sends 3,000 more that must be refused at once, then resumes.
fn held_cell(port: u16, config: &Path, pid: u32) -> Held {
    let control = |args: &[&str]| {
        let out = Command::new(ROLLD)
            .args(args)
            .arg("-c")
            .arg(config)
            .output()
            .expect("rolld control command");
        assert!(
            out.status.success(),
            "rolld {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    let before_kib = rss_kib(pid);
    control(&["pause", "--timeout", "2m"]);
    let mut held = Vec::new();
    for _ in 0..1024 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            break;
        };
        if s.write_all(request).is_ok() {
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let held_kib = rss_kib(pid);
    let (mut refused, flood) = (0, 3000);
    let started = Instant::now();
    for _ in 0..flood {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut answer = Vec::new();
        if s.write_all(request).is_ok()
            && s.read_to_end(&mut answer).is_ok()
            && answer.starts_with(b"HTTP/1.1 503")
        {
            refused += 1;
        }
    }
    let refuse_ms = started.elapsed().as_secs_f64() * 1000.0 / flood as f64;
    let after_kib = rss_kib(pid);
    control(&["resume"]);
    let mut released_ok = 0;
    for s in &mut held {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut answer = Vec::new();
        if s.read_to_end(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.1 200") {
            released_ok += 1;
        }
    }
    Held {
        before_kib,
        held_kib,
        held: held.len(),
        after_kib,
        refused,
        refuse_ms,
        released_ok,
    }
}

/// Writes `yaml` to `config`, starts rolld on it with its log in `log` at `rust_log`, and
/// waits until it listens on `port`.
fn start_rolld(config: &Path, yaml: &str, log: &Path, rust_log: &str, port: u16) -> Proc {
    std::fs::write(config, yaml).expect("config");
    let log = std::fs::File::create(log).expect("log");
    let rolld = Proc::spawn(
        Command::new(ROLLD)
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stderr(log),
    )
    .expect("start rolld");
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "rolld did not start"
    );
    rolld
}

fn raise_nofile() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

/// Slow clients of the slow-clients cell, each way.
const SLOW_CLIENTS: usize = 100;
/// Bytes each slow client sends or reads, and its pace in bytes per second.
const SLOW_SIZE: usize = 1 << 20;
const SLOW_RATE: usize = 20 * 1024;
/// The buffer caps of the slow-clients cell.
const CELL_MEMORY: u64 = 16 << 20;
const CELL_DISK: u64 = 256 << 20;

/// One slow client: uploads (`upload`) or downloads `SLOW_SIZE` bytes at `SLOW_RATE`
/// until done or `stop`; returns whether it completed.
fn slow_client(port: u16, upload: bool, stop: &std::sync::atomic::AtomicBool) -> bool {
    use std::sync::atomic::Ordering;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    else {
        return false;
    };
    if !upload {
        // A small receive buffer, set before connecting: the client reads at its pace.
        let _ = socket.set_recv_buffer_size(4096);
    }
    if socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .is_err()
    {
        return false;
    }
    let mut s: TcpStream = socket.into();
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let head = if upload {
        format!("POST /echo HTTP/1.1\r\nHost: bench\r\nContent-Length: {SLOW_SIZE}\r\nConnection: close\r\n\r\n")
    } else {
        format!("GET /bytes?n={SLOW_SIZE} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    };
    if s.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let started = Instant::now();
    let mut moved = 0usize;
    let chunk = vec![b'u'; 2048];
    let mut buf = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
        let allowed = (started.elapsed().as_secs_f64() * SLOW_RATE as f64) as usize;
        if moved >= allowed {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if upload {
            if moved >= SLOW_SIZE {
                return true;
            }
            let n = (SLOW_SIZE - moved).min(chunk.len());
            match s.write(&chunk[..n]) {
                Ok(n) => moved += n,
                Err(_) => continue,
            }
        } else {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => moved += n,
                Err(_) => continue,
            }
        }
    }
    false
}

/// The value of an unlabelled metric in rolld's `/metrics` on `admin`.
fn metric(admin: u16, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `GET /` through `port` on a new connection: its time, or None if it failed.
fn timed_get(port: u16) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    answer.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

/// 200 slow clients (half uploading, half downloading) through rolld in front of a
/// synchronous app with 4 workers, for `secs`: rolld's RSS, its buffers' peaks against
/// their caps, and a fast client's latency meanwhile.
fn slow_clients_cell(dir: &Path, secs: u64) -> serde_json::Value {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let [listen, admin] = free_ports(2)[..] else {
        unreachable!("two ports")
    };
    let config = dir.join("slow.yml");
    let yaml = format!("listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nproxy:\n  max_connections: 10000\n  request_buffer: 64k\n  response_buffer: 64k\n  buffer_memory: {CELL_MEMORY}\n  buffer_disk: {CELL_DISK}\napp-servers:\n  cmd: '{BACKEND} {{port}} --sync-workers 4'\n  processes: 1\n  port_range: 20000-29999\n  health: {{path: /health, interval: 5ms}}\n");
    let rolld = start_rolld(&config, &yaml, &dir.join("slow-rolld.log"), "warn", listen);
    let start = Instant::now();
    while timed_get(listen).is_none() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rolld.0.id();
    let idle_rss = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2 * SLOW_CLIENTS)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || slow_client(listen, i % 2 == 0, &stop))
        })
        .collect();
    let (mut peak_rss, mut peak_memory, mut peak_disk) = (0u64, 0u64, 0u64);
    let mut fast = Vec::new();
    let mut fast_failed = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        peak_rss = peak_rss.max(rss_kib(pid));
        peak_memory = peak_memory.max(metric(admin, "rolld_buffer_memory_bytes").unwrap_or(0));
        peak_disk = peak_disk.max(metric(admin, "rolld_buffer_disk_bytes").unwrap_or(0));
        match timed_get(listen) {
            Some(took) => fast.push(took),
            None => fast_failed += 1,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let requests_spilled = metric(admin, "rolld_buffer_requests_spilled_total").unwrap_or(0);
    let responses_spilled = metric(admin, "rolld_buffer_responses_spilled_total").unwrap_or(0);
    stop.store(true, Ordering::SeqCst);
    let completed = clients
        .into_iter()
        .map(|c| c.join().unwrap_or(false))
        .filter(|done| *done)
        .count();
    drop(rolld);
    fast.sort();
    let fast_max = fast.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let fast_p50 = fast
        .get(fast.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let mb = |b: u64| b as f64 / 1048576.0;
    println!(
        "slow clients ({SLOW_CLIENTS} uploading and {SLOW_CLIENTS} downloading 1 MiB at 20 KiB/s, {secs} s, sync app with 4 workers): rolld RSS {:.1} MB idle, {:.1} MB peak; buffers peak {:.1} MiB in memory (cap {:.0}), {:.1} MiB on disk (cap {:.0}); {requests_spilled} request(s) and {responses_spilled} answer(s) spilled; a fast client's GET / every 200 ms: median {fast_p50:.1} ms, max {fast_max:.1} ms, {fast_failed} failed; {completed} slow transfer(s) finished",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        mb(peak_memory),
        mb(CELL_MEMORY),
        mb(peak_disk),
        mb(CELL_DISK),
    );
    serde_json::json!({
        "slow_clients": 2 * SLOW_CLIENTS,
        "rss_idle_mb": idle_rss as f64 / 1024.0,
        "rss_peak_mb": peak_rss as f64 / 1024.0,
        "buffer_memory_peak_bytes": peak_memory,
        "buffer_memory_cap_bytes": CELL_MEMORY,
        "buffer_disk_peak_bytes": peak_disk,
        "buffer_disk_cap_bytes": CELL_DISK,
        "requests_spilled": requests_spilled,
        "responses_spilled": responses_spilled,
        "fast_p50_ms": fast_p50,
        "fast_max_ms": fast_max,
        "fast_failed": fast_failed,
    })
}

/// Requests each target answers while its instructions are counted.
const COUNTED_REQUESTS: usize = 20_000;
/// Keep-alive connections they come over, each sending its next request when the last
/// answer is in.
const COUNTED_CONNECTIONS: usize = 16;

/// User-space instructions per small request of rolld and of nginx (one worker, no master
/// process), counted by valgrind's callgrind over the same requests to the same four
/// backends: the work each does outside the kernel, in a figure that the noise of a shared
/// machine does not move (callgrind counts instructions, not time). Both run under valgrind
/// only for this cell. `None` without valgrind.
fn instructions_cell(dir: &Path, nginx: Option<&Path>) -> Option<serde_json::Value> {
    let (Some(valgrind), Some(control)) = (which("valgrind"), which("callgrind_control")) else {
        println!("instructions: valgrind is not installed (apt-get install -y valgrind): skipped");
        return None;
    };
    let dir = dir.join("counted");
    std::fs::create_dir_all(&dir).expect("dir");
    let listen = free_ports(1)[0];
    let config = dir.join("rolld.yml");
    std::fs::write(&config, format!("listen: 127.0.0.1:{listen}\napp-servers:\n  cmd: '{BACKEND} {{port}}'\n  processes: 4\n  port_range: 40000-44999\n  health: {{path: /health, interval: 1s}}\n")).expect("config");
    let counted = |name: &str, command: &mut Command, port: u16| -> Option<(Proc, f64)> {
        let out = dir.join(format!("{name}.callgrind"));
        let proc = Proc::spawn(
            Command::new(&valgrind)
                .args(["--tool=callgrind", "--instr-atstart=no"])
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(command.get_program())
                .args(command.get_args())
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("valgrind");
        if !wait_for_port(port, Duration::from_secs(120)) {
            println!("instructions: {name} did not start under valgrind");
            return None;
        }
        let pid = proc.0.id().to_string();
        // Warm: connections to the backends open, buffers grown.
        keep_alive_gets(port, COUNTED_CONNECTIONS, 2_000)?;
        let callgrind = |what: &str| {
            Command::new(&control)
                .args([what, &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let started = callgrind("--instr=on") && callgrind("--zero");
        let answered = keep_alive_gets(port, COUNTED_CONNECTIONS, COUNTED_REQUESTS);
        let dumped = callgrind("--dump");
        if !(started && dumped) || answered != Some(COUNTED_REQUESTS) {
            println!("instructions: counting {name} failed ({answered:?} answered)");
            return None;
        }
        // The dump is written as `<out>.<n>`; its `totals:` line counts every instruction.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dumps = std::fs::read_dir(&dir).ok()?.flatten().filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}.callgrind."))
            });
            let total = dumps
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("totals:").or(l.strip_prefix("summary:")))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
                .max();
            if let Some(total) = total {
                return Some((proc, total as f64 / COUNTED_REQUESTS as f64));
            }
            if Instant::now() > deadline {
                println!("instructions: no callgrind dump of {name}");
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut rolld_command = Command::new(ROLLD);
    rolld_command.arg(&config);
    let (rolld, rolld_per_request) = counted("rolld", &mut rolld_command, listen)?;
    let start = Instant::now();
    let mut backends = backend_ports(&config);
    while backends.len() < 4 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
        backends = backend_ports(&config);
    }
    let mut line = format!(
        "instructions (callgrind, user space, {COUNTED_REQUESTS} small GETs over {COUNTED_CONNECTIONS} keep-alive connections): rolld {rolld_per_request:.0} a request"
    );
    let mut json = serde_json::json!({ "rolld": rolld_per_request });
    if let Some(nginx) = nginx {
        let port = free_ports(1)[0];
        let ndir = dir.join("nginx");
        std::fs::create_dir_all(&ndir).expect("dir");
        let (user, upstream) = nginx_user_and_upstream(&backends);
        std::fs::write(ndir.join("nginx.conf"), format!("{user}daemon off;\nmaster_process off;\npid nginx.pid;\nerror_log nginx-error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n    client_body_temp_path tmp-body;\n    proxy_temp_path tmp-proxy;\n    fastcgi_temp_path tmp-fastcgi;\n    uwsgi_temp_path tmp-uwsgi;\n    scgi_temp_path tmp-scgi;\n{upstream}    server {{\n        listen 127.0.0.1:{port} backlog=1024;\n        keepalive_requests 1000000;\n        location / {{\n{NGINX_PROXY}        }}\n    }}\n}}\n")).expect("nginx.conf");
        let mut nginx_command = Command::new(nginx);
        nginx_command
            .arg("-p")
            .arg(format!("{}/", ndir.display()))
            .args(["-c", "nginx.conf"]);
        if let Some((nginx_proc, nginx_per_request)) = counted("nginx", &mut nginx_command, port) {
            drop(nginx_proc);
            line += &format!(
                ", nginx {nginx_per_request:.0} ({:.2}x nginx's)",
                rolld_per_request / nginx_per_request
            );
            json["nginx"] = serde_json::json!(nginx_per_request);
        }
    }
    drop(rolld);
    println!("{line}");
    Some(json)
}

/// Sends `total` `GET /`s over `connections` keep-alive connections, each sending its next
/// request once the last answer is in; how many were answered 200, or `None` when a
/// connection failed.
fn keep_alive_gets(port: u16, connections: usize, total: usize) -> Option<usize> {
    let each = total / connections;
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            std::thread::spawn(move || -> Option<usize> {
                let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
                let mut buf = Vec::with_capacity(4096);
                let mut ok = 0;
                for _ in 0..each {
                    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
                    buf.clear();
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).ok().filter(|&n| n > 0)?;
                        buf.extend_from_slice(&chunk[..n]);
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())?;
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).ok().filter(|&n| n > 0)?;
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    ok += usize::from(head.starts_with("http/1.1 200"));
                }
                Some(ok)
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().ok().flatten()).sum()
}

fn main() {
    raise_nofile();
    if std::env::args().skip(1).any(|a| a == "slow-clients") {
        let dir = tempfile::tempdir().expect("temp dir");
        println!(
            "rolld benchmark on {}: the slow-clients cell only",
            machine()
        );
        slow_clients_cell(dir.path(), 20);
        return;
    }
    let secs: u64 = std::env::var("ROLLD_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rounds: usize = std::env::var("ROLLD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let chaos_secs: u64 = std::env::var("ROLLD_BENCH_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    raise_nofile();
    if std::env::var("ROLLD_BENCH_ONLY").as_deref() == Ok("chaos") {
        let dir = tempfile::tempdir().expect("temp dir");
        println!("{}", chaos(dir.path(), chaos_secs).line());
        return;
    }
    if std::env::var("ROLLD_BENCH_ONLY").as_deref() == Ok("instructions") {
        let dir = tempfile::tempdir().expect("temp dir");
        instructions_cell(dir.path(), which("nginx").as_deref());
        return;
    }
    let Some(wrk_bin) = which("wrk") else {
        eprintln!("rolld bench: wrk is not installed (apt-get install -y wrk); nothing measured");
        return;
    };
    let nginx_bin = which("nginx");
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("report.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("lua");

    // Backend start time on its own, for the roll cost's baseline.
    let port = free_ports(1)[0];
    let t = Instant::now();
    let backend = Proc::spawn(
        Command::new(BACKEND)
            .arg(port.to_string())
            .stdout(Stdio::null()),
    )
    .expect("backend");
    assert!(wait_for_port(port, Duration::from_secs(10)));
    let backend_start = t.elapsed();
    drop(backend);

    // One ECDSA P-256 certificate for rolld's and nginx's HTTPS.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .and_then(|p| p.self_signed(&key))
        .expect("certificate");
    let (cert_file, key_file) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).expect("cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("key");

    // rolld with four backends.
    let [listen, tls_listen] = free_ports(2)[..] else {
        unreachable!("two ports")
    };
    let config = dir.path().join("rolld.yml");
    let yaml = format!("listen: 127.0.0.1:{listen}\ntls:\n  listen: 127.0.0.1:{tls_listen}\n  certificates:\n    - {{cert: tls.pem, key: tls.key}}\napp-servers:\n  cmd: '{BACKEND} {{port}}'\n  processes: 4\n  port_range: 20000-29999\n  health: {{path: /health, interval: 5ms}}\n  drain_timeout: 30s\n  stdout: 'backend-{{port}}.log'\n");
    let rolld = start_rolld(
        &config,
        &yaml,
        &dir.path().join("rolld.log"),
        "warn",
        listen,
    );
    let rolld_pid = rolld.0.id();
    assert!(
        wait_for_port(tls_listen, Duration::from_secs(30)),
        "rolld's TLS listener did not start"
    );
    let start = Instant::now();
    while backend_ports(&config).len() < 4 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_kib(rolld_pid);

    println!(
        "rolld benchmark on {} — load generator: wrk ({}), {secs} s per load, median of {rounds} rounds in rotated order",
        machine(),
        wrk_bin.display()
    );
    let backends = backend_ports(&config);
    let mut results: BTreeMap<String, Load> = BTreeMap::new();
    // Each target with the processes whose CPU time it costs.
    let mut targets: Vec<(String, u16, Vec<u32>)> = vec![
        ("direct".to_string(), backends[0], vec![]),
        ("rolld".to_string(), listen, vec![rolld_pid]),
    ];
    let mut tls_targets: Vec<(String, u16, Vec<u32>)> =
        vec![("rolld".to_string(), tls_listen, vec![rolld_pid])];
    // rolld serves HTTP/2 without TLS on its one listener.
    let mut h2_targets: Vec<(String, u16, Vec<u32>)> =
        vec![("rolld".to_string(), listen, vec![rolld_pid])];
    let mut nginx_procs = Vec::new();
    match &nginx_bin {
        Some(nginx) => {
            for workers in [1u32, 2] {
                let [port, tls_port, h2_port] = free_ports(3)[..] else {
                    unreachable!("three ports")
                };
                let ndir = dir.path().join(format!("nginx{workers}"));
                std::fs::create_dir_all(&ndir).expect("dir");
                let tls = (tls_port, cert_file.as_path(), key_file.as_path());
                let master = start_nginx(nginx, &ndir, port, &backends, workers, tls, h2_port);
                let pids = children_of(master.0.id(), workers as usize);
                nginx_procs.push(master);
                targets.push((format!("nginx-{workers}w"), port, pids.clone()));
                tls_targets.push((format!("nginx-{workers}w"), tls_port, pids.clone()));
                h2_targets.push((format!("nginx-{workers}w"), h2_port, pids));
            }
        }
        None => println!("nginx is not installed (apt-get install -y nginx): skipped nginx"),
    }
    for (path, body) in [("/", "small"), ("/bytes?n=65536", "64KiB")] {
        for connections in [1u32, 64, 256] {
            let cell = measure(&targets, rounds, secs, |port| {
                let url = format!("http://127.0.0.1:{port}{path}");
                wrk(&wrk_bin, &script, &url, connections, secs)
            });
            for (name, load) in cell {
                results.insert(format!("{body}/c{connections}/{name}"), load);
            }
        }
    }

    // The table.
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<6} {:>4}  {:<10} {:>10} {:>8} {:>8} {:>8} {:>6} {:>8}   {:>10} {:>10}",
        "body",
        "conn",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "cpu us/r",
        "rolld/best",
        "rolld/dir"
    );
    for body in ["small", "64KiB"] {
        for connections in [1u32, 64, 256] {
            let get = |name: &str| results.get(&format!("{body}/c{connections}/{name}"));
            let best_nginx = ["nginx-1w", "nginx-2w"]
                .iter()
                .filter_map(|n| get(n))
                .map(|l| l.rps)
                .fold(0.0, f64::max);
            for (name, _, _) in &targets {
                let Some(l) = get(name) else { continue };
                let ratios = if name == "rolld" {
                    let vs_nginx = if best_nginx > 0.0 {
                        format!("{:.2}", l.rps / best_nginx)
                    } else {
                        "-".into()
                    };
                    let vs_direct =
                        get("direct").map_or("-".into(), |d| format!("{:.2}", l.rps / d.rps));
                    format!("{vs_nginx:>10} {vs_direct:>10}")
                } else {
                    String::new()
                };
                let cpu = if l.cpu_us_per_request > 0.0 {
                    format!("{:.1}", l.cpu_us_per_request)
                } else {
                    "-".into()
                };
                let _ = writeln!(table, "{body:<6} {connections:>4}  {name:<10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>6} {cpu:>8}   {ratios}", l.rps, l.p50_ms, l.p99_ms, l.p999_ms, l.errors);
            }
        }
    }
    print!("{table}");

    // A new connection per request (the accept and setup cost browsers and many clients
    // pay), and HTTPS: keep-alive, and a new connection (a full handshake: wrk resumes no
    // session) for every request; 64 connections, small answers.
    let mut tls_table = String::new();
    let connections = 64u32;
    let close = &["Connection: close"][..];
    for (title, scheme, targets, headers) in [
        ("http-new-conn", "http", &targets, close),
        ("https-keep-alive", "https", &tls_targets, &[][..]),
        ("https-new-conn", "https", &tls_targets, close),
    ] {
        let cell = measure(targets, rounds, secs, |port| {
            let url = format!("{scheme}://127.0.0.1:{port}/");
            wrk_with(&wrk_bin, &script, &url, connections, secs, headers)
        });
        cell_table(title, connections, targets, &cell, &mut tls_table);
        for (name, load) in cell {
            results.insert(format!("{title}/c{connections}/{name}"), load);
        }
    }
    // HTTP/2 without TLS (prior knowledge), 8 connections of 8 streams: h2load.
    match which("h2load") {
        Some(h2load_bin) => {
            let cell = measure(&h2_targets, rounds, secs, |port| {
                h2load(
                    &h2load_bin,
                    &format!("http://127.0.0.1:{port}/"),
                    8,
                    8,
                    secs,
                )
            });
            cell_table("h2c", 64, &h2_targets, &cell, &mut tls_table);
            for (name, load) in cell {
                results.insert(format!("h2c/c64/{name}"), load);
            }
        }
        None => {
            println!("h2load is not installed (apt-get install -y nghttp2-client): skipped HTTP/2")
        }
    }
    print!("{tls_table}");
    // A response nginx had to spill to disk would handicap it: say so if it happened.
    let nginx_spills: usize = [1, 2]
        .iter()
        .map(|w| {
            std::fs::read_to_string(dir.path().join(format!("nginx{w}/nginx-error.log")))
                .unwrap_or_default()
                .matches("buffered to a temporary file")
                .count()
        })
        .sum();
    if nginx_bin.is_some() {
        println!("nginx: {nginx_spills} answer(s) spilled to temporary files (error log at warn)");
    }

    // Roll cost, without and with traffic, and rolld's CPU per roll.
    let rolls = 5;
    let cpu0 = cpu_ticks(rolld_pid);
    let quiet: Vec<Duration> = (0..rolls).map(|_| reload(&config)).collect();
    let cpu_per_roll_ms =
        (cpu_ticks(rolld_pid) - cpu0) as f64 / ticks_per_sec() * 1000.0 / rolls as f64;
    let busy_load = {
        let (wrk_bin, script) = (wrk_bin.clone(), script.clone());
        let url = format!("http://127.0.0.1:{listen}/");
        std::thread::spawn(move || wrk(&wrk_bin, &script, &url, 64, rolls as u64 * 2 + 2))
    };
    std::thread::sleep(Duration::from_millis(500));
    let busy: Vec<Duration> = (0..rolls).map(|_| reload(&config)).collect();
    let busy_load = busy_load.join().expect("wrk during the rolls");
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let (roll_quiet_ms, roll_busy_ms) = (median(&quiet), median(&busy));
    println!(
        "roll (`rolld reload` round trip: request to old set stopped, median of {rolls}): {roll_quiet_ms:.0} ms without traffic, {roll_busy_ms:.0} ms under wrk -c64 ({:.0} requests during the rolls, {} errors); backend start alone {:.0} ms; rolld CPU {cpu_per_roll_ms:.1} ms per roll",
        busy_load.rps * (rolls as f64 * 2.0 + 2.0),
        busy_load.errors,
        backend_start.as_secs_f64() * 1000.0
    );

    // Swap cost under load.
    let (around, quiet_p99, swap_errors) = swap_cost(listen, &config, 32, 6);
    println!("swap under load (32 keep-alive clients): p99 {around:.2} ms in the second around the swap, {quiet_p99:.2} ms in a quiet second, {swap_errors} errors");

    // Memory: idle; with 10,000 idle keep-alive clients that came one after another; and
    // what stays once 10,000 clients sent a request each before any answer was read (all
    // in flight at once, 1 s each at the app) and then stayed idle. nginx with 2 workers
    // beside it (master and workers).
    let nginx_2w: Option<Vec<u32>> = nginx_procs.get(1).and_then(|master: &Proc| {
        let (_, _, workers) = targets.iter().find(|t| t.0 == "nginx-2w")?;
        Some([vec![master.0.id()], workers.clone()].concat())
    });
    let mut memory = vec![("rolld".to_string(), listen, vec![rolld_pid])];
    if let (Some(pids), Some((_, port, _))) =
        (&nginx_2w, targets.iter().find(|t| t.0 == "nginx-2w"))
    {
        memory.push(("nginx-2w".to_string(), *port, pids.clone()));
    }
    println!(
        "rolld RSS at start, before any load: {:.1} MB",
        idle_rss as f64 / 1024.0
    );
    let mut memory_json = serde_json::Map::new();
    for (name, port, pids) in &memory {
        let idle = rss_of(pids);
        let conns = idle_connections(*port, 10_000);
        std::thread::sleep(Duration::from_millis(500));
        let with_idle = rss_of(pids);
        let idle_count = conns.len();
        drop(conns);
        std::thread::sleep(Duration::from_millis(500));
        let (conns, answered) = burst(*port, 10_000, 1000);
        // What the burst needed has had 3 s to go back.
        std::thread::sleep(Duration::from_secs(3));
        let after_burst = rss_of(pids);
        let burst_count = conns.len();
        drop(conns);
        if answered < burst_count && name.starts_with("nginx") {
            let log = std::fs::read_to_string(dir.path().join("nginx2/nginx-error.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            println!("nginx's error log ends: {tail:?}");
        }
        println!(
            "{name} RSS: {:.1} MB idle, {:.1} MB with {idle_count} idle keep-alive clients, {:.1} MB 3 s after a burst of {burst_count} requests in flight at once ({answered} answered 200), its clients still connected",
            idle as f64 / 1024.0,
            with_idle as f64 / 1024.0,
            after_burst as f64 / 1024.0,
        );
        memory_json.insert(
            name.clone(),
            serde_json::json!({
                "rss_idle_mb": idle as f64 / 1024.0,
                "rss_10k_idle_conns_mb": with_idle as f64 / 1024.0,
                "idle_connections": idle_count,
                "rss_after_burst_mb": after_burst as f64 / 1024.0,
                "burst_requests": burst_count,
                "burst_answered": answered,
            }),
        );
    }
    let (busy_rss, idle_count) = memory_json
        .get("rolld")
        .map(|m| {
            (
                m["rss_10k_idle_conns_mb"].as_f64().unwrap_or(0.0),
                m["idle_connections"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or_default();
    drop(nginx_procs);

    // The hold queue (`rolld pause`): RSS with `max_held` (1024) requests held, and after
    // 3,000 more were refused at once.
    let held = held_cell(listen, &config, rolld_pid);
    println!(
        "rolld hold queue: {:.1} MB before, {:.1} MB with {} requests held, {:.1} MB after {} more were refused ({:.2} ms each); {} of the held answered 200 on resume",
        held.before_kib as f64 / 1024.0,
        held.held_kib as f64 / 1024.0,
        held.held,
        held.after_kib as f64 / 1024.0,
        held.refused,
        held.refuse_ms,
        held.released_ok,
    );

    let slow_clients = slow_clients_cell(dir.path(), 20);

    // Processes dying under requests.
    let chaos = chaos(dir.path(), chaos_secs);
    println!("{}", chaos.line());

    let instructions = instructions_cell(dir.path(), nginx_bin.as_deref());

    let json = serde_json::json!({
        "slow_clients": slow_clients,
        "machine": machine(),
        "load_generator": "wrk",
        "seconds_per_load": secs,
        "rounds": rounds,
        "loads": results.iter().map(|(k, l)| (k.clone(), serde_json::json!({"rps": l.rps, "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "p999_ms": l.p999_ms, "errors": l.errors, "cpu_us_per_request": l.cpu_us_per_request}))).collect::<serde_json::Map<_, _>>(),
        "nginx_buffer_spills": nginx_spills,
        "roll_ms_quiet": roll_quiet_ms,
        "roll_load_errors": busy_load.errors,
        "swap_errors": swap_errors,
        "roll_ms_under_load": roll_busy_ms,
        "backend_start_ms": backend_start.as_secs_f64() * 1000.0,
        "rolld_cpu_ms_per_roll": cpu_per_roll_ms,
        "swap_p99_ms": around,
        "quiet_p99_ms": quiet_p99,
        "rss_idle_mb": idle_rss as f64 / 1024.0,
        "rss_10k_idle_conns_mb": busy_rss,
        "idle_connections": idle_count,
        "memory": memory_json,
        "hold_queue": {"rss_before_mb": held.before_kib as f64 / 1024.0, "rss_held_mb": held.held_kib as f64 / 1024.0, "held": held.held, "rss_after_refusals_mb": held.after_kib as f64 / 1024.0, "refused": held.refused, "refuse_ms": held.refuse_ms, "released_ok": held.released_ok},
        "chaos": chaos.json(),
        "instructions_per_request": instructions,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rolld-bench.json");
    match std::fs::write(
        &out,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    ) {
        Ok(()) => println!("results: {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
    drop(rolld);
}
