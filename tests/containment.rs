//! Containment: no app process escapes or outlives rolld. Apps that daemonize (double
//! fork and `setsid`) are stopped with their set, reaped, and free their port; `pkill -9
//! -x rolld` and SIGKILL leave nothing behind; rolld works as PID 1 of a PID namespace;
//! a port held by a leftover is freed, a stranger's is named; the cgroup v2 mode.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// A legacy start script: the server daemonizes (an inner shell starts it in a session
/// of its own with `setsid` and exits, so its parent is gone), and the script stays in
/// the foreground with a forked worker. Beside the server, the daemon runs a watcher
/// that notes a graceful stop (SIGTERM) in `stopped-PORT`; a SIGKILL leaves no note.
fn write_daemonizing(dir: &Path) {
    write_script(
        dir,
        "app.sh",
        "sh -c 'setsid sh daemon.sh \"$0\" </dev/null >/dev/null 2>&1 &' \"$1\"\n\
         sleep 300 &\n\
         wait\n",
    );
    write_script(
        dir,
        "daemon.sh",
        &format!(
            "sh -c 'trap \"echo stopped > stopped-$0; exit 0\" TERM; touch trapped-$0; while :; do sleep 0.05; done' \"$1\" &\n\
             exec {BACKEND} \"$1\"\n"
        ),
    );
}

fn write_script(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).expect("write the app script");
}

/// Whether the daemon of `port` was stopped gracefully, by its stop signal.
fn stopped_gracefully(rolld: &Rolld, port: u16) -> bool {
    rolld.dir.path().join(format!("stopped-{port}")).exists()
}

/// Fields of `/proc/PID/stat` after the command: state, ppid, pgrp, session, ...
fn stat(pid: i32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        text.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(String::from)
            .collect(),
    )
}

fn env_var(pid: i32, name: &str) -> Option<String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes started by rolld `rolld` (its mark in their environment).
fn marked_by(rolld: i32) -> Vec<i32> {
    let prefix = format!("{rolld}/");
    all_pids()
        .into_iter()
        .filter(|&p| {
            alive(p) && env_var(p, "ROLLD_PROCESS").is_some_and(|m| m.starts_with(&prefix))
        })
        .collect()
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// The daemonized server of generation `generation` on `port`, once it has escaped its
/// starter's session and group and the kernel has re-parented it to rolld (the child
/// subreaper).
fn daemon_of(rolld: i32, generation: u64, port: u16) -> i32 {
    let mark = format!("{rolld}/{generation}/{port}");
    let mut found = None;
    wait_until(
        "the daemon, in a session of its own, re-parented to rolld",
        SOON,
        || {
            found = all_pids().into_iter().find(|&p| {
                alive(p)
                    && env_var(p, "ROLLD_PROCESS").as_deref() == Some(mark.as_str())
                    && stat(p).is_some_and(|f| f[1] == rolld.to_string() && f[3] == p.to_string())
            });
            found.is_some()
        },
    );
    found.expect("found above")
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn start_daemonizing(per_set: usize) -> (Fixture, Rolld) {
    let fixture = Fixture::new(per_set).cmd("sh app.sh {port}");
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, write_daemonizing);
    rolld.wait_log("roll finished", 1);
    // Each daemon's TERM trap is set: whether it ran says how the daemon was stopped.
    for port in &fixture.sets[0] {
        wait_until("the daemons' traps set", SOON, || {
            rolld.dir.path().join(format!("trapped-{port}")).exists()
        });
    }
    (fixture, rolld)
}

#[test]
fn sigterm_stops_a_daemonized_app_process_and_frees_its_port() {
    let (fixture, mut rolld) = start_daemonizing(1);
    let port = fixture.sets[0][0];
    let daemon = daemon_of(rolld.pid(), 1, port);
    assert_eq!(get_blocking(rolld.listen, "/").expect("serves").0, 200);
    let pid = rolld.pid();
    rolld.signal(Signal::SIGTERM);
    let status = rolld.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "{}", rolld.log());
    assert!(!alive(daemon), "the daemon outlived rolld");
    assert!(
        stopped_gracefully(&rolld, port),
        "rolld, not the guard, stopped the daemon, with SIGTERM"
    );
    assert_eq!(
        marked_by(pid),
        Vec::<i32>::new(),
        "app processes left behind"
    );
    assert!(port_free(port), "port {port} still held");
}

