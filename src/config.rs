//! The configuration file: the original rolld format, plus rolld's new keys.
//!
//! Parsing happens in two steps, as raw serde types ([`RawConfig`]) mirroring the YAML,
//! then [`validate`](RawConfig::validate) into a typed [`Config`] where every path is
//! absolute, every duration parsed and every port known. Errors name the key and line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use rolld_proxy::{Balance, ProxyConfig};

use crate::yaml_lines::Lines;
use serde::Deserialize;

/// A configuration that cannot be used, with the file, key and line to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

// ---- raw: the YAML as written ------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    proxy: Option<RawProxy>,
    user: Option<String>,
    group: Option<String>,
    control_socket: Option<String>,
    admin: Option<String>,
    cgroup: Option<String>,
    tls: Option<RawTls>,
    #[serde(rename = "app-servers")]
    app_servers: RawAppServers,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    client_header_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    max_body_size: Option<RawSize>,
    max_header_size: Option<RawSize>,
    max_connections: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    fail_timeout: Option<String>,
    access_log: Option<bool>,
    workers: Option<usize>,
    http2_max_concurrent_streams: Option<u32>,
    http2_keepalive_interval: Option<String>,
    http2_keepalive_timeout: Option<String>,
    tunnel_idle_timeout: Option<String>,
    upstream_keepalive_timeout: Option<String>,
    hold_timeout: Option<String>,
    max_held: Option<usize>,
    buffering: Option<bool>,
    request_buffer: Option<RawSize>,
    response_buffer: Option<RawSize>,
    buffer_memory: Option<RawSize>,
    buffer_disk: Option<RawSize>,
    max_response_file: Option<RawSize>,
    buffer_dir: Option<String>,
    unbuffered_paths: Option<Vec<String>>,
    retries: Option<u32>,
    retry_body_limit: Option<RawSize>,
    retry_timeouts: Option<bool>,
    retry_budget: Option<RawPercent>,
    retry_budget_floor: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: String,
    certificates: Vec<RawCertificate>,
    redirect_http: Option<bool>,
    hsts: Option<String>,
    handshake_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: String,
    key: String,
}

/// A byte size: a number, or a string with a k/m/g suffix as nginx writes them.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppServers {
    cmd: String,
    directory: Option<String>,
    environment: Option<serde_yaml::Value>,
    stdout: Option<String>,
    stderr: Option<String>,
    workset: Option<Vec<RawWorkset>>,
    processes: Option<usize>,
    port_range: Option<String>,
    #[serde(default)]
    smoke_test: Vec<RawSmokeTest>,
    #[serde(default)]
    after_start: Vec<RawAction>,
    health: Option<RawHealth>,
    drain_timeout: Option<String>,
    stop_signal: Option<String>,
    stop_timeout: Option<String>,
    balance: Option<String>,
    rollout: Option<RawRollout>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    canary: Option<RawPercent>,
    canary_for: Option<String>,
    bake: Option<String>,
    max_error_rate: Option<RawPercent>,
    min_requests: Option<u64>,
}

/// A share: `10%`, or a bare number of percent.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPercent {
    Number(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkset {
    numprocs: Vec<u16>,
}

// The original writes these as one-key maps (`- run_proc: ...`), which serde_yaml does
// not read as enums, so they are structs whose one present key is checked afterwards.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmokeTest {
    check_all_http_ports: Option<String>,
    /// rolld's own: the path to request (default `/`).
    path: Option<String>,
    /// rolld's own: the statuses that pass (default 2xx and 3xx).
    status: Option<RawStatuses>,
}

/// Accepted HTTP statuses: `200`, `"2xx"`, `"200-299"`, or a list of these.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatuses {
    One(RawStatus),
    List(Vec<RawStatus>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatus {
    Code(u16),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    replace_file: Option<Vec<String>>,
    run_proc: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<String>,
    status: Option<RawStatuses>,
    timeout: Option<String>,
    interval: Option<String>,
    start_timeout: Option<String>,
}

// ---- typed: what the rest of rolld uses ----------------------------------------------

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (absolute).
    pub path: PathBuf,
    /// The folder rolld was started in. As in the original rolld, `replace_file` paths
    /// and a relative `directory` resolve against it, and `run_proc` commands run in it.
    pub workdir: PathBuf,
    /// Front listener of the built-in proxy; `None` when another balancer is in front.
    pub listen: Option<SocketAddr>,
    /// Settings of the built-in proxy.
    pub proxy: ProxyConfig,
    /// Who rolld and its processes run as after binding the listener.
    pub run_as: Option<RunAs>,
    /// Where `rolld reload`/`status`/`stop` reach this rolld; `None`: beside the file.
    pub control_socket: Option<PathBuf>,
    /// Where `/metrics`, `/status` and `/healthz` are served, if anywhere.
    pub admin: Option<SocketAddr>,
    /// A delegated cgroup v2 folder: each set runs in a cgroup of its own under it.
    /// Checked when rolld starts (`cgroup::Mode::choose`), not here: `rolld check`
    /// runs anywhere.
    pub cgroup: Option<PathBuf>,
    /// The TLS listener of the built-in proxy, if any.
    pub tls: Option<TlsSettings>,
    pub app: AppServers,
}

/// The `tls:` section, with its certificates read and checked.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    /// What the files held when the config was read; the first is the default.
    pub loaded: Vec<crate::tls::Loaded>,
    /// The plain `listen` answers every request with a 308 to HTTPS.
    pub redirect_http: bool,
    /// `Strict-Transport-Security: max-age=...` on every HTTPS response, if set.
    pub hsts: Option<Duration>,
    pub handshake_timeout: Duration,
}

impl TlsSettings {
    /// Everything but the certificates' contents: what a reload cannot change.
    pub fn listener_settings(&self) -> (SocketAddr, bool, Option<Duration>, Duration) {
        (
            self.listen,
            self.redirect_http,
            self.hsts,
            self.handshake_timeout,
        )
    }
}

/// The unprivileged user (and group) to switch to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

#[derive(Clone, Debug)]
pub struct AppServers {
    /// The command as written, for display.
    pub cmd: String,
    /// The command split into words, placeholders still in place.
    pub argv: Vec<String>,
    /// Working directory of every process (absolute).
    pub directory: PathBuf,
    /// Values may hold `{port}`/`{numproc}`, filled per process.
    pub environment: Vec<(String, String)>,
    /// Log files (absolute; may hold `{port}`/`{numproc}`), relative ones resolved
    /// against `directory` as the original did.
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    pub ports: PortPlan,
    pub smoke_tests: Vec<SmokeTest>,
    pub after_start: Vec<Action>,
    pub health: Health,
    pub drain_timeout: Duration,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub balance: Balance,
    /// Canary, bake and rollback after the switch; `None`: a roll ends at the switch.
    pub rollout: Option<Rollout>,
}

/// How a release is watched after its health checks (`app-servers.rollout`).
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Share of new requests (millionths) sent to the new set first, and for how long.
    pub canary: Option<(u32, Duration)>,
    /// How long the old set stays up, idle, after the full switch.
    pub bake: Duration,
    /// The failed share of the new set's requests (0.0-1.0) that rolls it back.
    pub max_error_rate: f64,
    /// Fewer requests than this in a phase: judged by crashes only.
    pub min_requests: u64,
}

