//! Rolling on SIGHUP: under load nothing is lost, long requests outlive their roll,
//! and a bad new set or a bad config leaves the old set serving.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

/// One request of the load: what to send, and the exact body expected back.
struct LoadRequest {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    expected: Expected,
}

enum Expected {
    Prefix(&'static [u8]),
    Exactly(Vec<u8>),
}

impl LoadRequest {
    /// The n-th request: a GET answered after 0-200 ms, a streamed multi-chunk body, or
    /// a POST whose body comes back echoed.
    fn nth(n: usize) -> LoadRequest {
        let delay = (n * 37) % 200;
        match n % 3 {
            0 => LoadRequest {
                method: "GET",
                path: format!("/?delay={delay}"),
                body: vec![],
                expected: Expected::Prefix(b"hello from "),
            },
            1 => LoadRequest {
                method: "GET",
                path: "/stream?chunks=5&chunk_delay=15".into(),
                body: vec![],
                expected: Expected::Exactly(
                    (0..5)
                        .map(|i| format!("chunk {i}\n"))
                        .collect::<String>()
                        .into_bytes(),
                ),
            },
            _ => {
                let body = format!("payload {n} ").repeat(50 + n % 500).into_bytes();
                LoadRequest {
                    method: "POST",
                    path: format!("/echo?delay={delay}"),
                    expected: Expected::Exactly(body.clone()),
                    body,
                }
            }
        }
    }

    fn accepts(&self, got: &[u8]) -> bool {
        match &self.expected {
            Expected::Prefix(p) => got.starts_with(p),
            Expected::Exactly(e) => got == e.as_slice(),
        }
    }
}

#[test]
fn five_rolls_under_load_lose_no_request() {
    let fixture = Fixture::new(4);
    let rolld = Rolld::start(&fixture);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..40 {
        let (stop, ok, errors, counter) =
            (stop.clone(), ok.clone(), errors.clone(), counter.clone());
        workers.push(rt.spawn(async move {
            let client = client();
            let started = Instant::now();
            // Bounded in time and count whatever happens.
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                if n > 200_000 {
                    break;
                }
                let load = LoadRequest::nth(n);
                let (method, path) = (load.method, &load.path);
                match request(&client, method, port, path, &load.body).await {
                    Ok((200, _, got)) if load.accepts(&got) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((status, _, got)) => errors.lock().expect("lock").push(format!(
                        "{method} {path}: status {status}, body {:?}",
                        String::from_utf8_lossy(&got[..got.len().min(80)])
                    )),
                    Err(e) => errors
                        .lock()
                        .expect("lock")
                        .push(format!("{method} {path}: {e}")),
                }
            }
        }));
    }

    wait_until("load to flow", SOON, || ok.load(Ordering::Relaxed) > 100);
    for roll in 1..=5u64 {
        let old = rolld.pids_of(roll);
        assert_eq!(old.len(), 4, "generation {roll} has four processes");
        rolld.signal(Signal::SIGHUP);
        rolld.wait_log("roll finished", roll as usize + 1);
        let new = rolld.pids_of(roll + 1);
        assert_eq!(new.len(), 4);
        for pid in &old {
            assert!(
                !alive(*pid),
                "old process {pid} of generation {roll} still runs after the roll"
            );
        }
        for pid in &new {
            assert!(alive(*pid), "new process {pid} runs");
        }
        let served: i32 = get_blocking(port, "/pid")
            .expect("proxy answers")
            .1
            .parse()
            .expect("a pid");
        assert!(
            new.contains(&served),
            "answer from {served}, not one of the new set {new:?}"
        );
        // Let the load run against the new set for a moment before the next roll.
        let before = ok.load(Ordering::Relaxed);
        wait_until("requests on the new set", SOON, || {
            ok.load(Ordering::Relaxed) > before + 50
        });
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for w in workers {
            w.await.expect("load worker");
        }
    });
    let errors = errors.lock().expect("lock");
    assert_none_failed(ok.load(Ordering::Relaxed), &errors);
    assert!(ok.load(Ordering::Relaxed) > 500, "the load ran");
}

