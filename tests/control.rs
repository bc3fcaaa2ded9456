//! Operating a running rolld: `rolld reload`, `status`, `stop`, the control socket,
//! `/metrics`, log reopening, systemd notifications and JSON logs.

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::*;

#[test]
fn reload_prints_progress_and_exits_0_when_the_new_set_serves() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    for step in [
        "starting 2 process(es)",
        "2/2 healthy",
        "swapped: new set serving",
        "draining 0 request(s) in flight",
        "old set stopped",
        "generation 2 serving",
    ] {
        assert!(stdout.contains(step), "`{step}` missing from:\n{stdout}");
    }
    for pid in old {
        assert!(!alive(pid), "the old set is stopped when reload returns");
    }
}

#[test]
fn reload_exits_non_zero_with_the_reason_when_the_roll_rolls_back() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let bad = Fixture {
        cmd: format!("{BACKEND} {{port}} --unhealthy"),
        ..fixture
    };
    rolld.write_config(
        &bad.yaml()
            .replace("start_timeout: 20s", "start_timeout: 1s"),
    );
    let (code, _, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("rolled back: generation 2: ")
            && !stderr.contains("rolled back: rolled back")
            && stderr.contains("answered 503 Service Unavailable, accepted 200")
            && stderr.contains("new processes stopped, the old set keeps serving"),
        "{stderr}"
    );
    // An invalid file is refused, also with the reason.
    rolld.write_config("app-servers: [");
    let (code, _, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("roll refused"), "{stderr}");
}

#[test]
fn two_concurrent_reloads_both_get_an_answer_and_at_most_two_rolls_happen() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 500"));
    let rolld = Rolld::start(&fixture);
    let config = rolld.config_path();
    let run = || {
        std::process::Command::new(ROLLD)
            .args(["reload", "-c"])
            .arg(&config)
            .output()
            .expect("rolld reload")
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(a.status.success() && b.status.success(), "{a:?}\n{b:?}");
    let rolls = rolld.count_log("roll finished");
    assert!(
        (2..=3).contains(&rolls),
        "one start-up roll and at most two more, saw {rolls}"
    );
}

#[test]
fn reload_no_wait_returns_at_once() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 3000"));
    let rolld = Rolld::start(&fixture);
    let started = std::time::Instant::now();
    let (code, stdout, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("roll requested"));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "did not wait for the 3 s start"
    );
    rolld.wait_log("roll finished", 2);
}

