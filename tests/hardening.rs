//! What a stalled or closed log pipe, a squatted port, a panicking roll or a hostile
//! local user must not do to a running rolld.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

/// Starts rolld on `yaml` with stdout and stderr as given, and waits until the proxy
/// answers 200 (there is no log file to watch).
fn spawn_with_stdio(yaml: &str, listen: u16, stdout: Stdio, stderr: Stdio) -> Rolld {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("rolld.yml"), yaml).expect("write config");
    let child = Command::new(ROLLD)
        .arg(dir.path().join("rolld.yml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start rolld");
    Rolld {
        child: Some(child),
        dir,
        config: "rolld.yml".into(),
        listen,
    }
}

fn status_json(rolld: &Rolld) -> serde_json::Value {
    let (_, stdout, _) = rolld.control("status", &["--json"]);
    serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_stalled_stderr_does_not_stop_the_proxy_nor_the_supervisor() {
    let fixture = Fixture::new(1);
    let admin = free_ports(1)[0];
    let yaml = format!(
        "admin: 127.0.0.1:{admin}\nproxy:\n  access_log: true\n{}",
        fixture.yaml()
    );
    // A pipe nobody reads: a stuck log collector. 64 KiB fill it after a few hundred lines,
    // and rolld's queue (4096 lines) after a few thousand more.
    let mut rolld = spawn_with_stdio(&yaml, fixture.listen, Stdio::piped(), Stdio::piped());
    let _unread = (
        rolld.child.as_mut().and_then(|c| c.stdout.take()),
        rolld.child.as_mut().and_then(|c| c.stderr.take()),
    );
    wait_until("the first set serves", SOON, || {
        get_blocking(rolld.listen, "/").is_ok_and(|(status, _)| status == 200)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = client();
    rt.block_on(async {
        for i in 0..6000 {
            // Each request also makes the app print a line on rolld's (stalled) stdout.
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                get(&client, rolld.listen, &format!("/log?msg=line-{i}")),
            )
            .await;
            assert!(
                matches!(answer, Ok(Ok((200, _)))),
                "request {i} not answered: {answer:?}"
            );
        }
    });
    // The supervision runtime still answers and rolls.
    let status = status_json(&rolld);
    assert!(
        status["log_lines_dropped"].as_u64().unwrap_or(0) > 0,
        "dropped lines are counted: {status}"
    );
    let (_, metrics) = get_blocking(admin, "/metrics").expect("metrics");
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rolld_log_lines_dropped_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(dropped.is_some_and(|n| n > 0), "{metrics}");
    rolld.signal(Signal::SIGHUP);
    wait_until("generation 2 serves", SOON, || {
        status_json(&rolld)["generation"].as_u64() == Some(2)
    });
    rolld.signal(Signal::SIGTERM);
    assert!(rolld.wait_exit(SOON).success());
}

/// An app's `stdout:` may be a FIFO (a log collector's): with nobody reading it, or a
/// reader that stopped, the app's lines are dropped and counted, and nothing else waits.
#[test]
fn an_app_log_fifo_nobody_reads_does_not_stop_the_supervisor() {
    let fixture = Fixture::new(2).extra("  stdout: app.fifo\n");
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, |dir| {
        nix::unistd::mkfifo(
            &dir.join("app.fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
    });
    wait_until("the first set serves", SOON, || {
        get_blocking(rolld.listen, "/").is_ok_and(|(status, _)| status == 200)
    });
    rolld.signal(Signal::SIGHUP);
    wait_until("generation 2 serves", SOON, || {
        status_json(&rolld)["generation"].as_u64() == Some(2)
    });
    // A reader that never reads: the pipe fills (64 KiB) and stays full.
    let _stalled = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(rolld.dir.path().join("app.fifo"))
        .expect("open the FIFO's read end");
    let line = "x".repeat(200);
    for i in 0..2000 {
        let answer = get_blocking(rolld.listen, &format!("/log?msg={i}-{line}"));
        assert!(
            matches!(answer, Ok((200, _))),
            "request {i} not answered: {answer:?}"
        );
    }
    rolld.signal(Signal::SIGHUP);
    wait_until("generation 3 serves", SOON, || {
        status_json(&rolld)["generation"].as_u64() == Some(3)
    });
    let status = status_json(&rolld);
    assert!(
        status["log_lines_dropped"].as_u64().unwrap_or(0) > 0,
        "dropped lines are counted: {status}"
    );
}

#[test]
fn a_closed_stderr_neither_kills_rolld_nor_wedges_its_signals() {
    let fixture = Fixture::new(1);
    let yaml = format!("proxy:\n  access_log: true\n{}", fixture.yaml());
    // `rolld rolld.yml 2>&1 | head -1`: one pipe for both, closed after the first line.
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let writer2 = writer.try_clone().expect("dup");
    let mut rolld = spawn_with_stdio(&yaml, fixture.listen, writer.into(), writer2.into());
    let mut first = String::new();
    BufReader::new(std::fs::File::from(reader))
        .read_line(&mut first)
        .expect("a first line");
    // The reader is dropped here: every later write gets EPIPE.
    wait_until("the first set serves", SOON, || {
        get_blocking(rolld.listen, "/").is_ok_and(|(status, _)| status == 200)
    });
    for _ in 0..20 {
        assert_eq!(get_blocking(rolld.listen, "/").expect("served").0, 200);
    }
    rolld.signal(Signal::SIGHUP);
    wait_until("generation 2 serves after SIGHUP", SOON, || {
        status_json(&rolld)["generation"].as_u64() == Some(2)
    });
    rolld.signal(Signal::SIGTERM);
    let status = rolld.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "a graceful stop, not a panic");
    // The CLI too: `rolld check CONFIG | head -0` must not panic.
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    drop(reader);
    let check = Command::new(ROLLD)
        .arg("check")
        .arg(rolld.config_path())
        .stdout(writer)
        .status()
        .expect("run check");
    assert_eq!(check.code(), Some(0));
}

/// The pid of rolld's guard process, from its start-up line.
fn guard_pid(rolld: &Rolld) -> i32 {
    rolld
        .log()
        .split("guard=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("the guard's pid in the log")
}

#[test]
fn the_guard_holds_no_socket_and_no_log_pipe() {
    let fixture = Fixture::new(1);
    let admin = free_ports(1)[0];
    let yaml = format!("admin: 127.0.0.1:{admin}\n{}", fixture.yaml());
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let guard = guard_pid(&rolld);
    assert!(alive(guard), "the guard runs");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{guard}/fd"))
        .expect("the guard's descriptors")
        .filter_map(|e| {
            let link = std::fs::read_link(e.ok()?.path()).ok()?;
            Some(link.display().to_string())
        })
        .collect();
    // Its pipe from rolld, and /dev/null as stdin, stdout and stderr: no listener (a
    // shutting-down rolld's clients would connect and hang), no control socket, no log.
    let sockets: Vec<&String> = fds.iter().filter(|l| l.starts_with("socket:")).collect();
    assert!(sockets.is_empty(), "the guard holds sockets: {fds:?}");
    let others: Vec<&String> = fds
        .iter()
        .filter(|l| l.as_str() != "/dev/null" && !l.starts_with("pipe:"))
        .collect();
    assert!(others.is_empty(), "the guard holds more: {fds:?}");
    assert_eq!(
        fds.iter().filter(|l| l.starts_with("pipe:")).count(),
        1,
        "one pipe: {fds:?}"
    );
}

/// A foreign HTTP server on a port: answers 200 `squatter` to anything.
struct Squatter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Squatter {
    fn bind(port: u16) -> Squatter {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let mut listener = None;
        wait_until(&format!("port {port} free for the squatter"), SOON, || {
            listener = std::net::TcpListener::bind(("127.0.0.1", port)).ok();
            listener.is_some()
        });
        let listener = listener.expect("bound above");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = stream.read(&mut buf);
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nsquatter",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Squatter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A fixture whose app is `app.sh PORT`: the backend, or, while a file `hold` lies
/// beside the config, a process that never listens.
fn holding_fixture(per_set: usize) -> Fixture {
    Fixture::new(per_set).cmd("sh app.sh {port}")
}

fn write_app_sh(dir: &std::path::Path) {
    std::fs::write(
        dir.join("app.sh"),
        format!("if [ -e hold ]; then exec sleep 600; fi\nexec {BACKEND} \"$1\"\n"),
    )
    .expect("write app.sh");
}

#[test]
fn a_roll_onto_a_port_someone_else_listens_on_is_refused() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let taken = fixture.sets[1][0];
    let _squatter = Squatter::bind(taken);
    let (code, _, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "port {taken} is held by pid {}",
            std::process::id()
        )),
        "the reason: {stderr}"
    );
    assert_eq!(get_blocking(rolld.listen, "/pid").expect("served").0, 200);
}

#[test]
fn a_new_set_whose_port_is_answered_by_a_stranger_rolls_back() {
    let fixture = holding_fixture(1);
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, write_app_sh);
    rolld.wait_log("roll finished", 1);
    std::fs::write(rolld.dir.path().join("hold"), "").expect("hold");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("process started generation=2", 1);
    // Taken after rolld checked it was free: the new process never listens, this does.
    let _squatter = Squatter::bind(fixture.sets[1][0]);
    rolld.wait_log("rolled back", 1);
    assert!(
        rolld.log().contains("is answered by another process"),
        "the reason is logged"
    );
    let (_, body) = get_blocking(rolld.listen, "/").expect("served");
    assert!(!body.contains("squatter"), "the old set serves: {body}");
}

#[test]
fn a_restarted_process_whose_port_is_answered_by_a_stranger_is_not_routed_to() {
    let fixture = holding_fixture(1);
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, write_app_sh);
    rolld.wait_log("roll finished", 1);
    std::fs::write(rolld.dir.path().join("hold"), "").expect("hold");
    let pid = rolld.pids_of(1)[0];
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    // Taken while rolld waits to restart the process (1 s).
    let _squatter = Squatter::bind(fixture.sets[0][0]);
    rolld.wait_log("is answered by another process", 1);
    for _ in 0..10 {
        if let Ok((_, body)) = get_blocking(rolld.listen, "/") {
            assert!(!body.contains("squatter"), "routed to the squatter");
        }
    }
}