/// The real gunicorn (an arbiter and its sync workers in one process group) rolled three
/// times under load: nothing is lost, every old arbiter and worker is gone when its roll
/// ends, and each stopped on the stop signal, none by SIGKILL.
#[test]
fn gunicorn_rolls_under_load_lose_nothing_and_its_workers_stop_on_the_signal() {
    let Some(gunicorn) = crate::slow_clients::gunicorn() else {
        return;
    };
    let app_dir = tempfile::tempdir().expect("app dir");
    let fixture = Fixture::new(2).cmd(crate::slow_clients::gunicorn_cmd(&gunicorn, app_dir.path()));
    let rolld = Rolld::start(&fixture);
    let load = Load::start(fixture.listen, 8);
    load.wait_for_more(50);
    for roll in 1..=3u64 {
        let arbiters = rolld.pids_of(roll);
        assert_eq!(arbiters.len(), 2, "two gunicorns in set {roll}");
        // Each arbiter with its two workers, once they have booted.
        let mut group = Vec::new();
        wait_until("every gunicorn worker booted", SOON, || {
            group = arbiters.iter().flat_map(|&p| group_members(p)).collect();
            group.len() >= 6
        });
        let (code, out, err) = rolld.control("reload", &[]);
        assert_eq!(code, Some(0), "{out}{err}");
        rolld.wait_log("roll finished", roll as usize + 1);
        let left: Vec<i32> = group.iter().copied().filter(|&p| alive(p)).collect();
        assert!(
            left.is_empty(),
            "old gunicorn processes still run: {left:?}"
        );
        load.wait_for_more(30);
    }
    let (ok, errors) = load.finish();
    assert_none_failed(ok, &errors);
    let log = rolld.log();
    assert!(!log.contains("SIGKILL"), "a gunicorn needed SIGKILL: {log}");
}

#[test]
fn a_request_longer_than_the_roll_completes_on_its_old_process() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let long = rt.spawn(async move { get(&client(), port, "/?delay=3000").await });
    // The request is in flight once the proxy has routed it; give it a moment to be sent.
    rolld.wait_in_flight(1);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("swapped: new set serving", 2);
    assert!(
        alive(old[0]),
        "the old process must not be stopped while its request is in flight"
    );
    let (status, body) = rt.block_on(long).expect("task").expect("long request");
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("pid {}", old[0])),
        "answered by the old process: {body}"
    );
    rolld.wait_log("roll finished", 2);
    wait_until("old process gone", SOON, || !alive(old[0]));
    let log = rolld.log();
    assert!(log.contains("draining 1 request(s) in flight"), "{log}");
    // Lines about the old set name its generation once, and the roll's as `roll`.
    assert!(log.contains("old set stopped generation=1 roll=2"), "{log}");
    assert!(!log.contains("generation=1 generation=2"), "{log}");
    // The proxy counts the requests: no watching of the old set's sockets on top.
    assert!(!log.contains("connection to the old set"), "{log}");
}

/// A balancer that reloads may still open a connection to the old set just after the
/// roll first finds none open (a worker finishing its last requests the old way): the
/// roll waits for a quiet moment before it stops the old set.
#[test]
fn without_the_proxy_a_connection_opened_just_after_the_switch_still_holds_the_old_set() {
    let fixture = Fixture::new(1);
    let old_port = fixture.sets[0][0];
    let listen = format!("listen: 127.0.0.1:{}\n", fixture.listen);
    // The "balancer": once `late` exists, a reload sends one more request to the old
    // port 50 ms after the switch, from the background.
    let yaml = fixture
        .extra("  after_start:\n    - run_proc: '[ -f late ] && bash late.sh </dev/null >/dev/null 2>&1 &'\n")
        .yaml()
        .replacen(&listen, "", 1);
    let rolld = Rolld::spawn_with(&yaml, 0, |dir| {
        let script = format!(
            "sleep 0.05\nexec 3<>/dev/tcp/127.0.0.1/{old_port}\nprintf 'GET /?delay=1000 HTTP/1.1\\r\\nHost: app\\r\\nConnection: close\\r\\n\\r\\n' >&3\ncat <&3 > late-answer\n"
        );
        std::fs::write(dir.join("late.sh"), script).expect("balancer script");
    });
    rolld.wait_log("roll finished", 1);
    let old = rolld.pids_of(1);
    let dir = rolld.config_path().with_file_name("");
    std::fs::write(dir.join("late"), "").expect("arm the balancer");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    let answer = std::fs::read_to_string(dir.join("late-answer")).unwrap_or_default();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the old set stopped under the balancer's late connection: {answer:?}\n{}",
        rolld.log()
    );
    rolld.wait_log("connection(s) to the old set to close", 1);
    wait_until("old process gone", SOON, || !alive(old[0]));
}

