//! Holding instead of failing: requests wait while no set can serve (start-up, every
//! process crashed), `rolld pause`/`resume` around a migration, and maintenance mode;
//! the real binary, the example backend, real clients.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// `fixture`'s config with `proxy:` settings (indented lines) in front.
fn with_proxy(fixture: &Fixture, proxy: &str) -> String {
    format!("proxy:\n{proxy}{}", fixture.yaml())
}

fn held_now(rolld: &Rolld) -> u64 {
    rolld.status_json()["held"]["now"].as_u64().unwrap_or(0)
}

/// One client's outcome: (status, body) or why there was none.
type Answer = Result<(u16, String), String>;

/// Requests sent one after another from threads until stopped, every answer kept.
struct Clients {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(port: u16, n: usize, path: &'static str) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..n)
            .map(|_| {
                let (stop, answers) = (stop.clone(), answers.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(120)
                        && sent < 20_000
                    {
                        sent += 1;
                        let answer = get_blocking(port, path);
                        answers.lock().expect("lock").push(answer);
                    }
                })
            })
            .collect();
        Clients {
            stop,
            answers,
            threads,
        }
    }

    fn count(&self, what: impl Fn(&Answer) -> bool) -> usize {
        self.answers
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| what(a))
            .count()
    }

    fn finish(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        std::mem::take(&mut *self.answers.lock().expect("lock"))
    }
}

/// Sends `n` requests for `path` at once, each from its own thread.
fn send_all(port: u16, n: usize, path: &str) -> Vec<std::thread::JoinHandle<Answer>> {
    (0..n)
        .map(|i| {
            let path = format!("{path}{i}");
            std::thread::spawn(move || get_blocking(port, &path))
        })
        .collect()
}

#[test]
fn requests_sent_while_the_first_set_starts_are_held_and_all_succeed() {
    let fixture = Fixture::new(2).cmd(format!("{BACKEND} {{port}} --start-delay 2000"));
    // Requests are sent once the processes run, so each waits about the 2 s the app
    // takes to bind, well within 5 s.
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 5s\n"),
        fixture.listen,
    );
    // From the moment the processes run, which take 2 s to bind.
    rolld.wait_log("process started", 2);
    assert_eq!(
        rolld.count_log("roll finished"),
        0,
        "the app takes 2 s to bind"
    );
    let started = Instant::now();
    let mut sent = Vec::new();
    // Requests over the next second, all before the first set can serve.
    for _ in 0..5 {
        sent.extend(send_all(fixture.listen, 4, "/?start="));
        std::thread::sleep(Duration::from_millis(200));
    }
    for request in sent {
        let answer = request.join().expect("client thread");
        assert!(
            matches!(&answer, Ok((200, body)) if body.starts_with("hello from")),
            "{answer:?} after {:?}",
            started.elapsed()
        );
    }
    let held = &rolld.status_json()["held"];
    assert_eq!(held["released"].as_u64(), Some(20), "{held}");
    assert_eq!(held["timed_out"].as_u64(), Some(0), "{held}");
}

#[test]
fn with_hold_timeout_0_requests_sent_while_the_first_set_starts_get_503() {
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 2000"));
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 0s\n"),
        fixture.listen,
    );
    rolld.wait_log("process started", 1);
    let answers: Vec<_> = send_all(fixture.listen, 4, "/?start=")
        .into_iter()
        .map(|request| request.join().expect("client thread"))
        .collect();
    assert_eq!(
        rolld.count_log("roll finished"),
        0,
        "answered before the app could bind: {answers:?}"
    );
    for answer in answers {
        assert!(matches!(&answer, Ok((503, _))), "{answer:?}");
    }
}