#[test]
fn a_roll_stops_and_reaps_the_old_sets_daemon_and_frees_its_port() {
    let (fixture, rolld) = start_daemonizing(1);
    let old_port = fixture.sets[0][0];
    let daemon = daemon_of(rolld.pid(), 1, old_port);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    // Not a zombie: rolld, its parent now, reaped it.
    wait_until("the old daemon reaped", SOON, || gone(daemon));
    wait_until("the old set's port free", SOON, || port_free(old_port));
    assert!(
        stopped_gracefully(&rolld, old_port),
        "stopped with SIGTERM; files: {:?}",
        fs::read_dir(rolld.dir.path())
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let new = daemon_of(rolld.pid(), 2, fixture.sets[1][0]);
    assert!(alive(new));
    assert_eq!(get_blocking(rolld.listen, "/").expect("serves").0, 200);
    let zombies: Vec<i32> = all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|f| f[0] == "Z" && f[1] == rolld.pid().to_string()))
        .collect();
    assert!(zombies.is_empty(), "zombies of rolld: {zombies:?}");
}

#[test]
fn sigkill_to_rolld_leaves_no_daemon_behind_and_frees_the_port() {
    let (fixture, mut rolld) = start_daemonizing(2);
    let pid = rolld.pid();
    let daemons: Vec<i32> = fixture.sets[0]
        .iter()
        .map(|&port| daemon_of(pid, 1, port))
        .collect();
    rolld.signal(Signal::SIGKILL);
    rolld.wait_exit(SOON);
    wait_until("every app process gone", SOON, || marked_by(pid).is_empty());
    for daemon in daemons {
        assert!(!alive(daemon));
    }
    for &port in &fixture.sets[0] {
        assert!(!stopped_gracefully(&rolld, port), "killed by the guard");
    }
    for &port in &fixture.sets[0] {
        wait_until("the port free", SOON, || port_free(port));
    }
}

