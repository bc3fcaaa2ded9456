//! The rollout guard: a release judged on real traffic after its switch. A bad release
//! (500s, a crash) is rolled back during its bake to the old processes, still running;
//! a good one is promoted when the bake ends; a canary takes its exact share of
//! requests; an operator can end a canary or bake either way. Under load, nothing is
//! lost but what the bad release itself answered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

/// Two processes per set; a roll to the next set is guarded by `rollout`.
fn fixture(rollout: &str) -> Fixture {
    Fixture::new(2).extra(&format!("  rollout:\n{rollout}"))
}

/// The same config with the app command `cmd` (the next release).
fn release(fixture: &Fixture, flags: &str) -> String {
    Fixture {
        listen: fixture.listen,
        sets: fixture.sets.clone(),
        cmd: format!("{BACKEND} {{port}} {flags}"),
        extra: fixture.extra.clone(),
    }
    .yaml()
}

fn status(rolld: &Rolld) -> serde_json::Value {
    let (_, stdout, _) = rolld.control("status", &["--json"]);
    serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null)
}

/// The phase of the canary or bake in progress, if any.
fn phase(rolld: &Rolld) -> Option<String> {
    status(rolld)["rollout"]["phase"]
        .as_str()
        .map(str::to_string)
}

/// Every failed answer of the load is a 500 the bad release wrote itself, on `ports`.
fn only_the_bad_releases_500s(errors: &[String], ports: &[u16]) {
    for e in errors {
        let from_bad = ports
            .iter()
            .any(|p| e.starts_with(&format!("500: failing on purpose from {p} ")));
        assert!(from_bad, "a request was lost or failed elsewhere: {e}");
    }
}

/// Answers on `ports` between two tallies, and all answers between them.
fn share(
    before: &HashMap<u16, usize>,
    after: &HashMap<u16, usize>,
    ports: &[u16],
) -> (usize, usize) {
    let delta = |p: &u16| after.get(p).copied().unwrap_or(0) - before.get(p).copied().unwrap_or(0);
    let on: usize = ports.iter().map(delta).sum();
    let all: usize = after.keys().map(delta).sum();
    (on, all)
}

