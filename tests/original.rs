//! A user of the original rolld upgrades by swapping the binary: its example layout, its
//! path rules, its smoke test and its habits work unchanged.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use crate::nginx::{nginx, NginxReloads};
use crate::support::*;

/// Copies `examples/original` into a new folder, with free ports, this build's backend
/// and `nginx` in place of the example's fixed ones. Returns the folder and nginx's port.
fn original_layout(nginx: &Path) -> (tempfile::TempDir, Vec<Vec<u16>>, u16) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/original/example");
    let root = tempfile::tempdir().expect("temp dir");
    let example = root.path().join("example");
    fs::create_dir(&example).expect("example folder");
    let ports = free_ports(9);
    let sets = vec![ports[1..5].to_vec(), ports[5..9].to_vec()];
    for name in ["rolld.yml", "nginx-tornado.conf.templ", "nginx.conf"] {
        let mut text = fs::read_to_string(source.join(name)).expect("example file");
        for (i, port) in [8001, 8002, 8003, 8004, 8501, 8502, 8503, 8504]
            .iter()
            .enumerate()
        {
            text = text.replace(&port.to_string(), &ports[1 + i].to_string());
        }
        text = text
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", ports[0]))
            .replace("../../../target/release/rolld-example-backend", BACKEND)
            .replace("'nginx ", &format!("'{} ", nginx.display()))
            .replace("|| nginx ", &format!("|| {} ", nginx.display()));
        if name == "nginx.conf" && nix::unistd::getuid().is_root() {
            text = format!("user root;\n{text}");
        }
        fs::write(example.join(name), text).expect("write example file");
    }
    (root, sets, ports[0])
}

fn stop_nginx(nginx: &Path, root: &Path) {
    let _ = Command::new(nginx)
        .arg("-p")
        .arg(format!("{}/example/", root.display()))
        .args(["-c", "nginx.conf", "-s", "stop"])
        .output();
}

/// Stops the example's nginx however the test ends.
struct NginxOf(PathBuf, PathBuf);

impl Drop for NginxOf {
    fn drop(&mut self) {
        stop_nginx(&self.0, &self.1);
    }
}

#[test]
fn the_original_example_layout_rolls_five_times_behind_nginx_under_load() {
    let Some(nginx) = nginx() else { return };
    let _reloads = NginxReloads::shared();
    let (root, sets, port) = original_layout(&nginx);
    let root_path = root.path().to_path_buf();
    // Exactly as the original's README says: `rolld example/rolld.yml`, from the root.
    let rolld = Rolld::run_in(root, Path::new("example/rolld.yml"), 0, &[], &[]);
    let _nginx = NginxOf(nginx.clone(), root_path.clone());
    rolld.wait_log("roll finished", 1);
    wait_until("nginx serves", SOON, || {
        get_blocking(port, "/").is_ok_and(|(s, _)| s == 200)
    });
    // The template was rendered where the original put it: relative to the folder
    // rolld runs in, not to the config file's folder.
    let rendered = root_path.join("example/nginx-tornado.conf");
    assert!(!root_path.join("example/example").exists());
    let load = Load::start(port, 16);
    load.wait_for_more(50);
    for roll in 1..=5u64 {
        let old = rolld.pids_of(roll);
        rolld.signal(Signal::SIGHUP);
        rolld.wait_log("roll finished", roll as usize + 1);
        for pid in &old {
            assert!(!alive(*pid), "old process {pid} still runs");
        }
        let serving = &sets[roll as usize % 2];
        let text = fs::read_to_string(&rendered).expect("the rendered upstream file");
        for p in serving {
            assert!(text.contains(&format!("server 127.0.0.1:{p};")), "{text}");
        }
        load.wait_for_more(30);
    }
    let (ok, errors) = load.finish();
    assert_none_failed(ok, &errors);
    // The app logs are under `directory` (example/), each line prefixed `PORT: `.
    let port0 = sets[0][0];
    let log = fs::read_to_string(root_path.join(format!("example/logs/tornado-{port0}.log")))
        .expect("the first process's stdout log under `directory`");
    assert!(
        log.contains(&format!("{port0}: listening on 127.0.0.1:{port0}")),
        "{log}"
    );
    assert!(root_path
        .join(format!("example/logs/tornado-{port0}.err"))
        .exists());
}