/// The guard's pid, from rolld's log (`guard=N`, the last one logged).
fn guard_pid(rolld: &Rolld) -> i32 {
    rolld
        .log()
        .lines()
        .rev()
        .find_map(|l| {
            l.split("guard=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("rolld logs its guard's pid")
}

/// Starts rolld on `fixture` through `program ARGS` (which ends in exec'ing rolld, so the
/// child is rolld), in a folder `prepare` has written to, and waits until its first set
/// serves.
fn start_through(
    fixture: &Fixture,
    prepare: impl FnOnce(&Path),
    program: &str,
    args: &[&str],
) -> Rolld {
    let dir = tempfile::tempdir().expect("temp dir");
    prepare(dir.path());
    fs::write(dir.path().join("rolld.yml"), fixture.yaml()).expect("write config");
    let log = fs::File::create(dir.path().join("rolld.log")).expect("log file");
    let child = Command::new(program)
        .args(args)
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start rolld");
    let rolld = Rolld {
        child: Some(child),
        dir,
        config: PathBuf::from("rolld.yml"),
        listen: fixture.listen,
    };
    rolld.wait_log("roll finished", 1);
    rolld
}

#[test]
fn pkill_9_x_rolld_leaves_no_app_process_behind_forked_workers_included() {
    let fixture = Fixture::new(2).cmd("sh app.sh {port}");
    // rolld in a session of its own, so that pkill, scoped to that session, reaches
    // this test's rolld and its guard only (other rollds may run on this machine).
    let mut rolld = start_through(&fixture, write_daemonizing, "setsid", &[ROLLD, "rolld.yml"]);
    let pid = rolld.pid();
    let leaders = rolld.pids_of(1);
    let workers: Vec<i32> = leaders.iter().flat_map(|&l| group_members(l)).collect();
    assert!(
        workers.len() >= 4,
        "each script and its sleeping worker: {workers:?}"
    );
    for &port in &fixture.sets[0] {
        daemon_of(pid, 1, port);
    }
    let apps = marked_by(pid);
    let guard = guard_pid(&rolld);
    assert_eq!(comm(guard), "rld-guard");
    // Neither the pattern nor the exact name aimed at rolld names the guard.
    for args in [&["rolld"][..], &["-x", "rolld"]] {
        let out = output_within(Command::new("pgrep").args(args), SOON);
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            !listed.lines().any(|l| l.trim() == guard.to_string()),
            "pgrep {args:?} lists the guard {guard}"
        );
    }
    let sid = stat(pid).expect("rolld's stat")[3].clone();
    assert_eq!(sid, pid.to_string(), "rolld leads its own session");
    let out = output_within(
        Command::new("pkill").args(["-9", "-x", "rolld", "-s", &sid]),
        SOON,
    );
    assert!(out.status.success(), "pkill matched nothing");
    rolld.wait_exit(SOON);
    wait_until("every app process gone", SOON, || {
        apps.iter().chain(&workers).all(|&p| !alive(p))
    });
    wait_until("no marked process left", SOON, || marked_by(pid).is_empty());
    wait_until("the guard done", SOON, || !alive(guard));
}

#[test]
fn a_killed_guard_is_restarted_and_still_does_its_job() {
    let (fixture, mut rolld) = start_daemonizing(1);
    let pid = rolld.pid();
    let first = guard_pid(&rolld);
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill the guard");
    rolld.wait_log("guard process restarted", 1);
    let second = guard_pid(&rolld);
    assert_ne!(first, second);
    assert!(alive(second), "the new guard runs");
    assert!(
        rolld.log().contains("the guard process died"),
        "{}",
        rolld.log()
    );
    daemon_of(pid, 1, fixture.sets[0][0]);
    rolld.signal(Signal::SIGKILL);
    rolld.wait_exit(SOON);
    wait_until("every app process gone", SOON, || marked_by(pid).is_empty());
}

/// A worker that cleared its environment carries no mark: when rolld dies, only the
/// guard's list of process groups finds it. That list outlives a restart of the guard,
/// and no guard holds a descriptor rolld inherited.
#[test]
fn a_restarted_guard_still_kills_an_unmarked_worker_and_holds_nothing_rolld_inherited() {
    let fixture = Fixture::new(1).cmd(format!(
        "sh -c \"env -i sleep 300 & exec {BACKEND} $0\" {{port}}"
    ));
    // rolld inherits descriptor 5 without close-on-exec, as from a parent that leaked it.
    let mut rolld = start_through(
        &fixture,
        |_| {},
        "sh",
        &["-c", "exec 5>leaked; exec \"$0\" rolld.yml", ROLLD],
    );
    let pid = rolld.pid();
    assert!(
        fs::read_link(format!("/proc/{pid}/fd/5")).is_ok_and(|p| p.ends_with("leaked")),
        "rolld holds the leaked descriptor"
    );
    let leader = rolld.pids_of(1)[0];
    let mut worker = None;
    wait_until("the app's sleeping worker", SOON, || {
        worker = group_members(leader)
            .into_iter()
            .find(|&p| p != leader && comm(p) == "sleep");
        worker.is_some()
    });
    let worker = worker.unwrap_or_default();
    assert_eq!(
        env_var(worker, "ROLLD_PROCESS"),
        None,
        "the worker has no mark"
    );

    let first = guard_pid(&rolld);
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill the guard");
    rolld.wait_log("guard process restarted", 1);
    let second = guard_pid(&rolld);
    assert_ne!(first, second);
    // It closes what it inherited as it starts, right after rolld logged its start.
    let fds = || {
        let mut fds: Vec<String> = fs::read_dir(format!("/proc/{second}/fd"))
            .expect("the guard's descriptors")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        fds.sort();
        fds
    };
    wait_until(
        "the new guard holding only its pipe and /dev/null",
        SOON,
        || fds() == ["0", "1", "2"],
    );

    rolld.signal(Signal::SIGKILL);
    rolld.wait_exit(SOON);
    wait_until("the unmarked worker killed by the guard", SOON, || {
        !alive(worker)
    });
}

#[test]
fn a_roll_onto_a_port_the_serving_set_holds_is_refused_and_the_set_is_left_alone() {
    // The serving process starts a second server on the next set's port, as its child:
    // in rolld's tree, but part of the serving set, not a leftover to stop.
    let fixture = Fixture::new(1);
    let next = fixture.sets[1][0];
    let fixture = fixture.cmd(format!(
        "sh -c \"{BACKEND} {next} & exec {BACKEND} $0\" {{port}}"
    ));
    let rolld = Rolld::start(&fixture);
    let serving = rolld.pids_of(1)[0];
    wait_until("the serving process's second server", SOON, || {
        TcpListener::bind(("127.0.0.1", next)).is_err()
    });
    let (code, _, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("port {next} is held by pid")),
        "{stderr}"
    );
    assert!(alive(serving), "the serving process is not stopped");
    assert_eq!(get_blocking(rolld.listen, "/").expect("serves").0, 200);
}

#[test]
fn a_roll_onto_a_port_a_stranger_holds_fails_naming_the_holder() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let port = fixture.sets[1][0];
    let _stranger = TcpListener::bind(("127.0.0.1", port)).expect("hold the next set's port");
    let (code, _, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let holder = format!(
        "port {port} is held by pid {} ({})",
        std::process::id(),
        comm(std::process::id() as i32)
    );
    assert!(stderr.contains(&holder), "{stderr}\nwanted: {holder}");
    assert!(
        alive(rolld.pids_of(1)[0]),
        "the serving set goes on serving"
    );
}

#[test]
fn a_leftover_of_an_earlier_set_holding_the_port_is_stopped_and_the_roll_goes_on() {
    // Generation 1, told to stop, leaves a daemon behind that clears its environment
    // (no mark), and takes its port as soon as the set has let go of it.
    let app = format!(
        "case \"$ROLLD_PROCESS\" in\n\
         */1/*) trap 'sh leave.sh \"$1\"; exit 0' TERM ;;\n\
         esac\n\
         {BACKEND} \"$1\" &\n\
         while :; do wait; done\n"
    );
    let fixture = Fixture::new(1).cmd("sh app.sh {port}");
    // A long stop_timeout: the roll must go on as soon as the leftover lets go of the
    // port, not wait for the timeout (which would outlast `wait_log`'s deadline).
    let yaml = fixture
        .yaml()
        .replace("stop_timeout: 5s", "stop_timeout: 120s");
    let rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        write_script(dir, "app.sh", &app);
        write_script(
            dir,
            "leave.sh",
            &format!("env -i setsid sh squat.sh {BACKEND} \"$1\" </dev/null >/dev/null 2>&1 &\n"),
        );
        write_script(
            dir,
            "squat.sh",
            // Retries while the port is taken (the backend exits 1), for 20 s at most;
            // once its backend has run and been stopped, it is done: nothing outlives
            // the test.
            "i=0\nwhile [ $i -lt 200 ]; do \"$1\" \"$2\"; [ $? -eq 1 ] || exit 0; i=$((i+1)); sleep 0.1; done\n",
        );
    });
    rolld.wait_log("roll finished", 1);
    let port = fixture.sets[0][0];
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    let mut squatter = None;
    wait_until("the leftover takes the first set's port", SOON, || {
        squatter = all_pids().into_iter().find(|&p| {
            alive(p)
                && comm(p).starts_with("rolld-example")
                && env_var(p, "ROLLD_PROCESS").is_none()
                && fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains(&port.to_string()))
        });
        squatter.is_some() && !port_free(port)
    });
    let squatter = squatter.expect("found above");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 3);
    let line = format!("port {port} is held by pid {squatter} (");
    assert!(rolld.log().contains(&line), "{}", rolld.log());
    assert!(
        rolld
            .log()
            .contains("left over from an earlier set; stopping it"),
        "{}",
        rolld.log()
    );
    assert!(!alive(squatter));
    assert_eq!(get_blocking(rolld.listen, "/").expect("serves").0, 200);
}