#[test]
fn a_release_answering_500s_is_rolled_back_during_its_bake_to_the_same_old_processes() {
    let fixture = fixture("    bake: 60s\n    max_error_rate: 2%\n    min_requests: 50\n");
    let admin = free_ports(1)[0];
    let rolld = Rolld::spawn(
        &format!("admin: 127.0.0.1:{admin}\n{}", fixture.yaml()),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let old = rolld.pids_of(1);
    assert_eq!(old.len(), 2);
    let load = Load::start(rolld.listen, 8);
    load.wait_for_more(50);

    rolld.write_config(&release(&fixture, "--fail-share 20"));
    let started = Instant::now();
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    let took = started.elapsed();
    assert_eq!(
        code,
        Some(1),
        "reload exits 1 on a rollback: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("rolled back after switch: ")
            && stderr.contains("requests failed (5xx ")
            && stderr.contains("> 2%"),
        "the reason: {stderr}"
    );
    assert!(
        took < Duration::from_secs(50),
        "judged on the failures, not at the end of the 60 s bake ({took:?})"
    );
    // The old processes served again: the same pids, never restarted.
    for pid in &old {
        assert!(alive(*pid), "old process {pid} still runs");
    }
    assert_eq!(rolld.pids_of(1), old, "no old process was started again");
    let new = rolld.pids_of(2);
    assert_eq!(new.len(), 2);
    wait_until("the bad release stopped", SOON, || {
        new.iter().all(|p| !alive(*p))
    });
    let served: i32 = get_blocking(rolld.listen, "/pid")
        .expect("proxy answers")
        .1
        .parse()
        .expect("a pid");
    assert!(old.contains(&served), "{served} is of the old set {old:?}");
    let s = status(&rolld);
    assert_eq!(s["generation"], 1, "{s}");
    assert_eq!(s["last_roll"]["outcome"], "rolled back", "{s}");

    let (_, metrics) = get_blocking(admin, "/metrics").expect("metrics");
    for line in [
        "rolld_rollbacks_after_switch_total{reason=\"error_rate\"} 1",
        "rolld_rollbacks_after_switch_total{reason=\"crash\"} 0",
        "rolld_rollout_phase{phase=\"bake\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let judged: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rolld_rollout_error_rate "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the error rate judged");
    assert!(judged > 0.02, "judged {judged}");

    load.wait_for_more(100);
    let (ok, errors) = load.finish();
    assert!(ok > 150);
    assert!(!errors.is_empty(), "the bad release answered some 500s");
    only_the_bad_releases_500s(&errors, &fixture.sets[1]);
}

#[test]
fn a_release_crashing_after_it_became_healthy_is_rolled_back_during_its_bake() {
    let fixture = fixture("    bake: 60s\n");
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let load = Load::start(rolld.listen, 8);
    load.wait_for_more(50);

    rolld.write_config(&release(&fixture, "--crash-after 5000"));
    let started = Instant::now();
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("rolled back after switch: process on port ") && stderr.contains("exited"),
        "the reason: {stderr}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(50),
        "rolled back at the crash, 5 s after healthy ({took:?})"
    );
    assert_eq!(rolld.pids_of(1), old);
    assert!(old.iter().all(|p| alive(*p)), "old processes {old:?} run");
    let (_, errors) = {
        load.wait_for_more(100);
        load.finish()
    };
    assert!(errors.is_empty(), "lost: {errors:?}");
}

#[test]
fn a_good_release_is_promoted_when_its_bake_ends_and_the_old_set_stops() {
    let fixture = fixture("    bake: 3s\n");
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let load = Load::start(rolld.listen, 8);
    load.wait_for_more(50);

    rolld.write_config(&release(&fixture, ""));
    std::thread::scope(|scope| {
        let reload = scope.spawn(|| rolld.control("reload", &[]));
        wait_until("the bake", SOON, || {
            phase(&rolld).as_deref() == Some("bake")
        });
        // Baking: the new set serves, the old one is up and idle.
        let served: i32 = get_blocking(rolld.listen, "/pid")
            .expect("proxy answers")
            .1
            .parse()
            .expect("a pid");
        assert!(rolld.pids_of(2).contains(&served));
        assert!(old.iter().all(|p| alive(*p)), "old set up during the bake");
        let s = status(&rolld);
        assert_eq!(s["rollout"]["generation"], 2, "{s}");
        assert_eq!(s["rollout"]["old_generation"], 1, "{s}");
        assert!(s["rollout"]["seconds_left"]
            .as_f64()
            .is_some_and(|s| s <= 3.0));
        let (code, stdout, stderr) = reload.join().expect("reload");
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        assert!(stdout.contains("promoted: bake of 3s passed"), "{stdout}");
    });
    assert!(
        old.iter().all(|p| !alive(*p)),
        "old set stopped after the bake"
    );
    assert!(phase(&rolld).is_none());
    let (_, errors) = load.finish();
    assert!(errors.is_empty(), "lost: {errors:?}");
}

#[test]
fn a_canary_takes_its_share_of_requests_and_a_bad_one_is_rolled_back_after_it() {
    let fixture = fixture("    canary: 10%\n    canary_for: 60s\n    bake: 60s\n");
    let rolld = Rolld::start(&fixture);
    let load = Load::start(rolld.listen, 16);
    load.wait_for_more(50);
    let (old_ports, new_ports) = (&fixture.sets[0], &fixture.sets[1]);
    let first = rolld.pids_of(1);

    // A good canary: measured by the client, over a window inside the canary.
    rolld.write_config(&release(&fixture, ""));
    let (code, stdout, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0), "{stdout}");
    wait_until("the canary", SOON, || {
        phase(&rolld).as_deref() == Some("canary")
    });
    let before = load.by_port();
    let total = |m: &HashMap<u16, usize>| m.values().sum::<usize>();
    wait_until("400 answers during the canary", SOON, || {
        total(&load.by_port()) >= total(&before) + 400
    });
    let after = load.by_port();
    assert_eq!(
        phase(&rolld).as_deref(),
        Some("canary"),
        "the window lay inside the canary"
    );
    let (on_new, all) = share(&before, &after, new_ports);
    let measured = on_new as f64 / all as f64;
    // The proxy routes exactly every tenth request; the window's edges cut through
    // at most the 16 requests in flight at each end (4% of 400).
    assert!(
        (0.06..=0.14).contains(&measured),
        "10% ± 4% of requests reach the canary: {on_new} of {all} = {:.1}%",
        measured * 100.0
    );
    // `rolld promote` during the canary: the new set takes everything, no bake follows.
    let (code, stdout, stderr) = rolld.control("promote", &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    rolld.wait_log("roll finished", 2);
    assert!(rolld
        .log()
        .contains("canary promoted by the operator; no bake"));
    wait_until("generation 1 stopped", SOON, || {
        first.iter().all(|p| !alive(*p))
    });
    let served_new = rolld.pids_of(2);
    assert!(served_new.iter().all(|p| alive(*p)));

    // A bad canary: rolled back having served only its share.
    rolld.write_config(
        &Fixture {
            listen: fixture.listen,
            sets: fixture.sets.clone(),
            cmd: format!("{BACKEND} {{port}} --fail-share 50"),
            extra: "  rollout:\n    canary: 10%\n    canary_for: 30s\n    min_requests: 20\n"
                .into(),
        }
        .yaml(),
    );
    let before = load.by_port();
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    let after = load.by_port();
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("rolled back during canary: ") && stderr.contains("requests failed"),
        "{stderr}"
    );
    let (on_bad, all) = share(&before, &after, old_ports);
    assert!(on_bad > 0, "the canary served some requests");
    assert!(
        on_bad as f64 <= 0.15 * all as f64,
        "the bad canary served only its share: {on_bad} of {all}"
    );
    assert!(
        served_new.iter().all(|p| alive(*p)),
        "generation 2 keeps serving"
    );
    let (_, errors) = load.finish();
    only_the_bad_releases_500s(&errors, old_ports);
}