/// Where each generation's processes listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortPlan {
    /// Fixed sets used in turn, as the original rolld did.
    Worksets(Vec<Vec<u16>>),
    /// `count` free ports picked from `range` for every set.
    Pick {
        count: usize,
        range: RangeInclusive<u16>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmokeTest {
    /// `GET path` on every port of the new set must answer one of the accepted statuses
    /// (by default `GET /`, 2xx or 3xx: a login redirect passes, redirects are not followed).
    CheckAllHttpPorts(HttpCheck),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Render `template` with the new set's ports into `output`.
    ReplaceFile { template: PathBuf, output: PathBuf },
    /// Run a shell command.
    RunProc { command: String },
}

/// When a process counts as ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// An HTTP check after the port accepts connections; `None`: accepting is enough.
    pub http: Option<HttpCheck>,
    /// Longest wait for one probe.
    pub timeout: Duration,
    /// Pause between probes.
    pub interval: Duration,
    /// Longest wait for a new process to become ready.
    pub start_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCheck {
    pub path: String,
    pub status: Statuses,
}

/// The HTTP statuses a check accepts, as ranges (`2xx` is 200-299).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statuses(Vec<RangeInclusive<u16>>);

impl Statuses {
    pub fn exactly(status: u16) -> Statuses {
        Statuses(vec![status..=status])
    }

    /// 2xx and 3xx: what the original's smoke test let through without failing the roll.
    pub fn success_or_redirect() -> Statuses {
        Statuses(vec![200..=399])
    }

    pub fn accepts(&self, status: u16) -> bool {
        self.0.iter().any(|r| r.contains(&status))
    }
}

impl fmt::Display for Statuses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let (a, b) = (*range.start(), *range.end());
            if a == b {
                write!(f, "{a}")?;
            } else if a % 100 == 0 && b == a + 99 {
                write!(f, "{}xx", a / 100)?;
            } else if a % 100 == 0 && b % 100 == 99 {
                let classes: Vec<String> = (a / 100..=b / 100).map(|c| format!("{c}xx")).collect();
                f.write_str(&classes.join(", "))?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;
/// No duration in the file may be longer: a deadline must stay a time the clock can hold.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
const PLACEHOLDERS: [&str; 2] = ["{port}", "{numproc}"];
const MAX_PROCESSES: usize = 4096;
const MAX_CONNECTIONS: usize = 1 << 24;
/// Longest `proxy.hold_timeout`: clients and balancers in front give up sooner anyway.
const MAX_HOLD_TIMEOUT: Duration = Duration::from_secs(600);
/// Most `proxy.max_held`.
const MAX_HELD: usize = 100_000;
/// Most `proxy.retries`: past a few, a request is failing, not unlucky.
const MAX_RETRIES: u32 = 10;
/// Largest `proxy.retry_body_limit`: each request waiting for its answer may keep this.
const MAX_RETRY_BODY_LIMIT: u64 = 16 * 1024 * 1024;
/// Most `proxy.retry_budget_floor` (retries per second).
const MAX_RETRY_BUDGET_FLOOR: u32 = 10_000;

impl Config {
    /// Reads and validates the file at `path`, with relative paths of the original's
    /// keys resolved against the folder rolld runs in.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let workdir = std::env::current_dir().map_err(read_error)?;
        let path = realpath(&workdir.join(path));
        Config::parse(&text, &path, &workdir)
    }

    /// Validates `text` as if read from `path` by a rolld started in `workdir` (both
    /// absolute): see [`Config::workdir`] and the README's path rules.
    pub fn parse(text: &str, path: &Path, workdir: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| invalid(yaml_error(&e)))?;
        let lines = Lines::index(text);
        let v = Validator {
            lines: &lines,
            config_dir: path.parent().unwrap_or(Path::new("/")),
            workdir,
        };
        let mut config = raw.validate(&v).map_err(invalid)?;
        config.path = path.to_path_buf();
        config.workdir = workdir.to_path_buf();
        Ok(config)
    }

    /// Whether rolld runs its built-in proxy (a plain or a TLS listener).
    pub fn proxied(&self) -> bool {
        self.listen.is_some() || self.tls.is_some()
    }

    /// The control socket's path: `control_socket`, or `NAME.sock` beside the file.
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&self.path))
    }

    /// The command line of the process on `port`: program and arguments.
    pub fn command_for(&self, port: u16) -> Vec<String> {
        let mut argv: Vec<String> = self.app.argv.iter().map(|w| fill(w, port)).collect();
        if let Some(program) = argv.first_mut() {
            // A relative program path is relative to `directory`, where the process runs.
            if program.contains('/') && !program.starts_with('/') {
                *program = self.app.directory.join(&*program).display().to_string();
            }
        }
        argv
    }
}

/// Substitutes the port for both placeholders.
pub fn fill(template: &str, port: u16) -> String {
    let port = port.to_string();
    PLACEHOLDERS
        .iter()
        .fold(template.to_string(), |s, p| s.replace(p, &port))
}

/// `path` without `.` and `..` and with the symlinks of the part that exists resolved,
/// as `realpath -m` prints it: what `rolld check` shows is where files really go.
pub fn realpath(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut real = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                real.pop();
            }
            other => {
                real.push(other);
                // Resolve symlinks while the path exists, as the kernel would.
                if let Ok(resolved) = std::fs::canonicalize(&real) {
                    real = resolved;
                }
            }
        }
    }
    real
}

/// serde_yaml's error as `line N: message`, the form of rolld's own config errors.
fn yaml_error(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    match e.location() {
        Some(at) => {
            let suffix = format!(" at line {} column {}", at.line(), at.column());
            let message = text.strip_suffix(&suffix).unwrap_or(&text);
            format!("line {}: {message}", at.line())
        }
        None => text,
    }
}

struct Validator<'a> {
    lines: &'a Lines,
    /// Where rolld's own new path keys resolve (`control_socket`).
    config_dir: &'a Path,
    /// Where the original's path keys resolve (`directory`, `replace_file`).
    workdir: &'a Path,
}

