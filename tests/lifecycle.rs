//! The life of rolld's processes: crashes are restarted, SIGTERM stops everything
//! gracefully, SIGKILL to rolld leaves nothing behind, output lands in prefixed logs.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// An app that forks a worker into its process group before exec'ing the server.
fn forking_cmd() -> String {
    format!("sh -c \"sleep 300 & exec {BACKEND} $0\" {{port}}")
}

#[test]
fn sigkill_to_rolld_leaves_no_process_behind() {
    let fixture = Fixture::new(2).cmd(forking_cmd());
    let mut rolld = Rolld::start(&fixture);
    let leaders = rolld.pids_of(1);
    assert_eq!(leaders.len(), 2);
    let members: Vec<i32> = leaders.iter().flat_map(|&l| group_members(l)).collect();
    assert!(
        members.len() >= 4,
        "each group has the server and its sleeping worker: {members:?}"
    );
    rolld.signal(Signal::SIGKILL);
    rolld.wait_exit(SOON);
    let deadline = Instant::now() + Duration::from_secs(2);
    wait_until("every app process gone", Duration::from_secs(2), || {
        members.iter().all(|&p| !alive(p))
    });
    assert!(Instant::now() <= deadline);
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_stops_everything() {
    let fixture = Fixture::new(2).cmd(forking_cmd());
    let mut rolld = Rolld::start(&fixture);
    let members: Vec<i32> = rolld
        .pids_of(1)
        .iter()
        .flat_map(|&l| group_members(l))
        .collect();
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let slow = rt.spawn(async move { get(&client(), port, "/?delay=1500").await });
    rolld.wait_in_flight(1);
    rolld.signal(Signal::SIGTERM);
    let (status, body) = rt
        .block_on(slow)
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from"));
    let status = rolld.wait_exit(SOON);
    assert_eq!(
        status.code(),
        Some(0),
        "graceful shutdown exits 0:\n{}",
        rolld.log()
    );
    for pid in members {
        assert!(!alive(pid), "process {pid} survived shutdown");
    }
    // The listener is closed: new connections are refused.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let fixture = Fixture::new(1);
    let mut rolld = Rolld::start(&fixture);
    let pids = rolld.pids_of(1);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _slow = rt.spawn(async move { get(&client(), port, "/?delay=20000").await });
    rolld.wait_in_flight(1);
    rolld.signal(Signal::SIGTERM);
    rolld.wait_log("shutting down", 1);
    rolld.signal(Signal::SIGTERM);
    let start = Instant::now();
    let status = rolld.wait_exit(SOON);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "did not wait for the 20 s request"
    );
    assert_ne!(status.code(), Some(0));
    wait_until("app gone", Duration::from_secs(2), || !alive(pids[0]));
}

#[test]
fn a_crashed_process_is_restarted_on_its_port_and_serves_again() {
    // While `hold-PORT` exists, a start of the process on PORT waits before it serves:
    // the test decides how long a crashed process stays out.
    let fixture = Fixture::new(2).cmd(format!(
        "sh -c \"while [ -e hold-$0 ]; do sleep 0.05; done; exec {BACKEND} $0\" {{port}}"
    ));
    let rolld = Rolld::start(&fixture);
    let pids = rolld.pids_of(1);
    let port = fixture.sets[0][0];
    let (_, victim) = get_blocking(port, "/pid").expect("direct answer");
    let victim: i32 = victim.parse().expect("pid");
    assert!(pids.contains(&victim));
    let hold = rolld.dir.path().join(format!("hold-{port}"));
    std::fs::write(&hold, "").expect("hold the restart");
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill the app");
    // Out of the proxy's set until it serves again...
    let available = |rolld: &Rolld| -> Option<bool> {
        rolld.status_json()["upstreams"]
            .as_array()?
            .iter()
            .find(|u| u["addr"] == format!("127.0.0.1:{port}").as_str())?["available"]
            .as_bool()
    };
    wait_until("the crashed process out of the set", SOON, || {
        available(&rolld) == Some(false)
    });
    rolld.wait_log(
        "process exited unexpectedly (killed by SIGKILL); restarting in 1s",
        1,
    );
    std::fs::remove_file(&hold).expect("let the restart go on");
    rolld.wait_log("restarted process is ready", 1);
    let (_, replacement) = get_blocking(port, "/pid").expect("the port serves again");
    let replacement: i32 = replacement.parse().expect("pid");
    assert_ne!(replacement, victim);
    // ...and back in it once restarted: it answers requests sent through the proxy.
    wait_until("the restarted process back in the set", SOON, || {
        available(&rolld) == Some(true)
    });
    let mut seen = Vec::new();
    wait_until(
        "an answer from the restarted process through the proxy",
        SOON,
        || {
            let (status, pid) = get_blocking(rolld.listen, "/pid").expect("proxy answers");
            assert_eq!(status, 200);
            seen.push(pid.clone());
            pid == replacement.to_string()
        },
    );
    assert!(!seen.contains(&victim.to_string()), "{seen:?}");
}