/// Without rolld's proxy (the apps serve their own ports, a balancer elsewhere sends
/// them clients), the only sign of requests to the old set is its open connections: the
/// roll stops the old set only once they are closed.
#[test]
fn without_the_proxy_a_roll_stops_the_old_set_only_once_its_connections_close() {
    let fixture = Fixture::new(1);
    let yaml = fixture
        .yaml()
        .replacen(&format!("listen: 127.0.0.1:{}\n", fixture.listen), "", 1);
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let old = rolld.pids_of(1);
    // A slow request straight to the old process, connected before the roll.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", fixture.sets[0][0]))
        .expect("connect to the old process");
    stream.set_read_timeout(Some(SOON)).expect("read timeout");
    stream
        .write_all(b"GET /?delay=2000 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("waiting for 1 connection(s) to the old set to close", 1);
    assert!(
        alive(old[0]),
        "the old process stopped under an open connection"
    );
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("the answer, then the close");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    rolld.wait_log("roll finished", 2);
    wait_until("old process gone", SOON, || !alive(old[0]));
    let log = rolld.log();
    assert!(
        !log.contains("they will be cut"),
        "the connection closed before drain_timeout: {log}"
    );
}

#[test]
fn a_new_set_that_fails_its_health_check_rolls_back() {
    let fixture = Fixture::new(2).extra("");
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let bad = Fixture {
        cmd: format!("{BACKEND} {{port}} --unhealthy"),
        ..fixture
    };
    let yaml = bad
        .yaml()
        .replace("start_timeout: 20s", "start_timeout: 1s");
    rolld.write_config(&yaml);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll failed, rolled back", 1);
    let new = rolld.pids_of(2);
    assert_eq!(new.len(), 2, "the new set was started");
    for pid in &new {
        wait_until("failed new process gone", SOON, || !alive(*pid));
    }
    for pid in &old {
        assert!(alive(*pid), "old process {pid} keeps running");
    }
    let served: i32 = get_blocking(rolld.listen, "/pid")
        .expect("proxy answers")
        .1
        .parse()
        .expect("pid");
    assert!(old.contains(&served), "old set keeps serving");
    assert!(
        rolld
            .log()
            .contains("answered 503 Service Unavailable, accepted 200"),
        "the log says why"
    );
}

#[test]
fn a_new_set_that_exits_at_once_rolls_back_without_waiting_for_the_timeout() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    rolld.write_config(
        &Fixture {
            cmd: "/bin/false {port}".into(),
            ..fixture
        }
        .yaml(),
    );
    let started = Instant::now();
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll failed, rolled back", 1);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "an exit fails the roll at once, not after start_timeout (20s)"
    );
    assert!(
        rolld.log().contains("exited during start-up"),
        "{}",
        rolld.log()
    );
    assert!(alive(old[0]));
    assert!(get_blocking(rolld.listen, "/")
        .expect("proxy answers")
        .1
        .contains("hello"));
}

#[test]
fn an_invalid_config_is_refused_on_sighup_and_the_old_set_keeps_serving() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    rolld.write_config(&fixture.yaml().replace("workset:", "worksett:"));
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll refused", 1);
    assert!(
        rolld.log().contains("worksett"),
        "the refusal names the problem"
    );
    assert_eq!(
        rolld.count_log("process started"),
        2,
        "nothing new was started"
    );
    for pid in &old {
        assert!(alive(*pid));
    }
    let served: i32 = get_blocking(rolld.listen, "/pid")
        .expect("proxy answers")
        .1
        .parse()
        .expect("pid");
    assert!(old.contains(&served));
    // A fixed file rolls again.
    rolld.write_config(&fixture.yaml());
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
}