impl Validator<'_> {
    /// An error about the value at `path` (e.g. `app-servers.workset[1].numprocs[0]`),
    /// with the line it is written on.
    fn err(&self, path: &str, message: impl fmt::Display) -> String {
        match self.lines.line(path) {
            Some(line) => format!("line {line}: `{path}`: {message}"),
            None => format!("`{path}`: {message}"),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, String> {
        match value {
            None => Ok(default),
            Some(text) => {
                let d = humantime::parse_duration(text.trim()).map_err(|e| {
                    self.err(
                        key,
                        format!("`{text}` is not a duration ({e}); write e.g. 500ms, 10s, 2m"),
                    )
                })?;
                if d > MAX_DURATION {
                    return Err(self.err(key, format!("`{text}` is longer than a year")));
                }
                Ok(d)
            }
        }
    }

    /// A path of rolld's own keys: relative to the config file's folder.
    fn own_path(&self, value: &str) -> PathBuf {
        realpath(&self.config_dir.join(value))
    }

    /// A path of the original's keys: relative to the folder rolld runs in.
    fn original_path(&self, value: &str) -> PathBuf {
        realpath(&self.workdir.join(value))
    }

    /// Statuses as written, or `default`.
    fn statuses(
        &self,
        key: &str,
        raw: Option<RawStatuses>,
        default: Statuses,
    ) -> Result<Statuses, String> {
        let items = match raw {
            None => return Ok(default),
            Some(RawStatuses::One(one)) => vec![one],
            Some(RawStatuses::List(list)) => list,
        };
        if items.is_empty() {
            return Err(self.err(key, "lists no status; write e.g. 200, 2xx or [2xx, 302]"));
        }
        let mut ranges = Vec::new();
        for item in items {
            let range = match item {
                RawStatus::Code(code) => Some(code..=code),
                RawStatus::Text(text) => parse_status(&text),
            };
            match range {
                Some(r) if (100..=599).contains(r.start()) && (100..=599).contains(r.end()) => {
                    ranges.push(r)
                }
                _ => {
                    return Err(self.err(
                        key,
                        "statuses are codes from 100 to 599: write e.g. 200, 2xx, 200-399 or a list of these",
                    ))
                }
            }
        }
        Ok(Statuses(ranges))
    }
}

/// `302`, `3xx` or `200-399`.
fn parse_status(text: &str) -> Option<RangeInclusive<u16>> {
    let t = text.trim().to_ascii_lowercase();
    if let Some(class) = t.strip_suffix("xx") {
        let c: u16 = class.parse().ok().filter(|c| (1..=5).contains(c))?;
        return Some(c * 100..=c * 100 + 99);
    }
    if let Some((a, b)) = t.split_once('-') {
        let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        return (a <= b).then_some(a..=b);
    }
    t.parse().ok().map(|c: u16| c..=c)
}

impl RawConfig {
    fn validate(self, v: &Validator) -> Result<Config, String> {
        let proxy = validate_proxy(v, self.proxy)?;
        let run_as = validate_run_as(v, self.user, self.group)?;
        let control_socket = self.control_socket.as_deref().map(|p| v.own_path(p));
        let cgroup = match self.cgroup.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err(v.err("cgroup", "empty; write a cgroup v2 folder")),
            Some(p) => Some(v.own_path(p)),
        };
        let admin = match self.admin.as_deref().map(str::trim) {
            None => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| {
                v.err(
                    "admin",
                    format!("`{addr}` is not an address; write e.g. 127.0.0.1:9090"),
                )
            })?),
        };
        let app = self.app_servers;

        let listen = match self.listen.as_deref().map(str::trim) {
            None => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| {
                v.err(
                    "listen",
                    format!("`{addr}` is not an address; write e.g. 0.0.0.0:80 or 127.0.0.1:8080"),
                )
            })?),
        };
        let tls = self
            .tls
            .map(|raw| validate_tls(v, raw, listen))
            .transpose()?;

        let argv = shell_words::split(&app.cmd).map_err(|e| {
            v.err(
                "app-servers.cmd",
                format!("cannot split `{}`: {e}", app.cmd),
            )
        })?;
        if argv.is_empty() {
            return Err(v.err("app-servers.cmd", "the command is empty"));
        }
        let has_placeholder = PLACEHOLDERS.iter().any(|p| app.cmd.contains(p));

        let ports = match (app.workset, app.processes) {
            (Some(_), Some(_)) => {
                return Err(v.err(
                    "app-servers.processes",
                    "use either `workset` or `processes`, not both",
                ))
            }
            (None, None) => return Err(v.err(
                "app-servers",
                "say where processes listen: `workset` (fixed port sets) or `processes` (a count)",
            )),
            (Some(sets), None) => {
                let sets: Vec<Vec<u16>> = sets.into_iter().map(|s| s.numprocs).collect();
                validate_worksets(v, &sets)?;
                PortPlan::Worksets(sets)
            }
            (None, Some(count)) => {
                if !(1..=MAX_PROCESSES).contains(&count) {
                    return Err(v.err(
                        "app-servers.processes",
                        format!("{count} is not between 1 and {MAX_PROCESSES}"),
                    ));
                }
                let range = match app.port_range.as_deref() {
                    None => DEFAULT_PORT_RANGE,
                    Some(text) => parse_range(text).ok_or_else(|| {
                        v.err(
                            "app-servers.port_range",
                            format!("`{text}` is not a range; write e.g. 20000-29999"),
                        )
                    })?,
                };
                let size = usize::from(range.end() - range.start()) + 1;
                if size < 2 * count {
                    return Err(v.err(
                        "app-servers.port_range",
                        format!(
                            "holds {size} port(s); two sets of {count} need at least {}",
                            2 * count
                        ),
                    ));
                }
                PortPlan::Pick { count, range }
            }
        };
        if app.port_range.is_some() && matches!(ports, PortPlan::Worksets(_)) {
            return Err(v.err("app-servers.port_range", "only applies with `processes`"));
        }
        let several = match &ports {
            PortPlan::Worksets(sets) => sets.iter().any(|s| s.len() > 1) || sets.len() > 1,
            PortPlan::Pick { .. } => true,
        };
        if several && !has_placeholder {
            return Err(v.err(
                "app-servers.cmd",
                format!("`{}` has no {{port}} or {{numproc}}: every process would get the same command line", app.cmd),
            ));
        }
        if let (Some(tls), PortPlan::Worksets(sets)) = (&tls, &ports) {
            if sets.iter().flatten().any(|&p| p == tls.listen.port()) {
                return Err(v.err(
                    "tls.listen",
                    format!("port {} is also in a workset", tls.listen.port()),
                ));
            }
        }
        if let (Some(listen), PortPlan::Worksets(sets)) = (listen, &ports) {
            if sets.iter().flatten().any(|&p| p == listen.port()) {
                return Err(v.err(
                    "listen",
                    format!("port {} is also in a workset", listen.port()),
                ));
            }
        }

        // The original ran processes in `directory`, relative to where it was started.
        // Without it (the original required it), processes run beside the config file.
        let directory = match app.directory.as_deref() {
            None => v.config_dir.to_path_buf(),
            Some(dir) => v.original_path(dir),
        };
        let in_directory = |p: &str| realpath(&directory.join(p));
        let environment = parse_environment(v, app.environment)?;
        // The original wrote its log files relative to `directory`.
        let stdout = app.stdout.as_deref().map(in_directory);
        let stderr = app.stderr.as_deref().map(in_directory);

        let mut smoke_tests = Vec::new();
        for (i, test) in app.smoke_test.into_iter().enumerate() {
            let at = format!("app-servers.smoke_test[{i}]");
            match test.check_all_http_ports.as_deref() {
                Some("numprocs") => {}
                Some(other) => {
                    return Err(v.err(
                        &format!("{at}.check_all_http_ports"),
                        format!("`{other}` is not known; the ports to check are `numprocs`"),
                    ))
                }
                None => return Err(v.err(
                    &at,
                    "write `- check_all_http_ports: numprocs` (with optional `path` and `status`)",
                )),
            }
            let path = test.path.unwrap_or_else(|| "/".to_string());
            check_request_path(v, &format!("{at}.path"), &path)?;
            let status = v.statuses(
                &format!("{at}.status"),
                test.status,
                Statuses::success_or_redirect(),
            )?;
            smoke_tests.push(SmokeTest::CheckAllHttpPorts(HttpCheck { path, status }));
        }

        let mut after_start = Vec::new();
        for (i, action) in app.after_start.into_iter().enumerate() {
            let at = format!("app-servers.after_start[{i}]");
            // As in the original, these paths are relative to where rolld runs.
            let action = match (action.replace_file, action.run_proc) {
                (Some(args), None) => match args.as_slice() {
                    [what, template, output] if what == "numprocs" => Action::ReplaceFile {
                        template: v.original_path(template),
                        output: v.original_path(output),
                    },
                    _ => {
                        return Err(v.err(
                            &format!("{at}.replace_file"),
                            "write `replace_file: [numprocs, TEMPLATE, OUTPUT]`",
                        ))
                    }
                },
                (None, Some(command)) if !command.trim().is_empty() => Action::RunProc { command },
                (None, Some(_)) => {
                    return Err(v.err(&format!("{at}.run_proc"), "the command is empty"))
                }
                _ => {
                    return Err(v.err(
                        &at,
                        "each action is one of `replace_file: [...]` or `run_proc: COMMAND`",
                    ))
                }
            };
            after_start.push(action);
        }

        let health = match app.health {
            None => Health {
                http: None,
                timeout: DEFAULT_HEALTH_TIMEOUT,
                interval: DEFAULT_HEALTH_INTERVAL,
                start_timeout: DEFAULT_START_TIMEOUT,
            },
            Some(h) => {
                let path = h.path.unwrap_or_else(|| "/".to_string());
                check_request_path(v, "app-servers.health.path", &path)?;
                let status = v.statuses(
                    "app-servers.health.status",
                    h.status,
                    Statuses::exactly(200),
                )?;
                let health = Health {
                    http: Some(HttpCheck { path, status }),
                    timeout: v.duration(
                        "app-servers.health.timeout",
                        h.timeout.as_deref(),
                        DEFAULT_HEALTH_TIMEOUT,
                    )?,
                    interval: v.duration(
                        "app-servers.health.interval",
                        h.interval.as_deref(),
                        DEFAULT_HEALTH_INTERVAL,
                    )?,
                    start_timeout: v.duration(
                        "app-servers.health.start_timeout",
                        h.start_timeout.as_deref(),
                        DEFAULT_START_TIMEOUT,
                    )?,
                };
                for (key, d) in [
                    ("app-servers.health.timeout", health.timeout),
                    ("app-servers.health.interval", health.interval),
                    ("app-servers.health.start_timeout", health.start_timeout),
                ] {
                    if d.is_zero() {
                        return Err(v.err(key, "must be longer than zero"));
                    }
                }
                health
            }
        };

        let stop_signal = match app.stop_signal.as_deref() {
            None => Signal::SIGTERM,
            Some(name) => parse_signal(name).ok_or_else(|| {
                v.err(
                    "app-servers.stop_signal",
                    format!("`{name}` is not a signal; write e.g. TERM, INT, QUIT"),
                )
            })?,
        };
        let balance = match app.balance.as_deref().map(str::trim) {
            None | Some("least_conn") => Balance::LeastConn,
            Some("round_robin") => Balance::RoundRobin,
            Some(other) => {
                return Err(v.err(
                    "app-servers.balance",
                    format!("`{other}` is not known; write least_conn or round_robin"),
                ))
            }
        };

        let rollout = validate_rollout(v, app.rollout)?;
        if listen.is_none() && rollout.as_ref().is_some_and(|r| r.canary.is_some()) {
            return Err(v.err(
                "app-servers.rollout.canary",
                "needs the built-in proxy (`listen`): only it can send a share of requests to the new set",
            ));
        }
        Ok(Config {
            // Both set by `Config::parse`, which knows the file and the folder.
            path: PathBuf::new(),
            workdir: PathBuf::new(),
            listen,
            proxy,
            run_as,
            control_socket,
            admin,
            cgroup,
            tls,
            app: AppServers {
                cmd: app.cmd,
                argv,
                directory,
                environment,
                stdout,
                stderr,
                ports,
                smoke_tests,
                after_start,
                health,
                drain_timeout: v.duration(
                    "app-servers.drain_timeout",
                    app.drain_timeout.as_deref(),
                    DEFAULT_DRAIN_TIMEOUT,
                )?,
                stop_signal,
                stop_timeout: v.duration(
                    "app-servers.stop_timeout",
                    app.stop_timeout.as_deref(),
                    DEFAULT_STOP_TIMEOUT,
                )?,
                balance,
                rollout,
            },
        })
    }
}

