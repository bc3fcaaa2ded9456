//! `rolld check` and start-up refuse bad config files with exit 2 and a message that
//! names the problem; a good file prints its plan.

use std::process::Command;

use crate::support::{Fixture, BACKEND, ROLLD};

fn check(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("nginx.conf.templ"),
        "upstream app {\n{% for port in ports %}    server 127.0.0.1:{{ port }};\n{% endfor %}}\n",
    )
    .expect("template");
    let path = dir.path().join("rolld.yml");
    std::fs::write(&path, yaml).expect("write config");
    // Run from the config's folder, where its relative template paths are.
    let out = Command::new(ROLLD)
        .arg("check")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .expect("run rolld check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(yaml: &str, wanted: &[&str]) {
    let (code, _, stderr) = check(yaml);
    assert_eq!(code, 2, "exit code for an invalid config; stderr: {stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "message should mention `{w}`: {stderr}");
    }
}

const ORIGINAL: &str = "\
app-servers:
  cmd: '../env/bin/python app.py {numproc}'
  directory: '/srv/app'
  environment: ''
  stderr: 'logs/tornado-{numproc}.err'
  stdout: 'logs/tornado-{numproc}.log'
  workset:
    - numprocs: [8001, 8002, 8003, 8004]
    - numprocs: [8501, 8502, 8503, 8504]
  smoke_test:
    - check_all_http_ports: numprocs
  after_start:
    - replace_file: [numprocs, 'nginx.conf.templ', 'nginx.conf']
    - run_proc: 'nginx -s reload'
";

#[test]
fn check_accepts_the_original_format_and_prints_the_plan() {
    let (code, stdout, stderr) = check(ORIGINAL);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("ports 8001, 8002, 8003, 8004"), "{stdout}");
    assert!(stdout.contains("ports 8501, 8502, 8503, 8504"), "{stdout}");
    assert!(
        stdout.contains("/srv/app/../env/bin/python app.py 8001"),
        "{stdout}"
    );
    assert!(stdout.contains("check_all_http_ports"), "{stdout}");
    assert!(stdout.contains("SIGKILL after 10s"), "{stdout}");
    assert!(
        stdout.contains("server 127.0.0.1:8001;\n    server 127.0.0.1:8002;"),
        "the template is rendered: {stdout}"
    );
}

#[test]
fn check_refuses_a_template_with_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("nginx.conf.templ"),
        "upstream app {\n{% for port in ports %}\n  server {{ port };\n{% endfor %}\n}\n",
    )
    .expect("template");
    let path = dir.path().join("rolld.yml");
    std::fs::write(&path, ORIGINAL).expect("config");
    let out = Command::new(ROLLD)
        .arg("check")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nginx.conf.templ line 3") && stderr.contains("syntax error"),
        "{stderr}"
    );
}

#[test]
fn check_prints_the_new_keys() {
    let fixture = Fixture::new(2).extra("  drain_timeout: 7s\n  balance: round_robin\n");
    let (code, stdout, stderr) = check(&fixture.yaml());
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(
        stdout.contains(&format!("listening on 127.0.0.1:{}", fixture.listen)),
        "{stdout}"
    );
    assert!(stdout.contains("GET /health answers 200"), "{stdout}");
    assert!(stdout.contains("up to 7s"), "{stdout}");
    assert!(stdout.contains("balance round_robin"), "{stdout}");
}

#[test]
fn an_unknown_key_is_refused_with_its_name_and_line() {
    assert_refused(
        &ORIGINAL.replace("  directory:", "  colour: red\n  directory:"),
        &["colour", "line 3"],
    );
}

#[test]
fn a_wrong_type_is_refused_with_its_key_and_line() {
    assert_refused(
        &ORIGINAL.replace("8003", "'eighty'"),
        &["numprocs", "line 8"],
    );
    assert_refused(
        &format!("{ORIGINAL}  drain_timeout: soon\n"),
        &["drain_timeout", "soon", "line 15"],
    );
}

#[test]
fn duplicate_ports_are_refused() {
    assert_refused(
        &ORIGINAL.replace("8503", "8003"),
        &[
            "port 8003 appears twice",
            "line 9:",
            "workset[1].numprocs[2]",
        ],
    );
}

#[test]
fn a_workset_with_one_set_is_refused() {
    assert_refused(
        &ORIGINAL.replace("    - numprocs: [8501, 8502, 8503, 8504]\n", ""),
        &["workset", "at least two", "line 7"],
    );
}

#[test]
fn a_command_without_a_port_placeholder_is_refused() {
    assert_refused(
        &ORIGINAL.replace(" {numproc}'", "'"),
        &["{port}", "cmd", "line 2"],
    );
}

#[test]
fn a_missing_or_unreadable_file_is_refused() {
    let out = Command::new(ROLLD)
        .arg("check")
        .arg("/nonexistent/rolld.yml")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rolld.yml"));
}

#[test]
fn run_refuses_a_bad_config_with_exit_2_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rolld.yml");
    std::fs::write(
        &path,
        format!("app-servers:\n  cmd: '{BACKEND} {{port}}'\n  workset:\n    - numprocs: [1]\n"),
    )
    .expect("write");
    let out = Command::new(ROLLD).arg(&path).output().expect("run rolld");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("workset"), "{stderr}");
    let out = Command::new(ROLLD)
        .args(["run", &path.display().to_string()])
        .output()
        .expect("run rolld");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_and_version_work() {
    let out = Command::new(ROLLD).arg("--help").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("check"));
    let out = Command::new(ROLLD).arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(ROLLD).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_warns_when_port_range_lies_in_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("the kernel's ephemeral port range");
    let lo: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let inside = format!(
        "app-servers:\n  cmd: 'app {{port}}'\n  processes: 4\n  port_range: {}-{}\n",
        lo,
        lo + 100
    );
    let (code, _, stderr) = check(&inside);
    assert_eq!(code, 0, "a warning, not an error: {stderr}");
    assert!(stderr.contains("ephemeral port range"), "{stderr}");
    let default_range = "app-servers:\n  cmd: 'app {port}'\n  processes: 4\n";
    let (code, _, stderr) = check(default_range);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("ephemeral"), "{stderr}");
}
