//! nginx mode with a real nginx: rolld renders the upstream file, reloads nginx, drains
//! by watching the old set's connections, and undoes a failed roll.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

/// The nginx binary. Without one the test fails, telling how to install nginx, unless
/// `ROLLD_SKIP_NGINX=1` asks to skip it (then it says so loudly); under CI a missing
/// nginx always fails: `.ci/run` installs it.
pub fn nginx() -> Option<PathBuf> {
    let found = [
        "/usr/sbin/nginx",
        "/usr/bin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/bin/nginx",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        let skip = std::env::var("ROLLD_SKIP_NGINX").as_deref() == Ok("1");
        assert!(
            skip && !ci,
            "nginx is not installed: `apt-get install -y nginx`, or set ROLLD_SKIP_NGINX=1 to skip the nginx tests{}",
            if ci { " (not under CI: .ci/run must install it)" } else { "" }
        );
        eprintln!("SKIPPED (ROLLD_SKIP_NGINX=1): nginx is not installed; this test did not run");
    }
    found
}

const TEMPLATE: &str = "# generation {{ generation }}\nupstream app {\n{% for port in ports %}    server 127.0.0.1:{{ port }};\n{% endfor %}    keepalive 16;\n}\n# end\n";

/// nginx and rolld in nginx mode, in one temporary folder.
struct NginxSetup {
    rolld: Rolld,
    nginx: PathBuf,
    port: u16,
    _reloads: NginxReloads,
}

/// Tests that reload an nginx run side by side, except the one that tells a slow
/// reload by watching every nginx on the machine (see `nginx_reload` in rolld): it
/// runs alone.
static RELOADS: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub enum NginxReloads {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl NginxReloads {
    pub fn shared() -> Self {
        NginxReloads::Shared(RELOADS.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn alone() -> Self {
        NginxReloads::Alone(RELOADS.write().unwrap_or_else(|e| e.into_inner()))
    }
}

impl NginxSetup {
    fn start(nginx: PathBuf, extra_actions: &str) -> NginxSetup {
        let reload = Self::reload(&nginx);
        Self::start_with(
            nginx,
            extra_actions,
            TEMPLATE,
            &reload,
            NginxReloads::shared(),
        )
    }

    /// Reloads nginx, or starts it the first time.
    fn reload(nginx: &Path) -> String {
        let nginx = nginx.display();
        format!("{nginx} -p \"$(pwd)/\" -c nginx.conf -s reload 2>/dev/null || {nginx} -p \"$(pwd)/\" -c nginx.conf")
    }

    fn start_with(
        nginx: PathBuf,
        extra_actions: &str,
        template: &str,
        reload: &str,
        reloads: NginxReloads,
    ) -> NginxSetup {
        let fixture = Fixture::new(2);
        // The fixture's proxy port is free and unused in nginx mode: nginx takes it.
        let port = fixture.listen;
        let yaml = Self::yaml(&fixture, reload, extra_actions);
        let rolld = Rolld::spawn_with(&yaml, 0, |dir| {
            std::fs::write(dir.join("upstream.conf.templ"), template).expect("template");
            std::fs::write(dir.join("nginx.conf"), nginx_conf(port)).expect("nginx.conf");
        });
        rolld.wait_log("roll finished", 1);
        let setup = NginxSetup {
            rolld,
            nginx,
            port,
            _reloads: reloads,
        };
        wait_until("nginx serves", SOON, || {
            get_blocking(setup.port, "/").is_ok_and(|(s, _)| s == 200)
        });
        setup
    }

    fn yaml(fixture: &Fixture, reload: &str, extra_actions: &str) -> String {
        let sets: String = fixture
            .sets
            .iter()
            .map(|s| format!("    - numprocs: {s:?}\n"))
            .collect();
        format!(
            "app-servers:\n  cmd: '{BACKEND} {{port}}'\n  workset:\n{sets}  health: {{path: /health, interval: 20ms}}\n  smoke_test:\n    - check_all_http_ports: numprocs\n  after_start:\n    - replace_file: [numprocs, 'upstream.conf.templ', 'upstream.conf']\n    - run_proc: '{reload}'\n{extra_actions}  drain_timeout: 20s\n  stop_timeout: 5s\n"
        )
    }

    fn dir(&self) -> &Path {
        self.rolld.dir.path()
    }

    fn upstream_conf(&self) -> String {
        std::fs::read_to_string(self.dir().join("upstream.conf")).unwrap_or_default()
    }

    /// The pid answering through nginx.
    fn served_pid(&self) -> i32 {
        get_blocking(self.port, "/pid")
            .expect("nginx answers")
            .1
            .parse()
            .expect("a pid")
    }
}

impl Drop for NginxSetup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir().join("nginx-error.log")).unwrap_or_default();
            eprintln!("--- nginx error log ---\n{log}");
        }
        let _ = Command::new(&self.nginx)
            .arg("-p")
            .arg(format!("{}/", self.dir().display()))
            .args(["-c", "nginx.conf", "-s", "stop"])
            .output();
    }
}