/// Longest `tls.hsts`: two years, the most browsers' preload lists ask for.
const MAX_HSTS: Duration = Duration::from_secs(2 * 366 * 24 * 3600);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn validate_tls(
    v: &Validator,
    raw: RawTls,
    listen: Option<SocketAddr>,
) -> Result<TlsSettings, String> {
    let addr = raw.listen.trim();
    let tls_listen = addr.parse::<SocketAddr>().map_err(|_| {
        v.err(
            "tls.listen",
            format!("`{addr}` is not an address; write e.g. 0.0.0.0:443"),
        )
    })?;
    if listen == Some(tls_listen) || listen.is_some_and(|l| l.port() == tls_listen.port()) {
        return Err(v.err("tls.listen", "the same port as `listen`"));
    }
    if raw.certificates.is_empty() {
        return Err(v.err(
            "tls.certificates",
            "name at least one {cert: FILE, key: FILE}",
        ));
    }
    let files: Vec<crate::tls::CertFiles> = raw
        .certificates
        .iter()
        .map(|c| crate::tls::CertFiles {
            cert: v.own_path(&c.cert),
            key: v.own_path(&c.key),
        })
        .collect();
    let redirect_http = raw.redirect_http.unwrap_or(false);
    if redirect_http && listen.is_none() {
        return Err(v.err(
            "tls.redirect_http",
            "needs `listen`: the plain listener is the one that redirects",
        ));
    }
    let hsts = match raw.hsts.as_deref().map(str::trim) {
        None => None,
        Some(text) => {
            let age = humantime::parse_duration(text).map_err(|e| {
                v.err(
                    "tls.hsts",
                    format!("`{text}` is not a duration ({e}); write e.g. 1y, 180d"),
                )
            })?;
            if age > MAX_HSTS {
                return Err(v.err("tls.hsts", format!("`{text}` is longer than two years")));
            }
            Some(age)
        }
    };
    let handshake_timeout = v.duration(
        "tls.handshake_timeout",
        raw.handshake_timeout.as_deref(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )?;
    if handshake_timeout.is_zero() {
        return Err(v.err("tls.handshake_timeout", "must be longer than zero"));
    }
    // The files last: every cheaper mistake is named first.
    let now = std::time::SystemTime::now();
    let mut loaded = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        loaded.push(
            crate::tls::load(f, now)
                .map_err(|why| v.err(&format!("tls.certificates[{i}]"), why))?,
        );
    }
    Ok(TlsSettings {
        listen: tls_listen,
        loaded,
        redirect_http,
        hsts,
        handshake_timeout,
    })
}

fn validate_rollout(v: &Validator, raw: Option<RawRollout>) -> Result<Option<Rollout>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let percent = |key: &str, raw: RawPercent, open: bool| -> Result<f64, String> {
        let key = format!("app-servers.rollout.{key}");
        let (text, value) = match raw {
            RawPercent::Number(n) => (n.to_string(), Some(n)),
            RawPercent::Text(t) => {
                let value = t.trim().trim_end_matches('%').trim().parse::<f64>().ok();
                (t, value)
            }
        };
        let Some(value) = value.filter(|n| n.is_finite()) else {
            return Err(v.err(&key, format!("`{text}` is not a share; write e.g. 10%")));
        };
        let fits = if open {
            value > 0.0 && value < 100.0
        } else {
            (0.0..=100.0).contains(&value)
        };
        if !fits {
            let range = if open {
                "above 0% and below 100%"
            } else {
                "from 0% to 100%"
            };
            return Err(v.err(&key, format!("`{text}` is not {range}")));
        }
        Ok(value / 100.0)
    };
    let canary_for = v.duration(
        "app-servers.rollout.canary_for",
        raw.canary_for.as_deref(),
        DEFAULT_CANARY_FOR,
    )?;
    let canary = match raw.canary {
        None if raw.canary_for.is_some() => {
            return Err(v.err(
                "app-servers.rollout.canary_for",
                "applies only with `canary` (the share of requests, e.g. 10%)",
            ))
        }
        None => None,
        Some(share) => {
            if canary_for.is_zero() {
                return Err(v.err("app-servers.rollout.canary_for", "must be longer than zero"));
            }
            let share = percent("canary", share, true)?;
            Some(((share * 1_000_000.0).round() as u32, canary_for))
        }
    };
    let max_error_rate = match raw.max_error_rate {
        None => DEFAULT_MAX_ERROR_RATE,
        Some(rate) => percent("max_error_rate", rate, false)?,
    };
    let min_requests = raw.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS);
    if !(1..=1_000_000_000).contains(&min_requests) {
        return Err(v.err(
            "app-servers.rollout.min_requests",
            format!("`{min_requests}` is not from 1 to 1000000000"),
        ));
    }
    Ok(Some(Rollout {
        canary,
        bake: v.duration(
            "app-servers.rollout.bake",
            raw.bake.as_deref(),
            DEFAULT_BAKE,
        )?,
        max_error_rate,
        min_requests,
    }))
}

const DEFAULT_CANARY_FOR: Duration = Duration::from_secs(30);
const DEFAULT_BAKE: Duration = Duration::from_secs(60);
const DEFAULT_MAX_ERROR_RATE: f64 = 0.02;
const DEFAULT_MIN_REQUESTS: u64 = 50;

fn validate_proxy(v: &Validator, raw: Option<RawProxy>) -> Result<ProxyConfig, String> {
    let d = ProxyConfig::default();
    let Some(raw) = raw else { return Ok(d) };
    let buffering = validate_buffering(v, &raw)?;
    let duration =
        |key: &str, value: Option<&str>, default: Duration| -> Result<Duration, String> {
            let d = v.duration(&format!("proxy.{key}"), value, default)?;
            if d.is_zero() {
                return Err(v.err(&format!("proxy.{key}"), "must be longer than zero"));
            }
            Ok(d)
        };
    let max_body_size = match raw.max_body_size {
        None => d.max_body_size,
        Some(size) => match parse_size(v, "proxy.max_body_size", size)? {
            0 => None,
            n => Some(n),
        },
    };
    // A body larger than every temporary file together could never be buffered: it
    // would wait for room that cannot come, then get 503.
    if let (true, Some(max)) = (buffering.enabled, max_body_size) {
        if max > buffering.disk {
            return Err(v.err(
                "proxy.max_body_size",
                format!(
                    "{} is larger than proxy.buffer_disk ({}): such a body could never be buffered; raise buffer_disk or lower max_body_size",
                    human(max),
                    human(buffering.disk)
                ),
            ));
        }
    }
    let max_header_size = match raw.max_header_size {
        None => d.max_header_size,
        Some(size) => {
            let n = parse_size(v, "proxy.max_header_size", size)?;
            if !(8192..=16 * 1024 * 1024).contains(&n) {
                return Err(v.err("proxy.max_header_size", "must be between 8k and 16m"));
            }
            n as usize
        }
    };
    let max_connections = raw.max_connections.unwrap_or(d.max_connections);
    if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
        return Err(v.err(
            "proxy.max_connections",
            format!("{max_connections} is not between 1 and {MAX_CONNECTIONS}"),
        ));
    }
    let mut trusted_proxies = Vec::new();
    for text in raw.trusted_proxies.unwrap_or_default() {
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                v.err(
                    "proxy.trusted_proxies",
                    format!("`{text}` is not an address or CIDR range (e.g. 10.0.0.0/8)"),
                )
            })?;
        trusted_proxies.push(net);
    }
    let bounded = |key: &str, value: Option<&str>, default: Duration, max: Duration| {
        let d = duration(key, value, default)?;
        if d < Duration::from_secs(1) || d > max {
            return Err(v.err(
                &format!("proxy.{key}"),
                format!("must be between 1s and {}", humantime::format_duration(max)),
            ));
        }
        Ok(d)
    };
    let http2_max_concurrent_streams = match raw.http2_max_concurrent_streams {
        None => d.http2_max_concurrent_streams,
        Some(n @ 1..=1000) => n,
        Some(n) => {
            return Err(v.err(
                "proxy.http2_max_concurrent_streams",
                format!("{n} is not between 1 and 1000"),
            ))
        }
    };
    // Zero is allowed: no holding, 503 at once.
    let hold_timeout = v.duration(
        "proxy.hold_timeout",
        raw.hold_timeout.as_deref(),
        d.hold_timeout,
    )?;
    if hold_timeout > MAX_HOLD_TIMEOUT {
        return Err(v.err(
            "proxy.hold_timeout",
            format!(
                "must be at most {} (0 answers 503 at once)",
                humantime::format_duration(MAX_HOLD_TIMEOUT)
            ),
        ));
    }
    let max_held = raw.max_held.unwrap_or(d.max_held);
    if !(1..=MAX_HELD).contains(&max_held) {
        return Err(v.err(
            "proxy.max_held",
            format!("{max_held} is not between 1 and {MAX_HELD}"),
        ));
    }
    let retries = raw.retries.unwrap_or(d.retries);
    if retries > MAX_RETRIES {
        return Err(v.err(
            "proxy.retries",
            format!("{retries} is not between 0 and {MAX_RETRIES}"),
        ));
    }
    let retry_body_limit = match raw.retry_body_limit {
        None => d.retry_body_limit,
        Some(size) => {
            let n = parse_size(v, "proxy.retry_body_limit", size)?;
            if n > MAX_RETRY_BODY_LIMIT {
                return Err(v.err(
                    "proxy.retry_body_limit",
                    "must be at most 16m (0: no request with a body is sent again)",
                ));
            }
            n
        }
    };
    let retry_budget = match raw.retry_budget {
        None => d.retry_budget,
        Some(raw) => {
            let (text, value) = match raw {
                RawPercent::Number(n) => (n.to_string(), Some(n)),
                RawPercent::Text(t) => {
                    let value = t.trim().trim_end_matches('%').trim().parse::<f64>().ok();
                    (t, value)
                }
            };
            match value {
                Some(n) if (0.0..=100.0).contains(&n) => n / 100.0,
                _ => {
                    return Err(v.err(
                        "proxy.retry_budget",
                        format!("`{text}` is not a share from 0% to 100%; write e.g. 20%"),
                    ))
                }
            }
        }
    };
    let retry_budget_floor = raw.retry_budget_floor.unwrap_or(d.retry_budget_floor);
    if retry_budget_floor > MAX_RETRY_BUDGET_FLOOR {
        return Err(v.err(
            "proxy.retry_budget_floor",
            format!("{retry_budget_floor} is not between 0 and {MAX_RETRY_BUDGET_FLOOR} (retries per second)"),
        ));
    }
    Ok(ProxyConfig {
        buffering,
        retries,
        retry_body_limit,
        retry_timeouts: raw.retry_timeouts.unwrap_or(d.retry_timeouts),
        retry_budget,
        retry_budget_floor,
        hold_timeout,
        max_held,
        http2_max_concurrent_streams,
        http2_keepalive_interval: bounded(
            "http2_keepalive_interval",
            raw.http2_keepalive_interval.as_deref(),
            d.http2_keepalive_interval,
            Duration::from_secs(3600),
        )?,
        http2_keepalive_timeout: bounded(
            "http2_keepalive_timeout",
            raw.http2_keepalive_timeout.as_deref(),
            d.http2_keepalive_timeout,
            Duration::from_secs(600),
        )?,
        tunnel_idle_timeout: bounded(
            "tunnel_idle_timeout",
            raw.tunnel_idle_timeout.as_deref(),
            d.tunnel_idle_timeout,
            Duration::from_secs(7 * 24 * 3600),
        )?,
        upstream_keepalive_timeout: bounded(
            "upstream_keepalive_timeout",
            raw.upstream_keepalive_timeout.as_deref(),
            d.upstream_keepalive_timeout,
            Duration::from_secs(3600),
        )?,
        client_header_timeout: duration(
            "client_header_timeout",
            raw.client_header_timeout.as_deref(),
            d.client_header_timeout,
        )?,
        keepalive_timeout: duration(
            "keepalive_timeout",
            raw.keepalive_timeout.as_deref(),
            d.keepalive_timeout,
        )?,
        connect_timeout: duration(
            "connect_timeout",
            raw.connect_timeout.as_deref(),
            d.connect_timeout,
        )?,
        response_timeout: duration(
            "response_timeout",
            raw.response_timeout.as_deref(),
            d.response_timeout,
        )?,
        body_idle_timeout: duration(
            "body_idle_timeout",
            raw.body_idle_timeout.as_deref(),
            d.body_idle_timeout,
        )?,
        max_body_size,
        max_header_size,
        max_connections,
        trusted_proxies,
        down_period: duration("fail_timeout", raw.fail_timeout.as_deref(), d.down_period)?,
        access_log: raw.access_log.unwrap_or(d.access_log),
        workers: match raw.workers {
            None => d.workers,
            Some(n @ 1..=256) => n,
            Some(n) => return Err(v.err("proxy.workers", format!("{n} is not between 1 and 256"))),
        },
    })
}