#[test]
fn a_crashed_process_does_not_turn_into_client_errors() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::start(&fixture);
    let (_, victim) = get_blocking(fixture.sets[0][0], "/pid").expect("direct answer");
    kill(Pid::from_raw(victim.parse().expect("pid")), Signal::SIGKILL).expect("kill");
    // Right after the crash, before the restart: the proxy routes around the dead port.
    for _ in 0..50 {
        let (status, body) = get_blocking(rolld.listen, "/").expect("proxy answers");
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn child_output_goes_to_templated_files_with_a_port_prefix() {
    let fixture = Fixture::new(1)
        .extra("  stdout: 'logs/app-{port}.out'\n  stderr: 'logs/app-{numproc}.err'\n");
    let rolld = Rolld::start(&fixture);
    let port = fixture.sets[0][0];
    let path = rolld.dir.path().join(format!("logs/app-{port}.out"));
    wait_until("the app's first line", SOON, || {
        std::fs::read_to_string(&path)
            .is_ok_and(|s| s.contains(&format!("{port}: listening on 127.0.0.1:{port}")))
    });
    assert!(rolld
        .dir
        .path()
        .join(format!("logs/app-{port}.err"))
        .exists());
}

#[test]
fn an_unwritable_log_file_does_not_stop_the_app() {
    let fixture = Fixture::new(1).extra("  stdout: '/proc/rolld-cannot-write-here/{port}.log'\n");
    let rolld = Rolld::start(&fixture);
    assert!(
        rolld.log().contains("cannot open process output file"),
        "{}",
        rolld.log()
    );
    let pid = rolld.pids_of(1)[0];
    assert!(alive(pid));
    assert_eq!(get_blocking(rolld.listen, "/").expect("serves").0, 200);
}

#[test]
fn the_old_set_of_a_forking_app_leaves_no_worker_behind_after_a_roll() {
    let fixture = Fixture::new(1).cmd(forking_cmd());
    let rolld = Rolld::start(&fixture);
    let leader = rolld.pids_of(1)[0];
    let members = group_members(leader);
    assert!(members.len() >= 2, "{members:?}");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    for pid in members {
        assert!(!alive(pid), "worker {pid} of the old set survived the roll");
    }
}

/// The inode of the socket listening on `port`, from the kernel's table.
fn listening_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        (local_port == port && f.get(3)? == &"0A").then(|| f.get(9).map(|s| s.to_string()))?
    })
}

#[test]
fn apps_get_stdin_from_dev_null_and_never_inherit_the_listener() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let pid = rolld.pids_of(1)[0];
    let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("stdin link");
    assert_eq!(stdin, std::path::Path::new("/dev/null"));
    let inode = listening_inode(rolld.listen).expect("rolld's listener is in /proc/net/tcp");
    let needle = format!("socket:[{inode}]");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
        let target = std::fs::read_link(fd.expect("fd").path()).unwrap_or_default();
        assert_ne!(
            target.display().to_string(),
            needle,
            "the app holds rolld's listener"
        );
    }
}

#[test]
fn sigterm_during_start_up_stops_the_starting_processes() {
    let fixture = Fixture::new(2).cmd(format!("{BACKEND} {{port}} --start-delay 2000"));
    let mut rolld = Rolld::spawn(&fixture.yaml(), fixture.listen);
    rolld.wait_log("process started", 2);
    let pids = rolld.pids_of(1);
    rolld.signal(Signal::SIGTERM);
    let status = rolld.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "{}", rolld.log());
    for pid in pids {
        assert!(!alive(pid), "starting process {pid} survived");
    }
}

#[test]
fn a_process_that_ignores_sigterm_is_killed_after_stop_timeout() {
    let fixture = Fixture::new(1)
        .cmd(format!("{BACKEND} {{port}} --ignore-term"))
        .extra("  stop_timeout: 1s\n");
    let yaml = fixture.yaml().replace("  stop_timeout: 5s\n", "");
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let old = rolld.pids_of(1)[0];
    let started = Instant::now();
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    assert!(!alive(old), "killed");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it had its stop_timeout first"
    );
    assert!(
        rolld
            .log()
            .contains("still running after SIGTERM; sending SIGKILL"),
        "{}",
        rolld.log()
    );
}

#[test]
fn a_first_set_that_never_gets_healthy_ends_rolld_with_the_reason() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --unhealthy"));
    let mut rolld = Rolld::spawn(
        &fixture
            .yaml()
            .replace("start_timeout: 20s", "start_timeout: 1s"),
        fixture.listen,
    );
    let status = rolld.wait_exit(SOON);
    assert!(!status.success(), "{status}");
    let log = rolld.log();
    assert!(
        log.contains("the first set did not start: generation 1: "),
        "{log}"
    );
    // Nothing served before it, so nothing was rolled back to.
    assert!(!log.contains("did not start: rolled back"), "{log}");
    assert!(!log.contains("keeps serving"), "{log}");
}