fn nginx_conf(port: u16) -> String {
    let user = if nix::unistd::getuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    format!(
        "{user}worker_processes 1;\npid nginx.pid;\nerror_log nginx-error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n    client_body_temp_path tmp-body;\n    proxy_temp_path tmp-proxy;\n    fastcgi_temp_path tmp-fastcgi;\n    uwsgi_temp_path tmp-uwsgi;\n    scgi_temp_path tmp-scgi;\n    include upstream.conf;\n    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n            proxy_pass http://app;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_next_upstream error timeout;\n        }}\n    }}\n}}\n"
    )
}

#[test]
fn five_rolls_behind_nginx_under_load_lose_no_request() {
    let Some(nginx) = nginx() else { return };
    let setup = NginxSetup::start(nginx, "");
    let load = Load::start(setup.port, 32);
    load.wait_for_more(50);
    for roll in 1..=5u64 {
        let old = setup.rolld.pids_of(roll);
        setup.rolld.signal(Signal::SIGHUP);
        setup.rolld.wait_log("roll finished", roll as usize + 1);
        for pid in &old {
            assert!(!alive(*pid), "old process {pid} still runs");
        }
        let new = setup.rolld.pids_of(roll + 1);
        assert!(setup
            .upstream_conf()
            .contains(&format!("# generation {}", roll + 1)));
        wait_until("nginx serves the new set", SOON, || {
            new.contains(&setup.served_pid())
        });
        load.wait_for_more(30);
    }
    let (_, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // Every old set was stopped only after its connections were gone.
    let log = setup.rolld.log();
    assert_eq!(
        log.matches("no connection to the old set is open").count(),
        5,
        "{log}"
    );
    assert!(
        !log.contains("connection(s) to the old set open; they will be cut"),
        "{log}"
    );
}

/// `nginx -s reload` returns before nginx has switched: until its old workers are told
/// to stop they send new requests to the old set. Here the reload comes 2 s after the
/// command returned (as a slow `systemctl reload` does) and nginx keeps no idle
/// connections to the apps, so the old set looks drained long before nginx switches;
/// rolld waits for nginx's old workers to stop accepting before it drains.
#[test]
fn a_slow_nginx_reload_is_waited_for_before_the_old_set_stops() {
    let Some(nginx) = nginx() else { return };
    let no_keepalive =
        "upstream app {\n{% for port in ports %}    server 127.0.0.1:{{ port }};\n{% endfor %}}\n";
    let n = nginx.display();
    let dir = "-p \"$(pwd)/\" -c nginx.conf";
    let reload = format!(
        "if [ -s nginx.pid ] && kill -0 $(cat nginx.pid) 2>/dev/null; then setsid sh -c \"sleep 2; {n} {dir} -s reload\" >/dev/null 2>&1 & else {n} {dir}; fi"
    );
    let setup = NginxSetup::start_with(nginx, "", no_keepalive, &reload, NginxReloads::alone());
    // Sparse traffic: a request every 50 ms, so the old set is often without connections.
    let stop = Arc::new(AtomicBool::new(false));
    let sparse = {
        let (stop, port) = (stop.clone(), setup.port);
        std::thread::spawn(move || {
            let (mut ok, mut errors) = (0u32, Vec::new());
            let end = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match get_blocking(port, "/") {
                    Ok((200, _)) => ok += 1,
                    other => errors.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, errors)
        })
    };
    for roll in 1..=2u64 {
        setup.rolld.signal(Signal::SIGHUP);
        setup.rolld.wait_log("roll finished", roll as usize + 1);
        // The sparse client goes on through the gap until nginx has switched.
        let new = setup.rolld.pids_of(roll + 1);
        wait_until("nginx serves the new set", SOON, || {
            get_blocking(setup.port, "/pid")
                .ok()
                .and_then(|(_, pid)| pid.parse().ok())
                .is_some_and(|pid| new.contains(&pid))
        });
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = sparse.join().expect("the sparse client");
    assert!(ok > 20, "only {ok} requests were answered");
    assert_none_failed(ok as usize, &errors);
    assert_eq!(
        setup
            .rolld
            .count_log("waiting for nginx's reload: its old workers still accept clients"),
        2,
        "{}",
        setup.rolld.log()
    );
}

#[test]
fn a_template_with_an_error_rolls_back_cleanly() {
    let Some(nginx) = nginx() else { return };
    let setup = NginxSetup::start(nginx, "");
    let old = setup.rolld.pids_of(1);
    let before = setup.upstream_conf();
    std::fs::write(
        setup.dir().join("upstream.conf.templ"),
        "upstream app {\n{% for port in ports %}\n  server {{ prot }};\n{% endfor %}\n}\n",
    )
    .expect("template");
    setup.rolld.signal(Signal::SIGHUP);
    setup.rolld.wait_log("roll failed, rolled back", 1);
    let log = setup.rolld.log();
    assert!(
        log.contains("upstream.conf.templ line 3"),
        "the error names file and line: {log}"
    );
    assert_eq!(
        setup.upstream_conf(),
        before,
        "the rendered file is untouched"
    );
    for pid in setup.rolld.pids_of(2) {
        wait_until("new process stopped", SOON, || !alive(pid));
    }
    for pid in &old {
        assert!(alive(*pid));
    }
    assert!(old.contains(&setup.served_pid()));
}

#[test]
fn a_failing_run_proc_rolls_back_and_nginx_still_serves_the_old_set() {
    let Some(nginx) = nginx() else { return };
    let fixture_marker = "    - run_proc: 'test ! -e fail-now'\n";
    let setup = NginxSetup::start(nginx, fixture_marker);
    let old = setup.rolld.pids_of(1);
    let before = setup.upstream_conf();
    std::fs::write(setup.dir().join("fail-now"), "").expect("marker");
    setup.rolld.signal(Signal::SIGHUP);
    setup.rolld.wait_log("roll failed, rolled back", 1);
    assert!(
        setup
            .rolld
            .log()
            .contains("run_proc `test ! -e fail-now` failed (exit code 1)"),
        "{}",
        setup.rolld.log()
    );
    assert_eq!(
        setup.upstream_conf(),
        before,
        "the previous file is restored"
    );
    for pid in setup.rolld.pids_of(2) {
        wait_until("new process stopped", SOON, || !alive(pid));
    }
    // nginx was reloaded with the restored file and serves the old set.
    for _ in 0..10 {
        assert!(old.contains(&setup.served_pid()));
    }
}

#[test]
fn the_rendered_file_is_never_seen_half_written() {
    let Some(nginx) = nginx() else { return };
    let setup = NginxSetup::start(nginx, "");
    let path = setup.dir().join("upstream.conf");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let text = std::fs::read_to_string(&path).expect("the file always exists");
                assert!(
                    text.starts_with("# generation") && text.ends_with("# end\n"),
                    "half-written: {text:?}"
                );
                reads += 1;
            }
            reads
        })
    };
    for roll in 1..=3 {
        setup.rolld.signal(Signal::SIGHUP);
        setup.rolld.wait_log("roll finished", roll + 1);
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 10, "the reader ran ({reads} reads)");
}