/// Largest memory share of one request or answer (`proxy.request_buffer`,
/// `proxy.response_buffer`).
const MAX_MESSAGE_BUFFER: u64 = 64 * 1024 * 1024;
/// Largest `proxy.buffer_memory`.
const MAX_BUFFER_MEMORY: u64 = 64 * 1024 * 1024 * 1024;
/// Largest `proxy.buffer_disk` and `proxy.max_response_file`.
const MAX_BUFFER_DISK: u64 = 16 * 1024 * 1024 * 1024 * 1024;

fn validate_buffering(v: &Validator, raw: &RawProxy) -> Result<rolld_proxy::BufferConfig, String> {
    let d = rolld_proxy::BufferConfig::default();
    let size = |key: &str, value: &Option<RawSize>, default: u64, min: u64, max: u64| {
        let path = format!("proxy.{key}");
        let n = match value {
            None => return Ok(default),
            Some(size) => parse_size(v, &path, size.clone())?,
        };
        if !(min..=max).contains(&n) {
            return Err(v.err(
                &path,
                format!("{n} bytes is not between {} and {}", human(min), human(max)),
            ));
        }
        Ok(n)
    };
    let request_buffer = size(
        "request_buffer",
        &raw.request_buffer,
        d.request_buffer as u64,
        1024,
        MAX_MESSAGE_BUFFER,
    )? as usize;
    let response_buffer = size(
        "response_buffer",
        &raw.response_buffer,
        d.response_buffer as u64,
        1024,
        MAX_MESSAGE_BUFFER,
    )? as usize;
    let memory = size(
        "buffer_memory",
        &raw.buffer_memory,
        d.memory,
        1024 * 1024,
        MAX_BUFFER_MEMORY,
    )?;
    let disk = size(
        "buffer_disk",
        &raw.buffer_disk,
        d.disk,
        1024 * 1024,
        MAX_BUFFER_DISK,
    )?;
    // 0: answers never go to disk; beyond memory the app is read at the client's pace.
    let max_response_file = size(
        "max_response_file",
        &raw.max_response_file,
        d.max_response_file.min(disk),
        0,
        disk,
    )?;
    let dir = match &raw.buffer_dir {
        None => d.dir,
        Some(text) => {
            let dir = v.own_path(text);
            if !dir.is_dir() {
                return Err(v.err(
                    "proxy.buffer_dir",
                    format!("{} is not a folder", dir.display()),
                ));
            }
            dir
        }
    };
    let mut unbuffered_paths = Vec::new();
    for path in raw.unbuffered_paths.iter().flatten() {
        if !path.starts_with('/') {
            return Err(v.err(
                "proxy.unbuffered_paths",
                format!("`{path}` is not a path (it must start with /)"),
            ));
        }
        unbuffered_paths.push(path.clone());
    }
    Ok(rolld_proxy::BufferConfig {
        enabled: raw.buffering.unwrap_or(d.enabled),
        request_buffer,
        response_buffer,
        memory,
        disk,
        max_response_file,
        dir,
        unbuffered_paths,
    })
}

/// A size as a person writes it: 64k, 1m, 16t.
fn human(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "t"),
        (1 << 30, "g"),
        (1 << 20, "m"),
        (1 << 10, "k"),
    ];
    for (unit, name) in UNITS {
        if n >= unit && n % unit == 0 {
            return format!("{}{name}", n / unit);
        }
    }
    n.to_string()
}

fn parse_size(v: &Validator, key: &str, raw: RawSize) -> Result<u64, String> {
    let text = match raw {
        RawSize::Bytes(n) => return Ok(n),
        RawSize::Text(text) => text,
    };
    let t = text.trim().to_ascii_lowercase();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t.as_str(), ""),
    };
    let unit: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        "t" | "tb" | "tib" => 1024 * 1024 * 1024 * 1024,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|_| unit > 0)
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            v.err(
                key,
                format!("`{text}` is not a size; write e.g. 512k, 10m, 1g (0: no limit)"),
            )
        })
}

fn validate_run_as(
    v: &Validator,
    user: Option<String>,
    group: Option<String>,
) -> Result<Option<RunAs>, String> {
    use nix::unistd::{Group, User};
    let Some(name) = user else {
        if group.is_some() {
            return Err(v.err("group", "needs `user` too"));
        }
        return Ok(None);
    };
    let found = User::from_name(&name)
        .map_err(|e| v.err("user", format!("cannot look up `{name}`: {e}")))?
        .ok_or_else(|| v.err("user", format!("no user `{name}` on this machine")))?;
    let gid = match group {
        None => found.gid,
        Some(group) => {
            Group::from_name(&group)
                .map_err(|e| v.err("group", format!("cannot look up `{group}`: {e}")))?
                .ok_or_else(|| v.err("group", format!("no group `{group}` on this machine")))?
                .gid
        }
    };
    Ok(Some(RunAs {
        user: name,
        uid: found.uid,
        gid,
    }))
}

fn validate_worksets(v: &Validator, sets: &[Vec<u16>]) -> Result<(), String> {
    if sets.len() < 2 {
        return Err(v.err(
            "app-servers.workset",
            format!(
                "has {} set(s); rolld alternates between sets, so give at least two",
                sets.len()
            ),
        ));
    }
    let mut seen = BTreeMap::new();
    for (i, set) in sets.iter().enumerate() {
        let at = format!("app-servers.workset[{i}].numprocs");
        if set.is_empty() {
            return Err(v.err(&at, "has no ports"));
        }
        for (j, &port) in set.iter().enumerate() {
            if port == 0 {
                return Err(v.err(&format!("{at}[{j}]"), "port 0 is not a port"));
            }
            if let Some(first) = seen.insert(port, i) {
                return Err(v.err(
                    &format!("{at}[{j}]"),
                    format!("port {port} appears twice (workset[{first}] and workset[{i}]); every process needs its own port"),
                ));
            }
        }
    }
    Ok(())
}

