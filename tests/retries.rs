//! App processes dying under requests: what can be sent again is, to another process;
//! what cannot (a POST without `Idempotency-Key`) gets 502 and runs at most once; the
//! retry budget holds when every process fails. The example backend records what it
//! executed in a file (`--effects`) that outlives its processes, so a test can count
//! each request's effects across kills.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// A fixture whose backends record their effects in `effects`.
fn fixture(per_set: usize, effects: &std::path::Path) -> Fixture {
    Fixture::new(per_set).cmd(format!(
        "{BACKEND} {{port}} --effects {}",
        effects.display()
    ))
}

/// What the backends executed: one line per execution.
fn executed(effects: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(effects.join("effects"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// A client connection to rolld: HTTP/1.1 keep-alive, or one HTTP/2 (h2c) connection
/// whose streams run side by side.
#[derive(Clone)]
enum Conn {
    H1(Box<HttpClient>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn h2(port: u16) -> Conn {
        Conn::H2(h2c(port).await)
    }

    async fn send(
        &mut self,
        method: &str,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}{path}"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let answer = async {
            let res = match self {
                Conn::H1(client) => client.request(req).await.map_err(|e| format!("{e:?}"))?,
                Conn::H2(send) => send.send_request(req).await.map_err(|e| format!("{e:?}"))?,
            };
            let status = res.status().as_u16();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e:?}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(SOON, answer)
            .await
            .map_err(|_| format!("no answer within {SOON:?}"))?
    }
}

#[test]
fn a_post_whose_process_dies_after_receiving_it_is_resent_only_with_an_idempotency_key() {
    let effects = tempfile::tempdir().expect("temp dir");
    let fixture = fixture(2, effects.path());
    let yaml = format!("proxy:\n  access_log: true\n{}", fixture.yaml());
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut conn = Conn::H1(Box::new(client()));
    let port = fixture.listen;

    // With a key: the process that receives it first dies; the next one answers.
    let (status, body) = rt
        .block_on(conn.send(
            "POST",
            port,
            "/effect?id=1&die=1",
            &[("idempotency-key", "order-1")],
            Bytes::from_static(b"pay 10"),
        ))
        .expect("answered");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body.starts_with(b"done 1 from "), "{body:?}");
    assert!(
        effects.path().join("died-1").exists(),
        "a process died under it"
    );
    assert_eq!(executed(effects.path()), vec!["1"], "executed once");
    rolld.wait_log("process exited unexpectedly", 1);

    // Without: 502, and the log says why it was not resent; it ran nowhere.
    let (status, _) = rt
        .block_on(conn.send(
            "POST",
            port,
            "/effect?id=2&die=1",
            &[],
            Bytes::from_static(b"pay 20"),
        ))
        .expect("answered");
    assert_eq!(status, 502);
    assert!(
        effects.path().join("died-2").exists(),
        "a process died under it"
    );
    assert_eq!(executed(effects.path()), vec!["1"], "2 never executed");
    rolld.wait_log(
        "not resent: its method is not idempotent and it has no Idempotency-Key",
        1,
    );
    let line = |id: u32| {
        rolld
            .log()
            .lines()
            .find(|l| l.contains("rolld::access") && l.contains(&format!("id={id}&die=1")))
            .map(String::from)
    };
    wait_until("the access log lines", SOON, || line(2).is_some());
    let (first, second) = (line(1).unwrap_or_default(), line(2).unwrap_or_default());
    assert!(
        first.contains("status=200") && first.contains("retries=1"),
        "{first}"
    );
    assert!(
        second.contains("status=502") && second.contains("retries=0"),
        "{second}"
    );
    let status = rolld.status_json();
    assert_eq!(status["retries"]["by_reason"]["no_answer"], 1, "{status}");
    assert_eq!(
        status["retries"]["bad_gateway"]["not_idempotent"], 1,
        "{status}"
    );
}

#[test]
fn a_get_whose_only_process_dies_under_it_waits_for_the_restarted_process() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1)[0];
    let port = rolld.listen;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let slow = rt.spawn(async move { get(&client(), port, "/?delay=1000").await });
    rolld.wait_in_flight(1);
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("kill the only process");
    let answer = rt.block_on(slow).expect("request task");
    let Ok((200, body)) = &answer else {
        panic!("the restarted process answers: {answer:?}");
    };
    assert!(body.starts_with("hello from "), "{body}");
    assert!(
        !body.contains(&format!("(pid {old})")),
        "a new process answered: {body}"
    );
    rolld.wait_log("restarted process is ready", 1);
    let status = rolld.status_json();
    // Once, or twice when a connection reached the dying process's socket before it
    // closed; never more than `retries`.
    let resent = status["retries"]["by_reason"]["no_answer"].as_u64();
    assert!(matches!(resent, Some(1 | 2)), "{status}");
}

