//! The built-in proxy as rolld runs it: upgrades across rolls, the access log, the
//! `proxy:` section, and dropping root after binding.

use std::io::{Read, Write};
use std::net::TcpStream;

use nix::sys::signal::Signal;

use crate::support::*;

#[test]
fn an_upgraded_connection_keeps_working_across_a_roll_and_holds_its_old_process() {
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1)[0];
    let mut ws = TcpStream::connect(("127.0.0.1", rolld.listen)).expect("connect");
    ws.set_read_timeout(Some(SOON)).expect("timeout");
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let echo = |ws: &mut TcpStream, msg: &[u8]| {
        ws.write_all(msg).expect("send");
        let mut back = vec![0u8; msg.len()];
        ws.read_exact(&mut back).expect("echo");
        assert_eq!(back, msg);
    };
    echo(&mut ws, b"before the roll");
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("swapped: new set serving", 2);
    rolld.wait_log("draining 1 request(s) in flight", 1);
    echo(&mut ws, b"during the roll");
    assert!(
        alive(old),
        "the old process stays while the upgraded connection is open"
    );
    assert_eq!(
        rolld.count_log("roll finished"),
        1,
        "the roll waits for the socket"
    );
    drop(ws);
    rolld.wait_log("roll finished", 2);
    wait_until("old process stopped", SOON, || !alive(old));
}

#[test]
fn the_access_log_has_one_line_per_request() {
    let fixture = Fixture::new(1);
    let yaml = format!("proxy:\n  access_log: true\n{}", fixture.yaml());
    let rolld = Rolld::spawn(&yaml, fixture.listen);
    rolld.wait_log("roll finished", 1);
    for _ in 0..3 {
        assert_eq!(
            get_blocking(rolld.listen, "/bytes?n=10").expect("served").0,
            200
        );
    }
    rolld.wait_log("rolld::access", 3);
    let line = rolld
        .log()
        .lines()
        .find(|l| l.contains("rolld::access"))
        .map(String::from)
        .expect("a line");
    for field in [
        "client=127.0.0.1:",
        "method=GET",
        "path=/bytes?n=10",
        "status=200",
        "bytes=10",
        "duration_ms=",
        "upstream=127.0.0.1:",
        "retries=0",
    ] {
        assert!(line.contains(field), "`{field}` missing from: {line}");
    }
}

#[test]
fn the_proxy_section_is_validated() {
    let fixture = Fixture::new(1);
    let check = |proxy: &str| {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("rolld.yml");
        std::fs::write(&path, format!("proxy:\n{proxy}\n{}", fixture.yaml())).expect("write");
        let out = std::process::Command::new(ROLLD)
            .arg("check")
            .arg(&path)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check("  max_body_size: 10m\n  client_header_timeout: 5s\n  trusted_proxies: [10.0.0.0/8, 127.0.0.1]");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("body 10485760 bytes")
            && out.contains("client header 5s")
            && out.contains("10.0.0.0/8, 127.0.0.1/32"),
        "{out}"
    );
    for (bad, wanted) in [
        ("  max_body_size: lots", "max_body_size"),
        ("  colour: red", "colour"),
        ("  trusted_proxies: [somewhere]", "trusted_proxies"),
        ("  response_timeout: 0s", "response_timeout"),
    ] {
        let (code, out) = check(bad);
        assert_eq!(code, Some(2), "{bad}: {out}");
        assert!(
            out.contains(wanted) && out.contains("line 2"),
            "{bad}: {out}"
        );
    }
}

#[test]
fn rolld_and_its_processes_run_as_the_configured_user_after_binding() {
    if !root_or_skip("dropping privileges") {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("user nobody exists");
    // What nobody runs lies where nobody can read it, wherever the checkout is.
    let (_bin, backend) = world_readable_copy(BACKEND);
    let mut fixture = Fixture::new(1).cmd(format!("{} {{port}}", backend.display()));
    // A port only root can bind: serving on it proves the bind came before the switch.
    fixture.listen = free_privileged_port();
    let yaml = format!("user: nobody\n{}", fixture.yaml());
    // nobody must be able to read the config (rolls re-read it) and write logs here.
    let rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    });
    rolld.wait_log("roll finished", 1);
    let uid_of = |pid: i32| -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("uid")
    };
    assert_eq!(uid_of(rolld.pid()), nobody.uid.as_raw(), "rolld itself");
    let app = rolld.pids_of(1)[0];
    assert_eq!(uid_of(app), nobody.uid.as_raw(), "its app process");
    assert_eq!(get_blocking(rolld.listen, "/").expect("served").0, 200);
    rolld.signal(Signal::SIGHUP);
    rolld.wait_log("roll finished", 2);
}

#[test]
fn a_websocket_echo_keeps_working_across_a_roll_and_its_old_process_stays_until_it_closes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let old = rolld.pids_of(1)[0];
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", rolld.listen))
            .await
            .expect("connect");
        let url = format!("ws://127.0.0.1:{}/ws", rolld.listen);
        let (mut ws, response) = tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("WebSocket handshake through rolld");
        assert_eq!(response.status(), 101);
        ws.send(Message::text("before the roll"))
            .await
            .expect("send");
        assert_eq!(
            ws.next().await.expect("echo").expect("frame"),
            Message::text("before the roll")
        );
        rolld.signal(Signal::SIGHUP);
        rolld.wait_log("draining 1 request(s) in flight", 1);
        ws.send(Message::text("during the roll"))
            .await
            .expect("send");
        assert_eq!(
            ws.next().await.expect("echo").expect("frame"),
            Message::text("during the roll")
        );
        assert!(
            alive(old),
            "the old process serves its WebSocket until it closes"
        );
        assert_eq!(rolld.count_log("roll finished"), 1);
        ws.close(None).await.expect("close");
    });
    rolld.wait_log("roll finished", 2);
    wait_until("old process stopped", SOON, || !alive(old));
}

/// `curl --http2` over plain HTTP offers an upgrade to HTTP/2 (`Upgrade: h2c`). It gets
/// its answer over HTTP/1.1, and the app never sees the offer (the example backend would
/// take any upgrade and echo bytes back instead of answering).
#[test]
fn curl_offering_an_upgrade_to_http2_gets_its_answer_over_http1() {
    if !tool("curl") {
        return;
    }
    let fixture = Fixture::new(1);
    let rolld = Rolld::start(&fixture);
    let out = output_within(
        std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "--http2",
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .arg(format!("http://127.0.0.1:{}/", rolld.listen)),
        std::time::Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("hello from "), "{stdout}\n{stderr}");
    assert!(stdout.ends_with("\n1.1 200"), "{stdout}\n{stderr}");
}