#[test]
fn a_crash_of_every_process_under_load_loses_no_request() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 10s\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let load = Load::start(fixture.listen, 6);
    load.wait_for_more(50);
    for pid in rolld.pids_of(1) {
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill an app process");
    }
    // Restarted after rolld's 1 s backoff; requests meanwhile wait.
    rolld.wait_log("restarted process is ready", 2);
    load.wait_for_more(50);
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} lost of {ok}: {errors:?}",
        errors.len()
    );
    let held = &rolld.status_json()["held"];
    assert!(
        held["released"].as_u64().unwrap_or(0) > 0,
        "requests were held during the gap: {held}"
    );
}

#[test]
fn pause_waits_for_in_flight_holds_everything_and_resume_releases_every_request() {
    let fixture = Fixture::new(2);
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 1s\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let load = Load::start(fixture.listen, 4);
    load.wait_for_more(30);
    // A slow request in flight: the pause returns only after it.
    let slow_sent = Instant::now();
    let slow = std::thread::spawn({
        let port = fixture.listen;
        move || get_blocking(port, "/?delay=1500")
    });
    rolld.wait_in_flight(1);
    let asked = Instant::now();
    let (code, stdout, stderr) = rolld.control("pause", &["--timeout", "60s"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("nothing in flight"), "{stdout}");
    assert!(
        slow_sent.elapsed() >= Duration::from_millis(1500),
        "pause returned after {:?}, with the slow request in flight",
        asked.elapsed()
    );
    assert!(matches!(slow.join().expect("thread"), Ok((200, _))));
    let in_flight: u64 = rolld.status_json()["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .filter_map(|u| u["in_flight"].as_u64())
        .sum();
    assert_eq!(in_flight, 0, "nothing in flight once pause returned");
    let answered = load.ok();
    // Requests meant for the app while paused: held, not sent (hold_timeout is 1s,
    // they wait for the pause instead).
    let marked = send_all(fixture.listen, 3, "/log?msg=while-paused-");
    wait_until("the load and the marked requests held", SOON, || {
        held_now(&rolld) == 4 + 3
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(held_now(&rolld), 7, "still held after hold_timeout");
    assert_eq!(load.ok(), answered, "no answer from an app while paused");
    let out = std::fs::read_to_string(rolld.dir.path().join("rolld.out")).unwrap_or_default();
    assert!(!out.contains("while-paused"), "reached the app: {out}");
    let (code, stdout, stderr) = rolld.control("resume", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("7 held request(s) released"), "{stdout}");
    for m in marked {
        assert_eq!(m.join().expect("thread"), Ok((200, "logged\n".to_string())));
    }
    wait_until("the marked requests reached the app", SOON, || {
        let out = std::fs::read_to_string(rolld.dir.path().join("rolld.out")).unwrap_or_default();
        (0..3).all(|i| out.contains(&format!("while-paused-{i}")))
    });
    load.wait_for_more(30);
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} lost of {ok}: {errors:?}",
        errors.len()
    );
}

#[test]
fn a_pause_ends_by_itself_after_its_timeout() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 0s\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let (code, _, stderr) = rolld.control("pause", &["--timeout", "5s"]);
    assert_eq!(code, Some(0), "{stderr}");
    let status = rolld.status_json();
    assert!(status["paused_for_s"].as_f64().is_some(), "{status}");
    let (_, text, _) = rolld.control("status", &[]);
    assert!(text.contains("paused"), "{text}");
    // Held although hold_timeout is 0, until the pause ends by itself.
    let held = send_all(fixture.listen, 1, "/?n=");
    wait_until("the request held", SOON, || held_now(&rolld) == 1);
    for h in held {
        let answer = h.join().expect("thread");
        assert!(matches!(&answer, Ok((200, _))), "{answer:?}");
    }
    rolld.wait_log("pause timed out", 1);
    assert!(rolld.status_json()["paused_for_s"].is_null());
}

#[test]
fn a_roll_during_a_pause_gets_the_held_requests_on_resume() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 5s\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let (code, _, stderr) = rolld.control("pause", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let held = send_all(fixture.listen, 3, "/?n=");
    wait_until("3 requests held", SOON, || held_now(&rolld) == 3);
    let (code, stdout, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "a roll during a pause: {stdout}{stderr}");
    assert_eq!(held_now(&rolld), 3, "still held after the roll");
    let (code, _, stderr) = rolld.control("resume", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let new_port = fixture.sets[1][0];
    for h in held {
        let answer = h.join().expect("thread");
        assert!(
            matches!(&answer, Ok((200, body)) if body.starts_with(&format!("hello from {new_port} "))),
            "{answer:?}"
        );
    }
}

#[test]
fn beyond_max_held_requests_get_503_at_once() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 5s\n  max_held: 2\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let (code, _, stderr) = rolld.control("pause", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let held = send_all(fixture.listen, 2, "/?n=");
    wait_until("2 requests held", SOON, || held_now(&rolld) == 2);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let asked = Instant::now();
    let (status, headers, _) = rt
        .block_on(request(&client(), "GET", fixture.listen, "/", b""))
        .expect("answered");
    assert_eq!(status, 503);
    // Held, it would wait for the pause (60 s).
    assert!(asked.elapsed() < Duration::from_secs(15), "not held");
    assert_eq!(
        headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(rolld.status_json()["held"]["refused"].as_u64(), Some(1));
    let (code, _, stderr) = rolld.control("resume", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    for h in held {
        assert!(matches!(h.join().expect("thread"), Ok((200, _))));
    }
}

#[test]
fn maintenance_answers_with_the_page_under_load_and_across_a_reload() {
    let fixture = Fixture::new(2);
    let admin = free_ports(1)[0];
    let yaml = format!("admin: 127.0.0.1:{admin}\n{}", fixture.yaml());
    let rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        std::fs::write(dir.join("down.html"), "<h1>back soon</h1>\n").expect("page");
    });
    rolld.wait_log("roll finished", 1);
    let clients = Clients::start(fixture.listen, 4, "/");
    let hello = |a: &Answer| matches!(a, Ok((200, body)) if body.starts_with("hello from"));
    let page = |a: &Answer| matches!(a, Ok((503, body)) if body == "<h1>back soon</h1>\n");
    wait_until("answers from the apps", SOON, || clients.count(hello) >= 20);
    let page_path = rolld.dir.path().join("down.html");
    let (code, stdout, stderr) =
        rolld.control("maintenance", &["on", "--page", &path_str(&page_path)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("HTML page"), "{stdout}");
    let asked = Instant::now();
    let (status, headers, body) = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(request(&client(), "GET", fixture.listen, "/x", b""))
        .expect("answered");
    assert!(asked.elapsed() < Duration::from_secs(15), "not held");
    assert_eq!(status, 503);
    assert_eq!(body, "<h1>back soon</h1>\n");
    assert!(headers["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    assert!(headers.contains_key("retry-after"));
    wait_until("the page under load", SOON, || clients.count(page) >= 20);
    // Across a roll to the other set: still the page.
    let (code, _, stderr) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        page(&get_blocking(fixture.listen, "/")),
        "maintenance survives the reload"
    );
    let (_, text, _) = rolld.control("status", &[]);
    assert!(text.contains("maintenance on"), "{text}");
    // rolld's own health check still answers.
    assert_eq!(get_blocking(admin, "/healthz").map(|a| a.0), Ok(200));
    let metrics = get_blocking(admin, "/metrics").expect("metrics").1;
    assert!(metrics.contains("rolld_maintenance 1"), "{metrics}");
    for held in [
        "rolld_requests_held 0",
        "rolld_paused 0",
        "rolld_held_requests_released_total 0",
        "rolld_held_requests_timed_out_total 0",
        "rolld_held_requests_refused_total 0",
    ] {
        assert!(metrics.contains(held), "{held}: {metrics}");
    }
    let (code, _, stderr) = rolld.control("maintenance", &["off"]);
    assert_eq!(code, Some(0), "{stderr}");
    let answer = get_blocking(fixture.listen, "/");
    assert!(
        matches!(&answer, Ok((200, body)) if fixture.sets[1].iter().any(|p| body.starts_with(&format!("hello from {p} ")))),
        "the new set answers: {answer:?}"
    );
    let before = clients.count(hello);
    wait_until("answers from the apps again", SOON, || {
        clients.count(hello) >= before + 20
    });
    let answers = clients.finish();
    let odd: Vec<_> = answers.iter().filter(|a| !hello(a) && !page(a)).collect();
    assert!(
        odd.is_empty(),
        "neither an app's answer nor the page: {odd:?}"
    );
    assert!(get_blocking(admin, "/metrics")
        .expect("metrics")
        .1
        .contains("rolld_maintenance 0"));
}

#[test]
fn control_commands_refuse_bad_arguments() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let (code, _, stderr) = rolld.control("pause", &["--timeout", "2h"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--timeout"), "{stderr}");
    let (code, _, stderr) = rolld.control("maintenance", &["off", "--page", "x.html"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) =
        rolld.control("maintenance", &["on", "--page", "/nonexistent/page.html"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read the page"), "{stderr}");
    let (code, stdout, _) = rolld.control("resume", &[]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("no pause was on"), "{stdout}");
    assert_eq!(get_blocking(fixture.listen, "/").map(|a| a.0), Ok(200));
}

/// rolld's resident memory, from /proc.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_flood_beyond_max_held_is_refused_and_memory_stays_bounded() {
    use std::io::{Read, Write};
    let fixture = Fixture::new(1);
    let rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 30s\n  max_held: 200\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let (code, _, stderr) = rolld.control("pause", &["--timeout", "5m"]);
    assert_eq!(code, Some(0), "{stderr}");
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let idle = rss_kib(rolld.pid());
    let held: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut s =
                std::net::TcpStream::connect(("127.0.0.1", fixture.listen)).expect("connect");
            s.write_all(request).expect("send");
            s
        })
        .collect();
    wait_until("200 requests held", SOON, || held_now(&rolld) == 200);
    let before = rss_kib(rolld.pid());
    let flood = 3000;
    let started = Instant::now();
    for _ in 0..flood {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", fixture.listen)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(request).expect("send");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 503"),
            "refused at once: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let took = started.elapsed();
    let after = rss_kib(rolld.pid());
    let status = rolld.status_json();
    assert_eq!(status["held"]["now"].as_u64(), Some(200));
    assert_eq!(status["held"]["refused"].as_u64(), Some(flood));
    eprintln!(
        "memory: {idle} KiB idle, {before} KiB with 200 held, {after} KiB after {flood} more refused in {took:?} ({:.2} ms each)",
        took.as_secs_f64() * 1000.0 / flood as f64
    );
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    let (code, _, stderr) = rolld.control("resume", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    for mut s in held {
        s.set_read_timeout(Some(SOON)).expect("timeout");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "released: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[test]
fn shutting_down_during_a_pause_releases_the_held_requests_first() {
    let fixture = Fixture::new(1);
    let mut rolld = Rolld::spawn(
        &with_proxy(&fixture, "  hold_timeout: 1s\n"),
        fixture.listen,
    );
    rolld.wait_log("roll finished", 1);
    let (code, _, stderr) = rolld.control("pause", &["--timeout", "5m"]);
    assert_eq!(code, Some(0), "{stderr}");
    let held = send_all(fixture.listen, 2, "/?n=");
    wait_until("2 requests held", SOON, || held_now(&rolld) == 2);
    let stopping = Instant::now();
    rolld.signal(Signal::SIGTERM);
    for h in held {
        let answer = h.join().expect("thread");
        assert!(
            stopping.elapsed() < Duration::from_secs(20),
            "answered {:?} after SIGTERM: the pause kept them",
            stopping.elapsed()
        );
        assert!(
            matches!(&answer, Ok((200, body)) if body.starts_with("hello from")),
            "{answer:?}"
        );
    }
    assert_eq!(rolld.wait_exit(SOON).code(), Some(0));
}
