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
}

/// A byte size: a number, or a string with a k/m/g suffix as nginx writes them.
#[derive(Deserialize)]
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
    status: Option<u16>,
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
    pub app: AppServers,
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
    pub environment: Vec<(String, String)>,
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
    /// `GET /` on every port of the new set must answer 200.
    CheckAllHttpPorts,
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
    pub status: u16,
}

pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
const PLACEHOLDERS: [&str; 2] = ["{port}", "{numproc}"];

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Config::parse(&text, &path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let mut config = raw.validate(text, base).map_err(invalid)?;
        config.path = path.to_path_buf();
        Ok(config)
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

/// The line where `key` is first written as a mapping key, for error messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start().trim_start_matches("- ").trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

struct Validator<'a> {
    text: &'a str,
    base: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: &str, message: impl fmt::Display) -> String {
        let name = key.rsplit('.').next().unwrap_or(key);
        match line_of(self.text, name) {
            Some(line) => format!("line {line}: `{key}`: {message}"),
            None => format!("`{key}`: {message}"),
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
            Some(text) => humantime::parse_duration(text.trim()).map_err(|e| {
                self.err(
                    key,
                    format!("`{text}` is not a duration ({e}); write e.g. 500ms, 10s, 2m"),
                )
            }),
        }
    }

    fn path(&self, value: &str) -> PathBuf {
        self.base.join(value)
    }
}

impl RawConfig {
    fn validate(self, text: &str, base: &Path) -> Result<Config, String> {
        let v = Validator { text, base };
        let proxy = validate_proxy(&v, self.proxy)?;
        let run_as = validate_run_as(&v, self.user, self.group)?;
        let control_socket = self.control_socket.as_deref().map(|p| v.path(p));
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
                validate_worksets(&v, &sets)?;
                PortPlan::Worksets(sets)
            }
            (None, Some(count)) => {
                if count == 0 {
                    return Err(v.err("app-servers.processes", "must be at least 1"));
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
        if let (Some(listen), PortPlan::Worksets(sets)) = (listen, &ports) {
            if sets.iter().flatten().any(|&p| p == listen.port()) {
                return Err(v.err(
                    "listen",
                    format!("port {} is also in a workset", listen.port()),
                ));
            }
        }

        let directory = match app.directory.as_deref() {
            None => base.to_path_buf(),
            Some(dir) => v.path(dir),
        };
        let environment = parse_environment(&v, app.environment)?;

        let mut smoke_tests = Vec::new();
        for (i, test) in app.smoke_test.into_iter().enumerate() {
            match test.check_all_http_ports.as_deref() {
                Some("numprocs") => smoke_tests.push(SmokeTest::CheckAllHttpPorts),
                Some(other) => {
                    return Err(v.err(
                        "check_all_http_ports",
                        format!("smoke_test[{i}]: `{other}` is not known; the ports to check are `numprocs`"),
                    ))
                }
                None => return Err(v.err("smoke_test", format!("smoke_test[{i}] is empty; write `- check_all_http_ports: numprocs`"))),
            }
        }

        let mut after_start = Vec::new();
        for (i, action) in app.after_start.into_iter().enumerate() {
            let action = match (action.replace_file, action.run_proc) {
                (Some(args), None) => match args.as_slice() {
                    [what, template, output] if what == "numprocs" => Action::ReplaceFile {
                        template: v.path(template),
                        output: v.path(output),
                    },
                    _ => {
                        return Err(v.err(
                            "replace_file",
                            format!("after_start[{i}]: write `replace_file: [numprocs, TEMPLATE, OUTPUT]`"),
                        ))
                    }
                },
                (None, Some(command)) if !command.trim().is_empty() => Action::RunProc { command },
                (None, Some(_)) => return Err(v.err("run_proc", format!("after_start[{i}]: the command is empty"))),
                _ => {
                    return Err(v.err(
                        "after_start",
                        format!("after_start[{i}]: each action is one of `replace_file: [...]` or `run_proc: COMMAND`"),
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
                if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(v.err(
                        "app-servers.health.path",
                        format!("`{path}` is not a request path; write e.g. /health"),
                    ));
                }
                let status = h.status.unwrap_or(200);
                if !(100..=599).contains(&status) {
                    return Err(v.err(
                        "app-servers.health.status",
                        format!("{status} is not an HTTP status"),
                    ));
                }
                let health = Health {
                    http: Some(HttpCheck { path, status }),
                    timeout: v.duration(
                        "health.timeout",
                        h.timeout.as_deref(),
                        DEFAULT_HEALTH_TIMEOUT,
                    )?,
                    interval: v.duration(
                        "health.interval",
                        h.interval.as_deref(),
                        DEFAULT_HEALTH_INTERVAL,
                    )?,
                    start_timeout: v.duration(
                        "health.start_timeout",
                        h.start_timeout.as_deref(),
                        DEFAULT_START_TIMEOUT,
                    )?,
                };
                for (key, d) in [
                    ("health.timeout", health.timeout),
                    ("health.interval", health.interval),
                    ("health.start_timeout", health.start_timeout),
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

        Ok(Config {
            path: PathBuf::new(), // set by `Config::parse`, which knows the file
            listen,
            proxy,
            run_as,
            control_socket,
            admin,
            app: AppServers {
                cmd: app.cmd,
                argv,
                directory,
                environment,
                stdout: app.stdout.as_deref().map(|p| v.path(p)),
                stderr: app.stderr.as_deref().map(|p| v.path(p)),
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
            },
        })
    }
}

fn validate_proxy(v: &Validator, raw: Option<RawProxy>) -> Result<ProxyConfig, String> {
    let d = ProxyConfig::default();
    let Some(raw) = raw else { return Ok(d) };
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
    if max_connections == 0 {
        return Err(v.err("proxy.max_connections", "must be at least 1"));
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
    Ok(ProxyConfig {
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
        if set.is_empty() {
            return Err(v.err("numprocs", format!("workset[{i}] has no ports")));
        }
        for &port in set {
            if port == 0 {
                return Err(v.err("numprocs", format!("workset[{i}]: port 0 is not a port")));
            }
            if let Some(first) = seen.insert(port, i) {
                return Err(v.err(
                    "numprocs",
                    format!("port {port} appears twice (workset[{first}] and workset[{i}]); every process needs its own port"),
                ));
            }
        }
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
                            key,
                            format!("`{k}`: a value is a string, number or boolean"),
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
        Config::parse(text, Path::new("/etc/rolld/rolld.yml")).map_err(|e| e.to_string())
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
            Some(Path::new("/etc/rolld/logs/tornado-{numproc}.log"))
        );
        assert_eq!(c.app.smoke_tests, vec![SmokeTest::CheckAllHttpPorts]);
        assert_eq!(c.app.after_start.len(), 2);
        assert_eq!(
            c.command_for(8001),
            vec!["/srv/app/../env/bin/python", "app.py", "8001"]
        );
        assert!(c.app.environment.is_empty());
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
                status: 204
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
    fn bad_configs_name_the_key_and_line() {
        assert_error(
            &ORIGINAL.replace("  directory:", "  colour: red\n  directory:"),
            &["colour", "line 3"],
        );
        assert_error(&ORIGINAL.replace("8002", "'x'"), &["numprocs", "line 8"]);
        assert_error(
            &ORIGINAL.replace("8502", "8002"),
            &["port 8002 appears twice", "line 8"],
        );
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
            &["ports", "line 11"],
        );
        assert_error("app-servers: [1]\n", &["app-servers"]);
        assert_error(
            &ORIGINAL.replace("  workset:", "  processes: 2\n  workset:"),
            &["not both"],
        );
    }
}
