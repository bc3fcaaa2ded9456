//! Behaviour that only an exact test tells apart from a near miss: each test here fails
//! for a wrong line that the broader tests let through (found by mutation testing).

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// An app whose process group holds a worker that records the SIGTERM it gets, then
/// exits: the stop signal must reach the whole group, not only the leader.
fn recording_worker_cmd(dir: &std::path::Path) -> String {
    let script = dir.join("app.sh");
    fs::write(
        &script,
        format!(
            "worker() {{ trap 'echo term >> \"{dir}/worker-$1\"; exit 0' TERM; while :; do sleep 0.05; done; }}\nworker \"$1\" &\nexec {BACKEND} \"$1\"\n",
            dir = dir.display()
        ),
    )
    .expect("app script");
    format!("sh {} {{port}}", script.display())
}

#[test]
fn a_roll_stops_an_old_forking_app_with_sigterm_to_its_whole_group() {
    let marks = tempfile::tempdir().expect("temp dir");
    let fixture = Fixture::new(1).cmd(recording_worker_cmd(marks.path()));
    let rolld = Rolld::start(&fixture);
    let old_port = fixture.sets[0][0];
    let started = Instant::now();
    let (code, out, err) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    // stop_timeout is 5 s: a worker the signal missed would be SIGKILLed after it.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the roll took {:?}",
        started.elapsed()
    );
    assert_eq!(
        fs::read_to_string(marks.path().join(format!("worker-{old_port}"))).ok(),
        Some("term\n".to_string()),
        "the old set's worker got SIGTERM"
    );
    assert!(
        !rolld.log().contains("SIGKILL"),
        "nothing needed SIGKILL: {}",
        rolld.log()
    );
}

#[test]
fn a_restarted_process_serves_through_the_proxy_again() {
    // One process: while it is down nothing else can answer, so an answer through the
    // proxy after the restart proves the proxy routes to the replacement.
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let (_, victim) = get_blocking(rolld.listen, "/pid").expect("answer");
    kill(Pid::from_raw(victim.parse().expect("pid")), Signal::SIGKILL).expect("kill the app");
    rolld.wait_log("restarted process is ready", 1);
    let replacement = rolld.all_pids().last().copied().expect("a replacement pid");
    for _ in 0..5 {
        let (status, pid) = get_blocking(rolld.listen, "/pid").expect("proxy answers");
        assert_eq!(
            (status, pid),
            (200, replacement.to_string()),
            "answered by the restarted process"
        );
    }
}

#[test]
fn a_reload_during_a_roll_waits_for_exactly_the_roll_queued_after_it() {
    // Slow starts make the first reload's roll last, so the second arrives during it.
    let fixture = Fixture::new(1).cmd(format!("{BACKEND} {{port}} --start-delay 700"));
    let rolld = Rolld::start(&fixture);
    let config = rolld.config_path();
    let reload = || {
        output_within(
            std::process::Command::new(ROLLD)
                .args(["reload", "-c"])
                .arg(&config),
            Duration::from_secs(120),
        )
    };
    std::thread::scope(|s| {
        let first = s.spawn(reload);
        // The first reload's roll has begun (the start-up roll logged the first line).
        rolld.wait_log("starting 1 process(es)", 2);
        let second = s.spawn(reload);
        let (first, second) = (
            first.join().expect("first reload"),
            second.join().expect("second reload"),
        );
        let (first, second) = (
            String::from_utf8_lossy(&first.stdout).into_owned(),
            String::from_utf8_lossy(&second.stdout).into_owned(),
        );
        // Start-up was generation 1; the first reload's roll serves generation 2, the
        // roll queued by the second serves generation 3, and each waits for its own.
        assert!(first.contains("generation 2 serving"), "first: {first}");
        assert!(second.contains("generation 3 serving"), "second: {second}");
    });
    assert_eq!(rolld.count_log("roll finished"), 3, "{}", rolld.log());
}

async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://x{path}"))
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn one_http2_connection_is_served_across_a_roll_and_gets_goaway_at_shutdown() {
    let fixture = Fixture::new(2);
    let mut rolld = Rolld::start(&fixture);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut send = rt.block_on(h2c(fixture.listen));
    // Requests on the one connection before, during and after a roll: all answered,
    // first by the old set, at the end by the new one.
    let new_ports: Vec<String> = fixture.sets[1].iter().map(u16::to_string).collect();
    rolld.signal(Signal::SIGHUP);
    let started = Instant::now();
    let mut answered_by_new = false;
    while started.elapsed() < SOON && !answered_by_new {
        let (status, body) = rt
            .block_on(h2_get(&mut send, "/?delay=5"))
            .expect("every request on the connection is answered");
        assert_eq!(status, 200, "{body}");
        answered_by_new = new_ports
            .iter()
            .any(|p| body.contains(&format!("from {p} ")));
    }
    assert!(answered_by_new, "the new set serves the same connection");
    rolld.wait_log("roll finished", 2);

    // A slow request in flight, then SIGTERM: the request finishes, the connection gets
    // GOAWAY (a new stream is refused at once), and rolld exits cleanly.
    let mut slow_send = send.clone();
    let slow = rt.spawn(async move { h2_get(&mut slow_send, "/?delay=1500").await });
    rolld.wait_in_flight(1);
    rolld.signal(Signal::SIGTERM);
    rolld.wait_log("front listener closed", 1);
    // The connection's task sends GOAWAY when it sees the stop, which may be a moment
    // after the listener closed: a stream the client sent before GOAWAY reached it is
    // still served. New streams are refused while the slow request is still running.
    let refused = loop {
        let attempt = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), h2_get(&mut send, "/")).await
        });
        match attempt {
            Ok(Ok((200, _))) if !slow.is_finished() => continue,
            other => break other,
        }
    };
    assert!(
        matches!(refused, Ok(Err(_))) && !slow.is_finished(),
        "a new stream after GOAWAY is refused while the slow request runs: {refused:?}"
    );
    let slow = rt.block_on(slow).expect("slow request task");
    assert!(matches!(slow, Ok((200, _))), "{slow:?}");
    assert_eq!(rolld.wait_exit(SOON).code(), Some(0));
}