fn check_request_path(v: &Validator, key: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(v.err(
            key,
            format!("`{path}` is not a request path; write e.g. /health"),
        ));
    }
    Ok(())
}

fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let (a, b) = text.split_once('-')?;
    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
    (a > 0 && a <= b).then_some(a..=b)
}

fn parse_signal(name: &str) -> Option<Signal> {
    let name = name.trim().to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse().ok()
}

/// The original's `'K=V K2=V2'` string, or a map.
fn parse_environment(
    v: &Validator,
    value: Option<serde_yaml::Value>,
) -> Result<Vec<(String, String)>, String> {
    use serde_yaml::Value;
    let key = "app-servers.environment";
    let mut vars = Vec::new();
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(line)) => {
            let words = shell_words::split(&line)
                .map_err(|e| v.err(key, format!("cannot split `{line}`: {e}")))?;
            for word in words {
                let (k, val) = word
                    .split_once('=')
                    .ok_or_else(|| v.err(key, format!("`{word}` is not KEY=VALUE")))?;
                vars.push((k.to_string(), val.to_string()));
            }
        }
        Some(Value::Mapping(map)) => {
            for (k, val) in map {
                let k = match k {
                    Value::String(s) => s,
                    other => {
                        return Err(v.err(key, format!("variable names are strings, not {other:?}")))
                    }
                };
                let val = match val {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(v.err(
                            &format!("{key}.{k}"),
                            "a value is a string, number or boolean",
                        ))
                    }
                };
                vars.push((k, val));
            }
        }
        Some(_) => return Err(v.err(key, "write a map (KEY: value) or a string 'K=V K2=V2'")),
    }
    for (k, _) in &vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(v.err(key, format!("`{k}` is not a variable name")));
        }
    }
    Ok(vars)
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.http {
            None => write!(f, "port accepts connections")?,
            Some(h) => write!(
                f,
                "port accepts connections, then GET {} answers {}",
                h.path, h.status
            )?,
        }
        write!(
            f,
            "; probe timeout {}, every {}, start timeout {}",
            humantime::format_duration(self.timeout),
            humantime::format_duration(self.interval),
            humantime::format_duration(self.start_timeout)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/rolld/rolld.yml"), Path::new("/srv"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_original_format_parses_unchanged() {
        let c = parse(ORIGINAL).expect("original config is valid");
        assert_eq!(c.listen, None);
        assert_eq!(
            c.app.ports,
            PortPlan::Worksets(vec![
                vec![8001, 8002, 8003, 8004],
                vec![8501, 8502, 8503, 8504]
            ])
        );
        assert_eq!(c.app.directory, Path::new("/srv/app"));
        assert_eq!(
            c.app.stdout.as_deref(),
            Some(Path::new("/srv/app/logs/tornado-{numproc}.log"))
        );
        assert_eq!(
            c.app.smoke_tests,
            vec![SmokeTest::CheckAllHttpPorts(HttpCheck {
                path: "/".into(),
                status: Statuses::success_or_redirect()
            })]
        );
        assert_eq!(
            c.app.after_start,
            vec![
                Action::ReplaceFile {
                    template: "/srv/nginx.conf.templ".into(),
                    output: "/srv/nginx.conf".into()
                },
                Action::RunProc {
                    command: "nginx -s reload".into()
                }
            ]
        );
        assert_eq!(c.workdir, Path::new("/srv"));
        assert_eq!(
            c.command_for(8001),
            vec!["/srv/app/../env/bin/python", "app.py", "8001"]
        );
        assert!(c.app.environment.is_empty());
    }

    #[test]
    fn original_paths_resolve_like_the_original() {
        // A relative `directory` is relative to where rolld runs; logs to `directory`;
        // rolld's own `control_socket` to the config file's folder.
        let c = parse(&ORIGINAL.replace("'/srv/app'", "'app'").replace(
            "app-servers:",
            "control_socket: run/rolld.sock\napp-servers:",
        ))
        .expect("valid");
        assert_eq!(c.app.directory, Path::new("/srv/app"));
        assert_eq!(
            c.app.stderr.as_deref(),
            Some(Path::new("/srv/app/logs/tornado-{numproc}.err"))
        );
        assert_eq!(c.control_socket(), Path::new("/etc/rolld/run/rolld.sock"));
        let absolute = parse(&ORIGINAL.replace("'logs/tornado-{numproc}.log'", "'/var/log/t.log'"))
            .expect("valid");
        assert_eq!(
            absolute.app.stdout.as_deref(),
            Some(Path::new("/var/log/t.log"))
        );
        // Without `directory`, processes run beside the config file.
        let c = parse(&ORIGINAL.replace("  directory: '/srv/app'\n", "")).expect("valid");
        assert_eq!(c.app.directory, Path::new("/etc/rolld"));
    }

    #[test]
    fn realpath_cleans_dots_and_resolves_what_exists() {
        let dir = tempfile::tempdir().expect("temp dir");
        let real = std::fs::canonicalize(dir.path()).expect("real");
        std::fs::create_dir(real.join("a")).expect("a");
        std::os::unix::fs::symlink(real.join("a"), real.join("link")).expect("symlink");
        assert_eq!(realpath(&real.join("a/../a/./x.log")), real.join("a/x.log"));
        assert_eq!(realpath(&real.join("link/new/../y")), real.join("a/y"));
        assert_eq!(
            realpath(Path::new("/nonexistent-rolld/a/../b/./c")),
            Path::new("/nonexistent-rolld/b/c")
        );
    }

    #[test]
    fn smoke_test_statuses_default_to_2xx_and_3xx_and_can_be_set() {
        let c = parse(&ORIGINAL.replace(
            "- check_all_http_ports: numprocs",
            "- check_all_http_ports: numprocs\n      path: /login\n      status: [200, 302, 5xx, 400-404]",
        ))
        .expect("valid");
        let SmokeTest::CheckAllHttpPorts(check) = &c.app.smoke_tests[0];
        assert_eq!(check.path, "/login");
        for (status, accepted) in [
            (200, true),
            (201, false),
            (302, true),
            (301, false),
            (503, true),
            (404, true),
            (405, false),
        ] {
            assert_eq!(check.status.accepts(status), accepted, "{status}");
        }
        assert_eq!(check.status.to_string(), "200, 302, 5xx, 400-404");
        let default = Statuses::success_or_redirect();
        assert!(default.accepts(200) && default.accepts(302) && default.accepts(399));
        assert!(!default.accepts(404) && !default.accepts(500) && !default.accepts(199));
        assert_eq!(default.to_string(), "2xx, 3xx");
        assert_error(
            &ORIGINAL.replace(
                "- check_all_http_ports: numprocs",
                "- check_all_http_ports: numprocs\n      status: 7xx",
            ),
            &["line 12", "app-servers.smoke_test[0].status", "100 to 599"],
        );
    }

    #[test]
    fn errors_found_after_parsing_name_their_exact_line() {
        // The duplicate is in the second workset, on line 9, not the first's line 8.
        assert_error(
            &ORIGINAL.replace("8502", "8002"),
            &[
                "line 9:",
                "workset[1].numprocs[1]",
                "port 8002 appears twice",
            ],
        );
        // The second replace_file is wrong; the first is fine.
        let two = ORIGINAL.replace(
            "    - run_proc: 'nginx -s reload'\n",
            "    - replace_file: [numprocs, 'a.templ']\n    - run_proc: 'nginx -s reload'\n",
        );
        assert_error(&two, &["line 14:", "after_start[1].replace_file"]);
        // A flow-style mapping.
        assert_error(
            &ORIGINAL.replace(
                "  smoke_test:",
                "  health: {path: /health, timeout: soon}\n  smoke_test:",
            ),
            &["line 10:", "app-servers.health.timeout", "soon"],
        );
        // A value over several lines: the line of its key.
        assert_error(
            &ORIGINAL.replace(
                "  workset:",
                "  health:\n    path: /\n    interval: 0s\n  workset:",
            ),
            &["line 9:", "app-servers.health.interval", "longer than zero"],
        );
    }

    #[test]
    fn rollout_is_read_with_defaults_and_bounded() {
        let base = "listen: 127.0.0.1:8000\napp-servers:\n  cmd: 'app {port}'\n  processes: 2\n";
        let c = parse(base).expect("valid");
        assert_eq!(c.app.rollout, None, "no section, no rollout guard");
        let c = parse(&format!(
            "{base}  rollout:\n    canary: 10%\n    bake: 5s\n"
        ))
        .expect("valid");
        assert_eq!(
            c.app.rollout,
            Some(Rollout {
                canary: Some((100_000, Duration::from_secs(30))),
                bake: Duration::from_secs(5),
                max_error_rate: 0.02,
                min_requests: 50,
            })
        );
        for (bad, needles) in [
            (
                "    canary: 100%\n",
                &["line 6", "rollout.canary", "below 100%"][..],
            ),
            (
                "    canary: ten\n",
                &["line 6", "rollout.canary", "not a share"],
            ),
            ("    max_error_rate: 101%\n", &["line 6", "max_error_rate"]),
            ("    min_requests: 0\n", &["line 6", "min_requests"]),
            ("    bake: 2y\n", &["line 6", "rollout.bake"]),
            (
                "    canary_for: 5s\n",
                &["line 6", "canary_for", "only with `canary`"],
            ),
            ("    colour: red\n", &["colour"]),
        ] {
            let err = parse(&format!("{base}  rollout:\n{bad}")).expect_err(bad);
            for needle in needles {
                assert!(err.contains(needle), "{bad}: `{err}` lacks `{needle}`");
            }
        }
        let err = parse(&format!("{}  rollout:\n    canary: 5%\n", &base[23..]))
            .expect_err("canary without listen");
        assert!(err.contains("needs the built-in proxy"), "{err}");
    }

    #[test]
    fn buffering_is_on_by_default_and_its_sizes_are_bounded() {
        let c = parse(ORIGINAL).expect("valid");
        assert_eq!(c.proxy.buffering, rolld_proxy::BufferConfig::default());
        assert!(c.proxy.buffering.enabled, "on by default, as nginx");
        let dir = tempfile::tempdir().expect("dir");
        let c = parse(&format!(
            "proxy:\n  buffering: false\n  request_buffer: 16k\n  response_buffer: 1m\n  buffer_memory: 256m\n  buffer_disk: 2g\n  max_response_file: 0\n  buffer_dir: {}\n  unbuffered_paths: [/events, /upload/live]\n{ORIGINAL}",
            dir.path().display()
        ))
        .expect("valid");
        let b = &c.proxy.buffering;
        assert!(!b.enabled);
        assert_eq!(b.request_buffer, 16 * 1024);
        assert_eq!(b.response_buffer, 1 << 20);
        assert_eq!(b.memory, 256 << 20);
        assert_eq!(b.disk, 2 << 30);
        assert_eq!(b.max_response_file, 0);
        assert_eq!(b.dir, realpath(dir.path()));
        assert_eq!(b.unbuffered_paths, vec!["/events", "/upload/live"]);
        for (bad, needles) in [
            (
                "request_buffer: 100",
                &["line 2", "proxy.request_buffer", "between 1k and 64m"][..],
            ),
            (
                "response_buffer: 1g",
                &["line 2", "proxy.response_buffer", "between 1k and 64m"],
            ),
            (
                "buffer_memory: 10k",
                &["line 2", "proxy.buffer_memory", "between 1m and 64g"],
            ),
            (
                "buffer_disk: 100t",
                &["line 2", "proxy.buffer_disk", "between 1m and 16t"],
            ),
            (
                "buffer_disk: lots",
                &["line 2", "proxy.buffer_disk", "not a size"],
            ),
            (
                "max_response_file: 2g",
                &["line 2", "proxy.max_response_file", "between 0 and 1g"],
            ),
            (
                "buffer_dir: /nonexistent/rolld",
                &["line 2", "proxy.buffer_dir", "not a folder"],
            ),
            (
                "unbuffered_paths: [events]",
                &["line 2", "proxy.unbuffered_paths", "must start with /"],
            ),
            ("buffering: sometimes", &["buffering"]),
            (
                "max_body_size: 2g",
                &[
                    "line 2",
                    "proxy.max_body_size",
                    "larger than proxy.buffer_disk (1g)",
                ],
            ),
        ] {
            assert_error(&format!("proxy:\n  {bad}\n{ORIGINAL}"), needles);
        }
    }

    #[test]
    fn durations_and_counts_are_bounded() {
        assert_error(
            &format!("{ORIGINAL}  drain_timeout: 10000000000000000000s\n"),
            &["line 15", "drain_timeout"],
        );
        assert_error(
            &format!("{ORIGINAL}  stop_timeout: 400days\n"),
            &["line 15", "stop_timeout", "longer than a year"],
        );
        assert_error(
            &format!("proxy: {{response_timeout: 9999999999999s}}\n{ORIGINAL}"),
            &["line 1", "proxy.response_timeout"],
        );
        assert_error(
            &format!("proxy:\n  max_connections: 99999999999\n{ORIGINAL}"),
            &["line 2", "proxy.max_connections"],
        );
    }

    #[test]
    fn new_keys_parse() {
        let c = parse(
            "listen: 127.0.0.1:8080
app-servers:
  cmd: './app --port {port}'
  environment: {A: b, N: 3}
  health: {path: /health, status: 204, timeout: 1s, interval: 50ms, start_timeout: 5s}
  drain_timeout: 2s
  stop_signal: INT
  stop_timeout: 3s
  balance: round_robin
  processes: 3
  port_range: 30000-30010
",
        )
        .expect("valid");
        assert_eq!(c.listen, Some("127.0.0.1:8080".parse().expect("addr")));
        assert_eq!(
            c.app.environment,
            vec![("A".into(), "b".into()), ("N".into(), "3".into())]
        );
        assert_eq!(
            c.app.health.http,
            Some(HttpCheck {
                path: "/health".into(),
                status: Statuses::exactly(204)
            })
        );
        assert_eq!(c.app.stop_signal, Signal::SIGINT);
        assert_eq!(
            c.app.ports,
            PortPlan::Pick {
                count: 3,
                range: 30000..=30010
            }
        );
        assert_eq!(c.app.balance, Balance::RoundRobin);
    }

    #[test]
    fn http2_tunnel_and_upstream_keepalive_limits_parse_and_are_bounded() {
        let c = parse(&format!(
            "proxy:\n  http2_max_concurrent_streams: 50\n  http2_keepalive_interval: 10s\n  http2_keepalive_timeout: 5s\n  tunnel_idle_timeout: 10m\n  upstream_keepalive_timeout: 3s\n{ORIGINAL}"
        ))
        .expect("valid");
        assert_eq!(c.proxy.upstream_keepalive_timeout, Duration::from_secs(3));
        let d = parse(ORIGINAL).expect("valid");
        assert_eq!(d.proxy.upstream_keepalive_timeout, Duration::from_secs(60));
        assert_error(
            &format!("proxy:\n  upstream_keepalive_timeout: 2h\n{ORIGINAL}"),
            &[
                "line 2",
                "proxy.upstream_keepalive_timeout",
                "between 1s and 1h",
            ],
        );
        assert_eq!(c.proxy.http2_max_concurrent_streams, 50);
        assert_eq!(c.proxy.http2_keepalive_interval, Duration::from_secs(10));
        assert_eq!(c.proxy.http2_keepalive_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(600));
        assert_error(
            &format!("proxy:\n  http2_max_concurrent_streams: 0\n{ORIGINAL}"),
            &["line 2", "http2_max_concurrent_streams"],
        );
        assert_error(
            &format!("proxy:\n  workers: 1\n  tunnel_idle_timeout: 30days\n{ORIGINAL}"),
            &[
                "line 3",
                "proxy.tunnel_idle_timeout",
                "between 1s and 7days",
            ],
        );
        assert_error(
            &format!("proxy: {{http2_keepalive_timeout: 100ms}}\n{ORIGINAL}"),
            &["line 1", "proxy.http2_keepalive_timeout"],
        );
    }

    #[test]
    fn retry_settings_parse_and_are_bounded() {
        let c = parse(ORIGINAL).expect("valid");
        assert_eq!(c.proxy.retries, 2);
        assert_eq!(c.proxy.retry_body_limit, 64 * 1024);
        assert!(!c.proxy.retry_timeouts, "off by default");
        assert!((c.proxy.retry_budget - 0.2).abs() < 1e-9);
        assert_eq!(c.proxy.retry_budget_floor, 10);
        let c = parse(&format!(
            "proxy:\n  retries: 0\n  retry_body_limit: 1m\n  retry_timeouts: true\n  retry_budget: 5%\n  retry_budget_floor: 0\n{ORIGINAL}"
        ))
        .expect("valid");
        assert_eq!(c.proxy.retries, 0);
        assert_eq!(c.proxy.retry_body_limit, 1024 * 1024);
        assert!(c.proxy.retry_timeouts);
        assert!((c.proxy.retry_budget - 0.05).abs() < 1e-9);
        assert_eq!(c.proxy.retry_budget_floor, 0);
        for (yaml, expected) in [
            (
                "  retries: 11\n",
                &["line 2", "proxy.retries", "between 0 and 10"][..],
            ),
            ("  retries: -1\n", &["proxy", "retries"][..]),
            (
                "  retry_body_limit: 17m\n",
                &["line 2", "proxy.retry_body_limit", "at most 16m"][..],
            ),
            (
                "  retry_body_limit: lots\n",
                &["line 2", "proxy.retry_body_limit"][..],
            ),
            (
                "  retry_budget: 120%\n",
                &["line 2", "proxy.retry_budget", "from 0% to 100%"][..],
            ),
            (
                "  retry_budget: some\n",
                &["line 2", "proxy.retry_budget", "e.g. 20%"][..],
            ),
            (
                "  retry_budget_floor: 20000\n",
                &["line 2", "proxy.retry_budget_floor", "between 0 and 10000"][..],
            ),
            ("  retry_timeouts: sometimes\n", &["retry_timeouts"][..]),
        ] {
            assert_error(&format!("proxy:\n{yaml}{ORIGINAL}"), expected);
        }
    }

    #[test]
    fn hold_settings_parse_and_are_bounded() {
        let c = parse(&format!(
            "proxy:\n  hold_timeout: 2s\n  max_held: 50\n{ORIGINAL}"
        ))
        .expect("valid");
        assert_eq!(c.proxy.hold_timeout, Duration::from_secs(2));
        assert_eq!(c.proxy.max_held, 50);
        let c = parse(&format!("proxy:\n  hold_timeout: 0s\n{ORIGINAL}")).expect("valid");
        assert_eq!(c.proxy.hold_timeout, Duration::ZERO, "0 turns holding off");
        let c = parse(ORIGINAL).expect("valid");
        assert_eq!(c.proxy.hold_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.max_held, 1024);
        assert_error(
            &format!("proxy:\n  workers: 1\n  hold_timeout: 1h\n{ORIGINAL}"),
            &["line 3", "proxy.hold_timeout", "at most 10m"],
        );
        assert_error(
            &format!("proxy:\n  hold_timeout: soon\n{ORIGINAL}"),
            &["line 2", "proxy.hold_timeout", "not a duration"],
        );
        assert_error(
            &format!("proxy:\n  max_held: 0\n{ORIGINAL}"),
            &["line 2", "proxy.max_held", "between 1 and 100000"],
        );
        assert_error(
            &format!("proxy:\n  max_held: 1000000\n{ORIGINAL}"),
            &["line 2", "proxy.max_held"],
        );
    }

    #[test]
    fn environment_string_form_splits_into_pairs() {
        let c = parse(&ORIGINAL.replace("environment: ''", "environment: 'A=1 B=\"two words\"'"))
            .expect("valid");
        assert_eq!(
            c.app.environment,
            vec![("A".into(), "1".into()), ("B".into(), "two words".into())]
        );
    }

    fn assert_error(text: &str, wanted: &[&str]) {
        let err = parse(text).expect_err("config must be refused");
        for w in wanted {
            assert!(err.contains(w), "error `{err}` should mention `{w}`");
        }
    }

    #[test]
    fn tls_settings_are_checked_before_any_file_is_read() {
        let tls = |body: &str| format!("listen: 127.0.0.1:8080\ntls:\n{body}{ORIGINAL}");
        let certs = "  certificates:\n    - {cert: /nonexistent/a.pem, key: /nonexistent/a.key}\n";
        assert_error(
            &tls(&format!("  listen: nowhere\n{certs}")),
            &["tls.listen", "line 3", "not an address"],
        );
        assert_error(
            &tls(&format!("  listen: 127.0.0.1:8080\n{certs}")),
            &["tls.listen", "the same port as `listen`"],
        );
        assert_error(
            &tls("  listen: 127.0.0.1:8443\n  certificates: []\n"),
            &["tls.certificates", "at least one"],
        );
        assert_error(
            &tls(&format!("  listen: 127.0.0.1:8443\n{certs}")),
            &["tls.certificates[0]", "cannot read /nonexistent/a.pem"],
        );
        assert_error(
            &tls("  listen: 127.0.0.1:8443\n  certificates:\n    - {cert: a.pem}\n"),
            &["missing field `key`"],
        );
        assert_error(
            &tls(&format!("  listen: 127.0.0.1:8443\n  hsts: 3y\n{certs}")),
            &["tls.hsts", "longer than two years"],
        );
        assert_error(
            &tls(&format!(
                "  listen: 127.0.0.1:8443\n  handshake_timeout: 0s\n{certs}"
            )),
            &["tls.handshake_timeout", "longer than zero"],
        );
        let no_listen =
            format!("tls:\n  listen: 127.0.0.1:8443\n  redirect_http: true\n{certs}{ORIGINAL}");
        assert_error(&no_listen, &["tls.redirect_http", "needs `listen`"]);
    }

    #[test]
    fn bad_configs_name_the_key_and_line() {
        assert_error(
            &ORIGINAL.replace("  directory:", "  colour: red\n  directory:"),
            &["colour", "line 3"],
        );
        assert_error(&ORIGINAL.replace("8002", "'x'"), &["numprocs", "line 8"]);
        assert_error(
            &ORIGINAL.replace("    - numprocs: [8501, 8502, 8503, 8504]\n", ""),
            &["workset", "at least two", "line 7"],
        );
        assert_error(&ORIGINAL.replace(" {numproc}'", "'"), &["{port}", "line 2"]);
        assert_error(
            &ORIGINAL
                .replace("  drain_timeout", "")
                .replace("  stdout:", "  drain_timeout: soon\n  stdout:"),
            &["drain_timeout", "soon", "line 6"],
        );
        assert_error(
            &format!("listen: nowhere\n{ORIGINAL}"),
            &["listen", "line 1"],
        );
        assert_error(
            &ORIGINAL.replace("run_proc", "run_process"),
            &["run_process"],
        );
        assert_error(
            &ORIGINAL.replace(
                "check_all_http_ports: numprocs",
                "check_all_http_ports: ports",
            ),
            &["ports", "line 11", "smoke_test[0].check_all_http_ports"],
        );
        assert_error("app-servers: [1]\n", &["app-servers"]);
        assert_error(
            &ORIGINAL.replace("  workset:", "  processes: 2\n  workset:"),
            &["not both"],
        );
    }
}