#[test]
fn with_every_process_failing_retries_stay_within_the_budget_and_errors_come_back_at_once() {
    let effects = tempfile::tempdir().expect("temp dir");
    let fixture = fixture(2, effects.path());
    let admin = free_ports(1)[0];
    let yaml = format!(
        "admin: 127.0.0.1:{admin}\nproxy:\n  retry_budget: 20%\n  retry_budget_floor: 0\n{}",
        fixture.yaml()
    );
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut conn = Conn::H1(Box::new(client()));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let asked = Instant::now();
        let (status, _) = rt
            .block_on(conn.send("GET", fixture.listen, "/vanish", &[], Bytes::new()))
            .expect("answered");
        slowest = slowest.max(asked.elapsed());
        assert_eq!(status, 502);
    }
    // The budget looks back 10 s: the bound below holds for requests within that.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let at_apps = executed(effects.path())
        .iter()
        .filter(|l| *l == "vanish")
        .count();
    let resent = at_apps - 100;
    assert!(
        (1..=20).contains(&resent),
        "retries counted at the apps: {resent}; 20% of 100 requests at most"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "errors come back at once: slowest {slowest:?}"
    );
    let status = rolld.status_json();
    let refused = status["retries"]["refused_by_budget"]
        .as_u64()
        .expect("a count");
    assert!(refused >= 70, "{status}");
    assert_eq!(
        status["retries"]["bad_gateway"]["budget"], refused,
        "{status}"
    );
    assert_eq!(
        status["retries"]["by_reason"]["no_answer"], resent as u64,
        "{status}"
    );
    let metrics = get_blocking(admin, "/metrics").expect("metrics").1;
    for line in [
        format!("rolld_retries_total{{reason=\"no_answer\"}} {resent}"),
        "rolld_retries_total{reason=\"timeout\"} 0".to_string(),
        format!("rolld_retries_refused_by_budget_total {refused}"),
        format!("rolld_bad_gateway_total{{reason=\"budget\"}} {refused}"),
        format!(
            "rolld_bad_gateway_total{{reason=\"retries_spent\"}} {}",
            100 - refused
        ),
    ] {
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
    let (_, text, _) = rolld.control("status", &[]);
    assert!(
        text.contains(&format!("{refused} refused by the budget")),
        "{text}"
    );
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    /// GETs and PUTs answered right, by protocol.
    ok: HashMap<&'static str, u64>,
    /// Anything else of a GET or PUT, and a POST answered neither right nor 502.
    failures: Vec<String>,
    /// Each POST's id and status (200 or 502).
    posts: Vec<(u64, u16)>,
}

/// One client of the chaos load: GETs, PUTs with bodies of up to 20 KB (echoed back)
/// and POSTs without `Idempotency-Key` that record an effect, every answer checked.
async fn chaos_client(
    mut conn: Conn,
    id: u64,
    port: u16,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let protocol = match conn {
        Conn::H1(_) => "http/1.1",
        Conn::H2(_) => "h2c",
    };
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(90) && n < 50_000
    {
        n += 1;
        let request = id * 1_000_000 + n;
        let delay = n * 7 % 25;
        match n % 3 {
            0 => {
                let answer = conn
                    .send("GET", port, &format!("/?delay={delay}"), &[], Bytes::new())
                    .await;
                match answer {
                    Ok((200, body)) if body.starts_with(b"hello from ") => {
                        *tally.lock().expect("lock").ok.entry(protocol).or_default() += 1
                    }
                    other => tally
                        .lock()
                        .expect("lock")
                        .failures
                        .push(format!("{protocol} GET {request}: {other:?}")),
                }
            }
            1 => {
                let len = 100 + (request * 7919 % 20_000) as usize;
                let body: Bytes = (0..len)
                    .map(|i| b'a' + ((i as u64 + request) % 26) as u8)
                    .collect::<Vec<u8>>()
                    .into();
                // `/streamed/` is in `unbuffered_paths`: its body goes to the app as it
                // arrives, and what is resent is what was kept on the way; `/item/` is
                // buffered first, and resent from its buffer.
                let kind = if n % 2 == 0 { "streamed" } else { "item" };
                let answer = conn
                    .send(
                        "PUT",
                        port,
                        &format!("/{kind}/{request}?delay={delay}"),
                        &[],
                        body.clone(),
                    )
                    .await;
                match answer {
                    Ok((200, echoed)) if echoed == body => {
                        *tally.lock().expect("lock").ok.entry(protocol).or_default() += 1
                    }
                    Ok((status, echoed)) => tally.lock().expect("lock").failures.push(format!(
                        "{protocol} PUT {request}: {status}, {} bytes, not the {len} sent",
                        echoed.len()
                    )),
                    Err(e) => tally
                        .lock()
                        .expect("lock")
                        .failures
                        .push(format!("{protocol} PUT {request}: {e}")),
                }
            }
            _ => {
                let answer = conn
                    .send(
                        "POST",
                        port,
                        &format!("/effect?id={request}&delay={delay}"),
                        &[],
                        Bytes::from(format!("pay {request}")),
                    )
                    .await;
                let done = format!("done {request} from ");
                match answer {
                    Ok((200, body)) if body.starts_with(done.as_bytes()) => {
                        tally.lock().expect("lock").posts.push((request, 200))
                    }
                    Ok((502, _)) => tally.lock().expect("lock").posts.push((request, 502)),
                    other => tally
                        .lock()
                        .expect("lock")
                        .failures
                        .push(format!("{protocol} POST {request}: {other:?}")),
                }
            }
        }
    }
}