#[test]
fn as_pid_1_of_a_pid_namespace_rolld_reaps_orphans_and_stops_on_sigterm() {
    if !root_or_skip("rolld as PID 1 in a PID namespace (unshare)") {
        return;
    }
    let fixture = Fixture::new(1).cmd("sh app.sh {port}");
    let dir = tempfile::tempdir().expect("temp dir");
    write_daemonizing(dir.path());
    fs::write(dir.path().join("rolld.yml"), fixture.yaml()).expect("config");
    let log = fs::File::create(dir.path().join("rolld.log")).expect("log");
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            ROLLD,
            "rolld.yml",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start unshare");
    let unshare = child.id() as i32;
    let mut rolld = Rolld {
        child: Some(child),
        dir,
        config: PathBuf::from("rolld.yml"),
        listen: fixture.listen,
    };
    rolld.wait_log("roll finished", 1);
    assert!(rolld.log().contains("running as PID 1"), "{}", rolld.log());
    // rolld, as this namespace sees it: unshare's one child.
    let pid: i32 = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
        .expect("unshare's children")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("rolld runs under unshare");
    let inner_pid = |p: i32| -> Option<String> {
        let status = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
        line.split_whitespace().last().map(String::from)
    };
    assert_eq!(
        inner_pid(pid).as_deref(),
        Some("1"),
        "rolld is PID 1 inside"
    );
    let zombies_of = |parent: i32| -> Vec<i32> {
        all_pids()
            .into_iter()
            .filter(|&p| stat(p).is_some_and(|f| f[0] == "Z" && f[1] == parent.to_string()))
            .collect()
    };
    // The daemon's parent exits: the orphan is re-parented to PID 1.
    let mut daemon = None;
    wait_until("the daemon, re-parented to PID 1", SOON, || {
        daemon = all_pids().into_iter().find(|&p| {
            alive(p) && stat(p).is_some_and(|f| f[1] == pid.to_string() && f[3] == p.to_string())
        });
        daemon.is_some()
    });
    let daemon = daemon.expect("found above");
    for round in 2..=3 {
        let (code, out, err) = rolld.control("reload", &[]);
        assert_eq!(code, Some(0), "roll {round}: {out}{err}");
    }
    wait_until("the first daemon reaped", SOON, || gone(daemon));
    wait_until("no zombie under PID 1", SOON, || zombies_of(pid).is_empty());
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM to rolld");
    let status = rolld.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "{}", rolld.log());
    assert!(rolld.log().contains("rolld stopped"), "{}", rolld.log());
    assert!(!alive(pid));
}