/// The loader takes untrusted text: whatever it is given, it answers a config or an
/// error, never a panic. Cases derive from the original example, mutated, and from
/// arbitrary text; both bounded so the run takes seconds.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "\
listen: 127.0.0.1:8080
proxy: {response_timeout: 5s, max_body_size: 10m, trusted_proxies: [10.0.0.0/8]}
app-servers:
  cmd: '../env/bin/python app.py {numproc}'
  directory: 'app'
  environment: {A: 'p{port}'}
  stderr: 'logs/tornado-{numproc}.err'
  stdout: 'logs/tornado-{numproc}.log'
  workset:
    - numprocs: [8001, 8002]
    - numprocs: [8501, 8502]
  health: {path: /health, status: [200, 3xx], timeout: 1s}
  smoke_test:
    - check_all_http_ports: numprocs
      status: 2xx
  after_start:
    - replace_file: [numprocs, 'a.templ', 'a.conf']
    - run_proc: 'true'
  drain_timeout: 2s
";

    fn load(text: &str) {
        let _ = Config::parse(text, Path::new("/etc/rolld/rolld.yml"), Path::new("/srv"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn mutated_configs_never_panic(
            at in 0..BASE.len(),
            cut in 0usize..40,
            insert in "[ -~\n\t]{0,12}",
        ) {
            let at = (0..=at).rev().find(|&i| BASE.is_char_boundary(i)).unwrap_or(0);
            let end = (at + cut).min(BASE.len());
            let end = (end..=BASE.len()).find(|&i| BASE.is_char_boundary(i)).unwrap_or(BASE.len());
            load(&format!("{}{insert}{}", &BASE[..at], &BASE[end..]));
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            load(&text);
        }

        #[test]
        fn any_value_of_a_key_never_panics(
            key in prop::sample::select(vec![
                "drain_timeout", "stop_timeout", "stop_signal", "balance", "processes",
                "port_range", "cmd", "environment", "directory", "stdout",
            ]),
            proxy_key in prop::sample::select(vec![
                "client_header_timeout", "keepalive_timeout", "max_body_size",
                "max_header_size", "max_connections", "trusted_proxies", "workers",
                "hold_timeout", "max_held", "buffering", "request_buffer",
                "response_buffer", "buffer_memory", "buffer_disk", "max_response_file",
                "buffer_dir", "unbuffered_paths", "retries", "retry_body_limit",
                "retry_timeouts", "retry_budget", "retry_budget_floor",
            ]),
            value in "[ -~]{0,30}",
        ) {
            load(&format!("{BASE}  {key}: {value}\n"));
            load(&BASE.replacen("127.0.0.1:8080", &value, 1));
            load(&BASE.replacen("response_timeout: 5s", &format!("{proxy_key}: {value}"), 1));
        }
    }
}