#[test]
fn config_directory_and_working_directory_can_be_three_different_folders() {
    // /tmp/X/etc/rolld.yml, processes in /tmp/X/srv/app (written relative to the working
    // directory /tmp/X/run), templates and run_proc in /tmp/X/run.
    let top = tempfile::tempdir().expect("temp dir");
    let real = fs::canonicalize(top.path()).expect("the temp dir's real path");
    let (etc, run, app) = (real.join("etc"), real.join("run"), real.join("srv/app"));
    for d in [&etc, &run, &app] {
        fs::create_dir_all(d).expect("folder");
    }
    fs::write(
        run.join("upstream.templ"),
        "{% for p in ports %}server 127.0.0.1:{{ p }};\n{% endfor %}",
    )
    .expect("template");
    let ports = free_ports(3);
    let yaml = format!(
        "listen: 127.0.0.1:{listen}
app-servers:
  cmd: '{BACKEND} {{numproc}}'
  directory: '../srv/app'
  environment: {{APP_PORT: 'p{{port}}', PLAIN: 'x'}}
  stdout: 'logs/app-{{numproc}}.log'
  stderr: 'logs/app-{{numproc}}.err'
  workset:
    - numprocs: [{a}]
    - numprocs: [{b}]
  smoke_test:
    - check_all_http_ports: numprocs
  after_start:
    - replace_file: [numprocs, 'upstream.templ', 'out/upstream.conf']
    - run_proc: 'pwd > ran-in'
",
        listen = ports[0],
        a = ports[1],
        b = ports[2]
    );
    fs::write(etc.join("rolld.yml"), &yaml).expect("config");

    // `rolld check` prints every path it resolved, absolute.
    let out = Command::new(ROLLD)
        .args(["check", "../etc/rolld.yml"])
        .current_dir(&run)
        .output()
        .expect("rolld check");
    let plan = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{plan}");
    for line in [
        format!("working dir:  {}", run.display()),
        format!("config {} is valid", etc.join("rolld.yml").display()),
        format!("directory:    {}", app.display()),
        format!(
            "stdout:       {}/logs/app-{{numproc}}.log (port {}: {}/logs/app-{}.log)",
            app.display(),
            ports[1],
            app.display(),
            ports[1]
        ),
        format!(
            "replace_file {} -> {}",
            run.join("upstream.templ").display(),
            run.join("out/upstream.conf").display()
        ),
        format!("run_proc pwd > ran-in (sh -c, in {})", run.display()),
        format!("control:      {}", etc.join("rolld.sock").display()),
    ] {
        assert!(plan.contains(&line), "`{line}` in:\n{plan}");
    }

    // And rolld puts everything there.
    let mut rolld = Rolld {
        child: Some(
            Command::new(ROLLD)
                .arg("../etc/rolld.yml")
                .current_dir(&run)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(top.path().join("rolld.log")).expect("log"))
                .spawn()
                .expect("start rolld"),
        ),
        dir: top,
        config: PathBuf::from("etc/rolld.yml"),
        listen: ports[0],
    };
    rolld.wait_log("roll finished", 1);
    assert_eq!(
        fs::read_to_string(run.join("out/upstream.conf")).expect("rendered in the working dir"),
        format!("server 127.0.0.1:{};\n", ports[1])
    );
    assert_eq!(
        fs::read_to_string(run.join("ran-in"))
            .expect("run_proc ran in the working dir")
            .trim(),
        run.display().to_string()
    );
    assert!(
        etc.join("rolld.sock").exists(),
        "control socket beside the config"
    );
    let log = app.join(format!("logs/app-{}.log", ports[1]));
    wait_until("the app's log under `directory`", SOON, || {
        fs::read_to_string(&log).is_ok_and(|t| t.contains(&format!("{}: listening", ports[1])))
    });
    // `{port}` in an environment value is the process's port.
    assert_eq!(
        get_blocking(ports[0], "/env?name=APP_PORT").expect("answer"),
        (200, format!("p{}", ports[1]))
    );
    assert_eq!(
        get_blocking(ports[0], "/env?name=PLAIN").expect("answer"),
        (200, "x".to_string())
    );
    rolld.signal(Signal::SIGTERM);
    assert!(rolld.wait_exit(SOON).success());
}

#[test]
fn an_app_that_redirects_its_root_deploys_and_one_answering_500_rolls_back() {
    // `GET /` answers 302 to a login page: the smoke test passes (2xx and 3xx do).
    let fixture = Fixture::new(2).cmd(format!("{BACKEND} {{port}} --root-status 302"));
    let rolld = Rolld::start(&fixture);
    let (status, _) = get_blocking(fixture.listen, "/").expect("answer");
    assert_eq!(status, 302, "redirects pass through unfollowed");
    let (code, out, err) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "a 302 release deploys: {out} {err}");

    // A release whose `/` answers 500 is rolled back; the reason names port and status.
    let (listen, first_new_port) = (fixture.listen, fixture.sets[0][0]);
    rolld.write_config(
        &fixture
            .cmd(format!("{BACKEND} {{port}} --root-status 500"))
            .yaml(),
    );
    let serving = rolld.pids_of(2);
    let (code, out, err) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "a 500 release is refused: {out} {err}");
    assert!(
        err.contains(&format!(
            "port {first_new_port}: GET /: answered 500 Internal Server Error, accepted 2xx, 3xx"
        )),
        "{err}"
    );
    for pid in serving {
        assert!(alive(pid), "the serving set keeps serving");
    }
    let (status, _) = get_blocking(listen, "/").expect("answer");
    assert_eq!(status, 302);
}

#[test]
fn check_whose_reader_goes_away_ends_quietly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("rolld.yml");
    fs::write(&config, Fixture::new(2).yaml()).expect("config");
    // stdout is a pipe whose reader is already gone: every write fails with EPIPE, as
    // in `rolld check rolld.yml | head -1` once head has exited.
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let out = Command::new(ROLLD)
        .arg("check")
        .arg(&config)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("rolld check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The same for the control commands' output.
    let out = Command::new(ROLLD)
        .args(["status", "--socket"])
        .arg(dir.path().join("none.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("rolld status");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn an_undefined_template_variable_is_named_by_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(
        dir.path().join("up.templ"),
        "upstream app {\n{% for port in portz %}  server 127.0.0.1:{{ port }};\n{% endfor %}}\n",
    )
    .expect("template");
    let yaml = format!(
        "app-servers:\n  cmd: '{BACKEND} {{port}}'\n  workset:\n    - numprocs: [8001]\n    - numprocs: [8002]\n  after_start:\n    - replace_file: [numprocs, 'up.templ', 'up.conf']\n"
    );
    fs::write(dir.path().join("rolld.yml"), &yaml).expect("config");
    for args in [&["check", "rolld.yml"][..], &["rolld.yml"][..]] {
        let out = Command::new(ROLLD)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("rolld");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("up.templ line 2: undefined variable `portz`"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!dir.path().join("up.conf").exists(), "nothing ran");
}