/// A reload that changes the list of worksets goes on with the set after the serving
/// one in the new list, then wraps around it; a list without the serving set starts at
/// its first set.
#[test]
fn a_new_list_of_worksets_goes_on_after_the_serving_set() {
    let mut fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let serving = fixture.sets[0].clone();
    let serving_port = || {
        let (status, body) = get_blocking(rolld.listen, "/").expect("an answer");
        assert_eq!(status, 200, "{body}");
        answered_by(body.as_bytes())
    };
    assert_eq!(serving_port(), Some(serving[0]));
    let fresh = free_ports(4);
    let (before, after) = (vec![fresh[0]], vec![fresh[1]]);
    fixture.sets = vec![before.clone(), serving.clone(), after.clone()];
    rolld.write_config(&fixture.yaml());
    let reload = |roll: usize| {
        let (code, out, err) = rolld.control("reload", &[]);
        assert_eq!(code, Some(0), "{out}{err}");
        rolld.wait_log("roll finished", roll);
    };
    reload(2);
    assert_eq!(
        serving_port(),
        Some(after[0]),
        "the set after the serving one"
    );
    reload(3);
    assert_eq!(serving_port(), Some(before[0]), "then around to the first");
    // A list that does not hold the serving set: its first set.
    fixture.sets = vec![vec![fresh[2]], vec![fresh[3]]];
    rolld.write_config(&fixture.yaml());
    reload(4);
    assert_eq!(serving_port(), Some(fresh[2]), "the new list's first set");
}

#[test]
fn sighups_during_a_roll_queue_exactly_one_more_roll() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 1500"));
    let rolld = Rolld::start(&fixture);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("starting 1 process(es)", 2);
    // Each HUP is seen on its own (none merged with the next by the kernel).
    for seen in 1..=3 {
        rolld.signal(Signal::SIGHUP);
        rolld.wait_log("one more is queued after it", seen);
    }
    rolld.wait_log("roll finished generation=3", 1);
    // One more HUP now starts the fourth roll. Had anything else been queued, a fourth
    // roll would have begun as soon as the third ended, before this HUP was sent.
    let before = rolld.log().len();
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished generation=4", 1);
    let log = rolld.log();
    let fourth = log
        .match_indices("starting 1 process(es)")
        .nth(3)
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("no fourth roll started:\n{log}"));
    assert!(
        fourth >= before,
        "a fourth roll started before the fourth HUP: the three HUPs queued more than one roll\n{log}"
    );
}

#[test]
fn without_holding_requests_before_the_first_set_is_ready_get_503_with_retry_after() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 3000"));
    let yaml = format!("proxy:\n  hold_timeout: 0s\n{}", fixture.yaml());
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = client();
    let port = rolld.listen;
    let (status, headers) = rt.block_on(async {
        let start = Instant::now();
        loop {
            match request(&client, "GET", port, "/", b"").await {
                Ok((status, headers, _)) => return (status, headers),
                Err(_) if start.elapsed() < SOON => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("proxy never answered: {e}"),
            }
        }
    });
    assert_eq!(status, 503);
    assert_eq!(
        headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    rolld.wait_log("roll finished", 1);
    assert_eq!(get_blocking(port, "/").expect("served").0, 200);
}

#[test]
fn a_drain_that_times_out_says_how_many_requests_it_cut() {
    let fixture = Fixture::new(1).extra("  drain_timeout: 1s\n");
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let long = rt.spawn(async move { get(&client(), port, "/?delay=20000").await });
    rolld.wait_in_flight(1);
    let started = Instant::now();
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the drain stopped at drain_timeout"
    );
    assert!(
        rolld
            .log()
            .contains("with 1 request(s) in flight; they will be cut"),
        "{}",
        rolld.log()
    );
    wait_until("old process stopped", SOON, || !alive(old[0]));
    let cut = rt.block_on(long).expect("task");
    assert!(
        !matches!(cut, Ok((200, _))),
        "the cut request fails visibly (502 or a broken response), never as a success: {cut:?}"
    );
}