#[test]
fn status_json_shows_the_new_pids_after_a_roll() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::start(&fixture);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    let (code, stdout, stderr) = rolld.control("status", &["--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status is JSON");
    assert_eq!(status["generation"], 2);
    let mut pids: Vec<i64> = status["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["pid"].as_i64().expect("pid"))
        .collect();
    pids.sort_unstable();
    let mut new: Vec<i64> = rolld.pids_of(2).into_iter().map(i64::from).collect();
    new.sort_unstable();
    assert_eq!(pids, new);
    assert_eq!(status["processes"][0]["state"], "running");
    assert_eq!(status["last_roll"]["outcome"], "succeeded");
    assert_eq!(status["upstreams"].as_array().map(Vec::len), Some(2));
    let (code, text, _) = rolld.control("status", &[]);
    assert_eq!(code, Some(0));
    assert!(text.contains("generation 2 serving"), "{text}");
}

#[test]
fn metrics_count_the_requests_sent() {
    let fixture = Fixture::new(1);
    let admin = free_ports(1)[0];
    let yaml = format!("admin: 127.0.0.1:{admin}\n{}", fixture.yaml());
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    for _ in 0..7 {
        assert_eq!(get_blocking(rolld.listen, "/").expect("served").0, 200);
    }
    let (status, metrics) = get_blocking(admin, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("rolld_http_requests_total{class=\"2xx\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rolld_upstream_response_seconds_count 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rolld_rolls_succeeded_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("rolld_requests_in_flight 0"), "{metrics}");
    let (status, json) = get_blocking(admin, "/status").expect("status");
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
    assert_eq!(get_blocking(admin, "/healthz").expect("healthz").0, 200);
}

#[test]
fn a_second_rolld_on_the_same_socket_refuses_to_start() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let out = std::process::Command::new(ROLLD)
        .arg(rolld.config_path())
        .output()
        .expect("second rolld");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another rolld is running"), "{stderr}");
    assert_eq!(
        get_blocking(rolld.listen, "/")
            .expect("the first still serves")
            .0,
        200
    );
}

#[test]
fn a_stale_socket_is_replaced_and_the_socket_is_private_and_removed_at_exit() {
    let fixture = Fixture::new(1);
    let mut rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, |dir| {
        // What a crashed rolld leaves: a socket file nobody listens on.
        drop(UnixListener::bind(dir.join("rolld.sock")).expect("bind"));
    });
    rolld.wait_log("roll finished", 1);
    assert!(
        rolld.log().contains("replacing the stale control socket"),
        "{}",
        rolld.log()
    );
    let socket = rolld.dir.path().join("rolld.sock");
    let mode = std::fs::metadata(&socket).expect("socket").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let (code, _, _) = rolld.control("status", &[]);
    assert_eq!(code, Some(0));
    let (code, stdout, _) = rolld.control("stop", &[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(rolld.wait_exit(SOON).code(), Some(0));
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[test]
fn sigusr1_reopens_the_process_log_files() {
    let fixture = Fixture::new(1).extra("  stdout: 'logs/app-{port}.out'\n");
    let rolld = Rolld::start(&fixture);
    let port = fixture.sets[0][0];
    let path = rolld.dir.path().join(format!("logs/app-{port}.out"));
    get_blocking(port, "/log?msg=before-rotation").expect("log");
    wait_until("first line", SOON, || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("before-rotation"))
    });
    let rotated = rolld.dir.path().join(format!("logs/app-{port}.out.1"));
    std::fs::rename(&path, &rotated).expect("rotate");
    rolld.signal(Signal::SIGUSR1);
    rolld.wait_log("reopening process log files", 1);
    get_blocking(port, "/log?msg=after-rotation").expect("log");
    wait_until("a new file with the new line", SOON, || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&format!("{port}: after-rotation")))
    });
    let old = std::fs::read_to_string(&rotated).expect("rotated file");
    assert!(
        old.contains("before-rotation") && !old.contains("after-rotation"),
        "{old}"
    );
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let fixture = Fixture::new(1);
    let dir = tempfile::tempdir().expect("dir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify.set_read_timeout(Some(SOON)).expect("timeout");
    let recv = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let rolld = Rolld::launch(
        &fixture.yaml(),
        fixture.listen,
        |_| {},
        &[],
        &[("NOTIFY_SOCKET", notify_path.display().to_string())],
    );
    assert_eq!(recv(), "READY=1");
    rolld.signal(Signal::SIGHUP);
    assert!(recv().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(recv(), "READY=1");
    let app = rolld.pids_of(2)[0];
    let env = std::fs::read(format!("/proc/{app}/environ")).expect("the app's environment");
    assert!(
        String::from_utf8_lossy(&env).contains("PORT="),
        "read the right process"
    );
    assert!(
        !String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET"),
        "apps do not inherit NOTIFY_SOCKET"
    );
    rolld.signal(Signal::SIGTERM);
    assert_eq!(recv(), "STOPPING=1");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::launch(
        &fixture.yaml(),
        fixture.listen,
        |_| {},
        &["--log-format", "json"],
        &[],
    );
    rolld.wait_log("roll finished", 1);
    for line in rolld.log().lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value.get("level").is_some() && value.get("fields").is_some(),
            "{line}"
        );
    }
}

#[test]
fn a_file_in_the_way_of_the_socket_is_never_removed() {
    let fixture = Fixture::new(1);
    let mut rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, |dir| {
        std::fs::write(dir.join("rolld.sock"), "precious").expect("a file");
    });
    let status = rolld.wait_exit(SOON);
    assert_eq!(status.code(), Some(1));
    assert!(rolld.log().is_empty() || !rolld.log().contains("roll finished"));
    assert_eq!(
        std::fs::read_to_string(rolld.dir.path().join("rolld.sock")).expect("still there"),
        "precious"
    );
}