#[test]
fn the_operator_rolls_back_or_promotes_during_a_bake_under_load_and_nothing_is_lost() {
    let fixture = fixture("    bake: 60s\n");
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let load = Load::start(rolld.listen, 8);
    load.wait_for_more(50);

    let (code, _, stderr) = rolld.control("promote", &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no canary or bake in progress"), "{stderr}");

    // rolld rollback: back to the same old processes, the new set stopped.
    rolld.write_config(&release(&fixture, ""));
    let (code, _, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0));
    wait_until("the bake", SOON, || {
        phase(&rolld).as_deref() == Some("bake")
    });
    load.wait_for_more(50);
    let (code, stdout, stderr) = rolld.control("rollback", &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("rolling back to generation 1"), "{stdout}");
    rolld.wait_log("rolled back after switch: asked by the operator", 1);
    let second = rolld.pids_of(2);
    wait_until("generation 2 stopped", SOON, || {
        second.iter().all(|p| !alive(*p))
    });
    assert_eq!(rolld.pids_of(1), old);
    assert!(old.iter().all(|p| alive(*p)));
    // The set left behind drained by the proxy's count, not by watching its sockets.
    let log = rolld.log();
    assert!(!log.contains("connection to the old set"), "{log}");
    load.wait_for_more(50);

    // rolld promote: the bake ends at once, the old set stops.
    let (code, _, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0));
    wait_until("the bake", SOON, || {
        phase(&rolld).as_deref() == Some("bake")
    });
    load.wait_for_more(50);
    let (code, stdout, stderr) = rolld.control("promote", &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("promoting generation 3"), "{stdout}");
    rolld.wait_log("roll finished", 2);
    wait_until("the old set stopped", SOON, || {
        old.iter().all(|p| !alive(*p))
    });
    assert!(rolld.pids_of(3).iter().all(|p| alive(*p)));
    load.wait_for_more(50);
    let (_, errors) = load.finish();
    assert!(errors.is_empty(), "lost: {errors:?}");
}