#[test]
fn old_processes_are_reaped_not_left_as_zombies() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    for pid in old {
        wait_until("old process reaped", SOON, || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
    }
}

#[test]
fn processes_mode_picks_free_ports_for_every_set() {
    let listen = free_ports(1)[0];
    let yaml = format!(
        "listen: 127.0.0.1:{listen}\napp-servers:\n  cmd: '{BACKEND} {{port}}'\n  processes: 2\n  port_range: 22000-22999\n  environment: {{GREETING: hi there}}\n"
    );
    let rolld = Rolld::spawn(&yaml, listen);
    rolld.wait_log("roll finished", 1);
    let ports_of = |generation: u64| -> Vec<u16> {
        rolld
            .log()
            .lines()
            .filter(|l| l.contains(&format!("process started generation={generation} ")))
            .filter_map(|l| {
                l.split("port=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let first = ports_of(1);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|p| (22000..=22999).contains(p)));
    assert_eq!(
        get_blocking(first[0], "/env?name=GREETING").expect("env").1,
        "hi there"
    );
    assert_eq!(
        get_blocking(first[0], "/env?name=PORT").expect("env").1,
        first[0].to_string()
    );
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    let second = ports_of(2);
    assert_eq!(second.len(), 2);
    assert!(
        second.iter().all(|p| !first.contains(p)),
        "{first:?} then {second:?}"
    );
    for _ in 0..10 {
        let answer = get_blocking(listen, "/").expect("served").1;
        assert!(
            second
                .iter()
                .any(|p| answer.contains(&format!("hello from {p} "))),
            "{answer} from {second:?}"
        );
    }
}

#[test]
fn a_sighup_while_the_first_set_starts_rolls_once_it_serves() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 500"));
    let rolld = Rolld::spawn(&fixture.yaml(), fixture.listen);
    rolld.wait_log("process started", 1);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished generation=2", 1);
    assert!(alive(rolld.pid()), "rolld survives an early SIGHUP");
}

#[test]
fn a_new_process_that_dies_after_its_checks_but_before_the_swap_fails_the_roll() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::spawn_with(&fixture.yaml(), fixture.listen, |dir| {
        // Rendered with the new set's ports: kills the new process between its checks
        // and the swap.
        std::fs::write(
            dir.join("kill.sh.templ"),
            "{% for port in ports %}pkill -KILL -f 'rolld-example-backend {{ port }}$'\n{% endfor %}",
        )
        .expect("template");
    });
    rolld.wait_log("roll finished", 1);
    let old = rolld.pids_of(1);
    let with_killer = format!(
        "{}  after_start:\n    - replace_file: [numprocs, 'kill.sh.templ', 'kill.sh']\n    - run_proc: 'sh kill.sh; sleep 0.5'\n",
        fixture.yaml()
    );
    rolld.write_config(&with_killer);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll failed, rolled back", 1);
    assert!(rolld.log().contains("before the swap"), "{}", rolld.log());
    assert!(alive(old[0]), "the old set keeps serving");
    let served: i32 = get_blocking(rolld.listen, "/pid")
        .expect("served")
        .1
        .parse()
        .expect("pid");
    assert_eq!(served, old[0]);
}

#[test]
fn a_setting_that_needs_a_restart_is_kept_and_the_log_says_so() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let other = free_ports(1)[0];
    rolld.write_config(&fixture.yaml().replace(
        &format!("listen: 127.0.0.1:{}", fixture.listen),
        &format!("listen: 127.0.0.1:{other}\nproxy:\n  access_log: true"),
    ));
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
    let log = rolld.log();
    assert!(log.contains("`listen` changed in the config file"), "{log}");
    assert!(log.contains("`proxy` changed in the config file"), "{log}");
    // Only what changed is named.
    for unchanged in ["`tls", "`user/group`", "`control_socket`", "`admin`"] {
        assert!(
            !log.contains(&format!("{unchanged} changed in the config file"))
                && !log.contains(&format!("{unchanged} (")),
            "{unchanged}: {log}"
        );
    }
    assert_eq!(
        get_blocking(rolld.listen, "/")
            .expect("still on the first port")
            .0,
        200
    );
}