#[test]
fn a_panic_in_a_roll_keeps_the_serving_set() {
    let fixture = Fixture::new(1);
    let env = [("ROLLD_FAILPOINT", "roll-panic-after-swap:2".to_string())];
    let rolld = Rolld::launch(&fixture.yaml(), fixture.listen, |_| {}, &[], &env);
    rolld.wait_log("roll finished", 1);
    let first = rolld.pids_of(1);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll panicked", 1);
    // Generation 2 was swapped in before the panic: it serves, generation 1 goes.
    wait_until("generation 1 stopped", SOON, || {
        first.iter().all(|&p| !alive(p))
    });
    for _ in 0..10 {
        assert_eq!(get_blocking(rolld.listen, "/").expect("served").0, 200);
    }
    // The next roll finds generation 2 as its old set, drains and stops it.
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("old set stopped generation=2", 1);
    assert_eq!(get_blocking(rolld.listen, "/").expect("served").0, 200);
}

#[test]
fn repeated_stops_and_a_following_sigterm_keep_the_shutdown_graceful() {
    let fixture = Fixture::new(1);
    let mut rolld = Rolld::start(&fixture);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let slow = rt.spawn(async move { get(&client(), port, "/?delay=3000").await });
    rolld.wait_in_flight(1);
    // `rolld stop` twice (a script retrying), then systemd's SIGTERM.
    for _ in 0..2 {
        let (code, _, stderr) = rolld.control("stop", &[]);
        assert_eq!(code, Some(0), "{stderr}");
    }
    rolld.wait_log("already stopping gracefully", 1);
    rolld.signal(Signal::SIGTERM);
    rolld.wait_log("already stopping gracefully", 2);
    let answer = rt.block_on(slow).expect("request task");
    assert!(matches!(answer, Ok((200, _))), "{answer:?}");
    let status = rolld.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "a graceful stop");
}