/// The pid of a running process of the serving set whose upstream is available, when
/// at least two are (so that one always serves).
fn victim(rolld: &Rolld, pick: usize) -> Option<i32> {
    let status = rolld.status_json();
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
        .filter(|&pid| alive(pid))
        .collect();
    (pids.len() >= 2).then(|| pids[pick % pids.len()])
}

#[test]
fn app_processes_killed_at_random_during_rolls_lose_no_request_that_can_be_resent() {
    use rand::Rng;
    let effects = tempfile::tempdir().expect("temp dir");
    let fixture = fixture(4, effects.path());
    let yaml = format!(
        "proxy:\n  unbuffered_paths: [/streamed/]\n{}",
        fixture.yaml()
    );
    let mut rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    let port = fixture.listen;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut clients = Vec::new();
    for id in 0..8 {
        let conn = Conn::H1(Box::new(client()));
        clients.push(rt.spawn(chaos_client(conn, id, port, stop.clone(), tally.clone())));
    }
    // Two HTTP/2 connections of four concurrent streams each.
    for c in 0..2 {
        let conn = rt.block_on(Conn::h2(port));
        for s in 0..4 {
            let id = 100 + c * 10 + s;
            clients.push(rt.spawn(chaos_client(
                conn.clone(),
                id,
                port,
                stop.clone(),
                tally.clone(),
            )));
        }
    }

    // The chaos: a SIGKILL every 150-400 ms, a roll every 3 s, for 25 s.
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    let (mut kills, mut rolls) = (0, 0);
    let mut next_roll = started + Duration::from_secs(3);
    while started.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..400)));
        if let Some(pid) = victim(&rolld, rng.gen()) {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        if Instant::now() >= next_roll {
            rolld.signal(Signal::SIGHUP);
            rolls += 1;
            next_roll += Duration::from_secs(3);
        }
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for client in clients {
            client.await.expect("load client");
        }
    });
    let status = rolld.status_json();
    let tally = std::mem::take(&mut *tally.lock().expect("lock"));
    let finished = rolld.count_log("roll finished");
    eprintln!(
        "chaos: {kills} kills, {rolls} rolls asked ({finished} finished incl. start), ok {:?}, {} POSTs ({} got 502), retries {}",
        tally.ok,
        tally.posts.len(),
        tally.posts.iter().filter(|p| p.1 == 502).count(),
        status["retries"]
    );
    assert!(
        tally.failures.is_empty(),
        "{} failed: {:?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(20)]
    );
    assert!(kills >= 10, "{kills} kills");
    assert!(finished >= 3, "at least two rolls finished: {finished}");
    assert!(
        tally.ok.get("http/1.1").copied().unwrap_or(0) >= 300,
        "{:?}",
        tally.ok
    );
    assert!(
        tally.ok.get("h2c").copied().unwrap_or(0) >= 300,
        "{:?}",
        tally.ok
    );
    assert!(
        status["retries"]["by_reason"]["no_answer"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "requests whose process died under them were resent: {status}"
    );

    // POSTs: 200 executed exactly once, 502 at most once, none twice.
    let mut times: HashMap<u64, usize> = HashMap::new();
    for line in executed(effects.path()) {
        let id = line.parse::<u64>().expect("an id per line");
        *times.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "executed more than once: {twice:?}");
    for (id, status) in &tally.posts {
        if *status == 200 {
            assert_eq!(times.get(id), Some(&1), "POST {id} answered 200");
        }
    }
    // Every 502 was a POST, and said it was not resent because it is one.
    let refused = tally.posts.iter().filter(|p| p.1 == 502).count() as u64;
    let bad_gateways: u64 = status["retries"]["bad_gateway"]
        .as_object()
        .expect("502s by reason")
        .values()
        .filter_map(|n| n.as_u64())
        .sum();
    assert_eq!(bad_gateways, refused, "{status}");
    assert_eq!(
        status["retries"]["bad_gateway"]["not_idempotent"], refused,
        "{status}"
    );
    rolld.signal(Signal::SIGTERM);
    rolld.wait_exit(SOON);
}