/// A cgroup2 hierarchy mounted for one test, with a folder for rolld; unmounted (and
/// emptied) on drop.
struct Cgroup2 {
    mount: tempfile::TempDir,
    sub: PathBuf,
}

impl Cgroup2 {
    fn new() -> Cgroup2 {
        let mount = tempfile::tempdir().expect("mount point");
        let out = output_within(
            Command::new("mount")
                .args(["-t", "cgroup2", "none"])
                .arg(mount.path()),
            SOON,
        );
        assert!(
            out.status.success(),
            "mount -t cgroup2: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sub = mount.path().join(format!(
            "rolld-test-{}-{}",
            std::process::id(),
            free_ports(1)[0]
        ));
        fs::create_dir(&sub).expect("create the delegated cgroup");
        Cgroup2 { mount, sub }
    }

    /// Every cgroup folder under the test's, deepest first.
    fn folders(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        walk(&e.path(), out);
                    }
                }
            }
            out.push(dir.to_path_buf());
        }
        let mut out = Vec::new();
        walk(&self.sub, &mut out);
        out
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        for dir in self.folders() {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        for dir in self.folders() {
            for _ in 0..100 {
                if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

#[test]
fn in_cgroup_mode_each_set_has_its_cgroup_and_nothing_escapes_a_stop() {
    if !root_or_skip("the cgroup mode (mount -t cgroup2)") {
        return;
    }
    let cgroups = Cgroup2::new();
    // The daemon also clears its environment: no mark finds it, only its cgroup.
    let app = format!(
        "sh -c 'env -i setsid \"$0\" \"$1\" </dev/null >/dev/null 2>&1 &' {BACKEND} \"$1\"\n\
         sleep 300 &\n\
         wait\n"
    );
    let fixture = Fixture::new(1).cmd("sh app.sh {port}");
    let yaml = format!("cgroup: {}\n{}", cgroups.sub.display(), fixture.yaml());
    let mut rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        write_script(dir, "app.sh", &app)
    });
    rolld.wait_log("roll finished", 1);
    let pid = rolld.pid();
    let (code, out, err) = {
        let out = output_within(
            Command::new(ROLLD).arg("check").arg(rolld.config_path()),
            SOON,
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{err}");
    let says = format!("containment:  cgroup v2 under {}", cgroups.sub.display());
    assert!(out.contains(&says), "{out}");

    let set1 = cgroups.sub.join(format!("rolld-{pid}/set-1"));
    let port = fixture.sets[0][0];
    let procs = set1.join(format!("port-{port}/cgroup.procs"));
    let mut members = Vec::new();
    wait_until(
        "the script, its worker and the daemon in the cgroup",
        SOON,
        || {
            members = fs::read_to_string(&procs)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse::<i32>().ok())
                .collect();
            members.len() >= 3
        },
    );
    let daemon = *members
        .iter()
        .find(|&&p| comm(p).starts_with("rolld-example") && env_var(p, "ROLLD_PROCESS").is_none())
        .expect("the daemon, without a mark, is in the set's cgroup");

    let (code, status, err) = rolld.control("status", &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        status.contains("set 1 (cgroup): memory ") && status.contains(", cpu "),
        "{status}"
    );

    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    wait_until("the unmarked daemon killed with its set", SOON, || {
        !alive(daemon)
    });
    wait_until("set 1's cgroup removed", SOON, || !set1.exists());
    wait_until("its port free", SOON, || port_free(port));

    rolld.signal(Signal::SIGTERM);
    assert_eq!(rolld.wait_exit(SOON).code(), Some(0), "{}", rolld.log());
    let left: Vec<PathBuf> = cgroups
        .folders()
        .into_iter()
        .filter(|d| d != &cgroups.sub)
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    let procs = fs::read_to_string(cgroups.sub.join("cgroup.procs")).unwrap_or_default();
    assert!(procs.trim().is_empty(), "{procs}");
}

#[test]
fn a_cgroup_setting_that_is_no_cgroup_v2_folder_is_a_config_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("rolld.yml");
    fs::write(
        &config,
        format!(
            "cgroup: {}\n{}",
            dir.path().display(),
            Fixture::new(1).yaml()
        ),
    )
    .expect("config");
    let out = output_within(Command::new(ROLLD).arg("check").arg(&config), SOON);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`cgroup`") && stderr.contains("not a cgroup v2 folder"),
        "{stderr}"
    );
    let out = output_within(Command::new(ROLLD).arg(&config), SOON);
    assert_eq!(out.status.code(), Some(2), "rolld does not start either");
}

/// Eight daemons, each re-parented to rolld when the stop signal ends its parent: each
/// still gets its grace period (rolld lists the tree again before it takes the rest for
/// gone, since a listing can miss a process re-parented while it walks the tree).
#[test]
fn a_roll_stops_every_daemon_of_a_larger_set_with_its_stop_signal() {
    let (fixture, rolld) = start_daemonizing(8);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    for &port in &fixture.sets[0] {
        wait_until("the old set's port free", SOON, || port_free(port));
    }
    let killed: Vec<u16> = fixture.sets[0]
        .iter()
        .copied()
        .filter(|&port| !stopped_gracefully(&rolld, port))
        .collect();
    assert!(
        killed.is_empty(),
        "not stopped with SIGTERM: {killed:?}\n{}",
        rolld.log()
    );
}