#[test]
fn sigterm_during_a_roll_stops_the_new_set_and_the_old_one_finishes_its_requests() {
    let fixture = holding_fixture(1);
    let mut rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, write_app_sh);
    rolld.wait_log("roll finished", 1);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let slow = rt.spawn(async move { get(&client(), port, "/?delay=15000").await });
    rolld.wait_in_flight(1);
    // The next set never gets healthy: the roll waits for it (up to 20 s).
    std::fs::write(rolld.dir.path().join("hold"), "").expect("hold");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("process started generation=2", 1);
    let next = rolld.pids_of(2);
    rolld.signal(Signal::SIGTERM);
    wait_until(
        "the new set stopped while the old one still serves its request",
        Duration::from_secs(8),
        || next.iter().all(|&p| !alive(p)),
    );
    assert!(!slow.is_finished(), "the request is still in flight");
    rolld.wait_log("rolld is shutting down", 1);
    let answer = rt.block_on(slow).expect("request task");
    assert!(matches!(answer, Ok((200, _))), "{answer:?}");
    assert_eq!(rolld.wait_exit(SOON).code(), Some(0));
}

#[test]
fn the_control_socket_refuses_other_users_even_when_its_mode_lets_them_connect() {
    if !root_or_skip("running a client as another user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("user nobody exists");
    let fixture = Fixture::new(1);
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, |dir| {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    });
    rolld.wait_log("roll finished", 1);
    // An admin's mistake: the socket opened to everyone.
    let socket = rolld.dir.path().join("rolld.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (_bin, cli) = world_readable_copy(ROLLD);
    let run_as_nobody = |subcommand: &str| {
        Command::new(&cli)
            .arg(subcommand)
            .arg("--socket")
            .arg(&socket)
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .expect("run the CLI as nobody")
    };
    for subcommand in ["status", "stop", "reload"] {
        let out = run_as_nobody(subcommand);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{subcommand} refused: {stderr}");
        assert!(
            stderr.contains("permission denied"),
            "{subcommand}: {stderr}"
        );
    }
    // rolld goes on serving, and its own user (root here) still drives it.
    assert_eq!(get_blocking(rolld.listen, "/").expect("served").0, 200);
    let (code, stdout, _) = rolld.control("status", &[]);
    assert_eq!(code, Some(0), "{stdout}");
}

/// A user other than root with a supplementary group (from /etc/group), if any.
fn user_with_supplementary_group() -> Option<(String, u32)> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let gid: u32 = fields.get(2)?.parse().ok()?;
        fields.get(3)?.split(',').find_map(|member| {
            let user = nix::unistd::User::from_name(member).ok()??;
            (user.uid.as_raw() != 0 && user.gid.as_raw() != gid).then(|| (member.to_string(), gid))
        })
    })
}