#[test]
fn a_reload_during_a_bake_promotes_the_baking_release_then_rolls() {
    let fixture = fixture("    bake: 60s\n");
    let rolld = Rolld::start(&fixture);
    let first = rolld.pids_of(1);
    let load = Load::start(rolld.listen, 8);
    load.wait_for_more(50);
    let (code, _, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0));
    wait_until("the bake", SOON, || {
        phase(&rolld).as_deref() == Some("bake")
    });

    rolld.signal(nix::sys::signal::Signal::SIGHUP);
    rolld.wait_log("promoting the new set first", 1);
    rolld.wait_log("roll finished", 2);
    assert!(first.iter().all(|p| !alive(*p)), "generation 1 stopped");
    // The next roll started from the promoted release and bakes in turn.
    wait_until("the next bake", SOON, || {
        status(&rolld)["rollout"]["generation"] == 3
    });
    let second = rolld.pids_of(2);
    assert!(second.iter().all(|p| alive(*p)), "generation 2 stands by");
    let (code, stdout, stderr) = rolld.control("promote", &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    rolld.wait_log("roll finished", 3);
    wait_until("generation 2 stopped", SOON, || {
        second.iter().all(|p| !alive(*p))
    });
    let (_, errors) = load.finish();
    assert!(errors.is_empty(), "lost: {errors:?}");
}

#[test]
fn behind_another_balancer_a_crashing_release_is_rolled_back_and_the_file_renders_the_old_ports() {
    let ports = free_ports(2);
    let yaml = format!(
        "app-servers:\n  cmd: '{BACKEND} {{port}} {{flags}}'\n  workset:\n    - numprocs: [{}]\n    - numprocs: [{}]\n  health: {{path: /health, interval: 20ms}}\n  after_start:\n    - replace_file: [numprocs, 'up.templ', 'up.conf']\n    - run_proc: 'cat up.conf >> balancer-reloads'\n  rollout:\n    bake: 60s\n",
        ports[0], ports[1]
    );
    let rolld = Rolld::spawn_with(&yaml.replace("{flags}", ""), 0, |dir| {
        std::fs::write(
            dir.join("up.templ"),
            "{% for port in numprocs %}server 127.0.0.1:{{ port }};{% endfor %}\n",
        )
        .expect("template");
    });
    rolld.wait_log("roll finished", 1);
    let old = rolld.pids_of(1);
    let conf = || {
        std::fs::read_to_string(rolld.config_path().with_file_name("up.conf")).unwrap_or_default()
    };
    assert_eq!(conf(), format!("server 127.0.0.1:{};\n", ports[0]));

    rolld.write_config(&yaml.replace("{flags}", "--crash-after 1000"));
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("rolled back after switch: process on port "),
        "{stderr}"
    );
    assert_eq!(
        conf(),
        format!("server 127.0.0.1:{};\n", ports[0]),
        "the balancer's file names the old port again"
    );
    let reloads = std::fs::read_to_string(rolld.config_path().with_file_name("balancer-reloads"))
        .unwrap_or_default();
    assert_eq!(
        reloads,
        format!(
            "server 127.0.0.1:{a};\nserver 127.0.0.1:{b};\nserver 127.0.0.1:{a};\n",
            a = ports[0],
            b = ports[1]
        ),
        "the balancer was reloaded on the new ports, then back on the old"
    );
    assert_eq!(rolld.pids_of(1), old);
    assert!(old.iter().all(|p| alive(*p)));
    assert_eq!(
        get_blocking(ports[0], "/pid")
            .expect("old process answers")
            .1,
        old[0].to_string()
    );
}