#[test]
fn the_configured_user_gets_its_supplementary_groups() {
    if !root_or_skip("switching users") {
        return;
    }
    let Some((user, group)) = user_with_supplementary_group() else {
        eprintln!("SKIPPED: no user with a supplementary group in /etc/group");
        return;
    };
    let (_bin, backend) = world_readable_copy(BACKEND);
    let fixture = Fixture::new(1).cmd(format!("{} {{port}}", backend.display()));
    let yaml = format!("user: {user}\n{}", fixture.yaml());
    let rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    });
    rolld.wait_log("roll finished", 1);
    let groups_of = |pid: i32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let app = rolld.pids_of(1)[0];
    assert!(
        groups_of(rolld.pid()).contains(&group),
        "rolld runs with {user}'s group {group}: {:?}",
        groups_of(rolld.pid())
    );
    assert!(
        groups_of(app).contains(&group),
        "its app too: {:?}",
        groups_of(app)
    );
}

#[test]
fn the_admin_listener_closes_a_connection_whose_headers_never_come() {
    use std::io::{Read, Write};
    let fixture = Fixture::new(1);
    let admin = free_ports(1)[0];
    let yaml = format!("admin: 127.0.0.1:{admin}\n{}", fixture.yaml());
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\n")
        .expect("half a request");
    slow.set_read_timeout(Some(SOON)).expect("timeout");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let read = slow.read(&mut buf);
    assert!(
        read.is_ok() && started.elapsed() < SOON,
        "closed (or answered) by rolld, not left open: {read:?}"
    );
    // The listener still serves complete requests.
    let (status, body) = get_blocking(admin, "/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
}

/// CPU time (user + system) rolld has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .expect("fields")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn the_control_socket_backs_off_when_rolld_runs_out_of_descriptors() {
    use std::os::unix::process::CommandExt;
    let fixture = Fixture::new(1);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("rolld.yml"), fixture.yaml()).expect("write config");
    let log = std::fs::File::create(dir.path().join("rolld.log")).expect("log");
    let mut command = Command::new(ROLLD);
    command
        .arg(dir.path().join("rolld.yml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            use nix::sys::resource::{setrlimit, Resource};
            setrlimit(Resource::RLIMIT_NOFILE, 64, 64).map_err(std::io::Error::from)
        });
    }
    let rolld = Rolld {
        child: Some(command.spawn().expect("start rolld")),
        dir,
        config: "rolld.yml".into(),
        listen: fixture.listen,
    };
    rolld.wait_log("roll finished", 1);
    // Idle control connections until rolld has no descriptor left to accept with.
    let socket = rolld.dir.path().join("rolld.sock");
    let idle: Vec<std::os::unix::net::UnixStream> = (0..80)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    assert!(idle.len() > 64, "{} connections queued", idle.len());
    let pid = rolld.pid();
    wait_until("rolld out of descriptors", SOON, || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()) >= 63
    });
    let before = cpu_ticks(rolld.pid());
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(rolld.pid()) - before;
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let elapsed_ticks = window.elapsed().as_secs_f64() * ticks_per_s as f64;
    assert!(
        (used as f64) < elapsed_ticks * 0.25,
        "rolld used {used} ticks of CPU in {elapsed_ticks:.0}: it spins on accept"
    );
    drop(idle);
}