/// Established connections accepted on `port` (from the kernel's TCP table).
fn accepted_on(port: u16) -> usize {
    let local = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "01"
        })
        .count()
}

#[test]
fn a_rollback_with_rolld_and_another_balancer_in_front_waits_for_the_balancers_connections() {
    // rolld's proxy counts its own requests only; another balancer in front
    // (`after_start`) may still be talking to the new set when the bake is ended.
    let fixture = Fixture::new(2)
        .extra("  after_start:\n    - run_proc: 'true'\n  rollout:\n    bake: 60s\n");
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let (code, _, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0));
    wait_until("the bake", SOON, || {
        phase(&rolld).as_deref() == Some("bake")
    });
    let new = rolld.pids_of(2);
    let port = fixture.sets[1][0];
    // The other balancer's request to a new process, still running at the rollback.
    let balancer = std::thread::spawn(move || get_blocking(port, "/?delay=2500"));
    wait_until("the balancer's connection to the new set", SOON, || {
        accepted_on(port) >= 1
    });
    let (code, stdout, stderr) = rolld.control("rollback", &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let answer = balancer.join().expect("balancer thread");
    assert_eq!(
        answer.as_ref().map(|a| a.0),
        Ok(200),
        "the new set was stopped under the balancer's request: {answer:?}\n{}",
        rolld.log()
    );
    rolld.wait_log("connection(s) to the old set to close", 1);
    wait_until("the new set stopped", SOON, || {
        new.iter().all(|p| !alive(*p))
    });
    assert!(old.iter().all(|p| alive(*p)), "the old set serves again");
    assert_eq!(get_blocking(rolld.listen, "/pid").map(|a| a.0), Ok(200));
}

/// Whether the proxy's serving set counts the upstream on `port` as available.
fn available(rolld: &Rolld, port: u16) -> Option<bool> {
    let addr = format!("127.0.0.1:{port}");
    status(rolld)["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["addr"] == addr.as_str())?["available"]
        .as_bool()
}

#[test]
fn after_a_rollback_an_old_process_that_crashes_is_out_of_the_proxy_until_it_is_ready_again() {
    // The old processes serve again through the set they were kept on during the bake:
    // their keepers must report to that set, not to the one they served before.
    let fixture = Fixture::new(2)
        .cmd(format!("{BACKEND} {{port}} --start-delay 1000"))
        .extra("  rollout:\n    bake: 60s\n");
    let rolld = Rolld::start(&fixture);
    let (code, _, _) = rolld.control("reload", &["--no-wait"]);
    assert_eq!(code, Some(0));
    wait_until("the bake", SOON, || {
        phase(&rolld).as_deref() == Some("bake")
    });
    let (code, stdout, stderr) = rolld.control("rollback", &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    rolld.wait_log("rolled back after switch", 1);
    let port = fixture.sets[0][0];
    assert_eq!(available(&rolld, port), Some(true), "{}", rolld.log());
    let (_, pid) = get_blocking(port, "/pid").expect("the old process answers");
    let pid: i32 = pid.trim().parse().expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    // Out while it restarts (its start takes a second), back once it is ready.
    wait_until("the crashed process out of the proxy", SOON, || {
        available(&rolld, port) == Some(false)
    });
    let answer = get_blocking(rolld.listen, "/pid").expect("served by the other process");
    assert_eq!(answer.0, 200);
    assert_ne!(answer.1.trim(), pid.to_string());
    rolld.wait_log("restarted process is ready", 1);
    wait_until("the restarted process back in the proxy", SOON, || {
        available(&rolld, port) == Some(true)
    });
}