#[test]
fn rollds_own_idle_connections_do_not_hold_up_the_drain_behind_another_balancer() {
    // `listen` and `after_start` together: the drain also waits for connections to the
    // old ports to close, and rolld's own pooled connections must not count.
    let fixture = Fixture::new(2).extra(
        "  drain_timeout: 20s\n  after_start:\n    - replace_file: [numprocs, 'up.templ', 'up.conf']\n",
    );
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, |dir| {
        std::fs::write(
            dir.join("up.templ"),
            "{% for p in ports %}{{ p }} {% endfor %}\n",
        )
        .expect("template");
    });
    rolld.wait_log("roll finished", 1);
    // Concurrent requests leave several idle connections in the proxy's pools.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let port = rolld.listen;
    rt.block_on(async {
        let client = client();
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { get(&client, port, "/?delay=100").await })
            })
            .collect();
        for request in requests {
            let answer = request.await.expect("task");
            assert!(matches!(answer, Ok((200, _))), "{answer:?}");
        }
    });
    let started = Instant::now();
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the roll waited {:?} for rolld's own idle connections:\n{stdout}",
        started.elapsed()
    );
}

#[test]
fn new_clients_are_refused_at_once_during_a_graceful_shutdown() {
    let fixture = Fixture::new(1);
    let mut rolld = Rolld::start(&fixture);
    let guard = guard_pid(&rolld);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let slow = rt.spawn(async move { get(&client(), port, "/?delay=10000").await });
    rolld.wait_in_flight(1);
    rolld.signal(Signal::SIGTERM);
    rolld.wait_log("shutting down", 1);
    // Refused (not accepted into a backlog nobody reads) while rolld still drains.
    wait_until(
        "a new connection is refused",
        Duration::from_secs(5),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    );
    assert!(!slow.is_finished(), "the shutdown is still draining");
    assert!(alive(guard), "the guard still runs");
    let answer = rt.block_on(slow).expect("request task");
    assert!(matches!(answer, Ok((200, _))), "{answer:?}");
    assert_eq!(rolld.wait_exit(SOON).code(), Some(0));
}

#[test]
fn status_and_stop_give_up_on_a_rolld_that_never_answers() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("wedged.sock");
    // Accepts (the kernel's backlog does) and never answers.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let mut children: Vec<(&str, std::process::Child)> = ["status", "stop"]
        .into_iter()
        .map(|subcommand| {
            let child = Command::new(ROLLD)
                .arg(subcommand)
                .arg("--socket")
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run the CLI");
            (subcommand, child)
        })
        .collect();
    let started = Instant::now();
    for (subcommand, child) in &mut children {
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break Some(status);
            }
            if started.elapsed() > SOON {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let status = status.unwrap_or_else(|| panic!("`rolld {subcommand}` still waits"));
        assert_eq!(status.code(), Some(1), "{subcommand}");
    }
}
