//! rolld: restart a group of app-server processes gracefully, without losing a request.
//!
//! # Layout
//! - `main`: arguments, logging, and the one place that prints an error and picks the
//!   exit code (2: bad config or usage, 1: runtime failure).
//! - [`config`]: the YAML file, parsed and validated into a typed [`config::Config`].
//! - [`supervisor`]: owns the state; turns commands into rolls and shutdown.
//! - [`rolling`]: one roll as named steps; the only caller of the upstream swap.
//! - [`rollout`]: the guard after the switch: canary, bake, judging, rollback.
//! - [`generation`]: one set of processes, each with a keeper that restarts or stops it.
//! - [`health`]: readiness polling and smoke tests.
//! - [`actions`]: `after_start`: rendered upstream files and reload commands (nginx mode).
//! - [`connections`]: open TCP connections per port, for draining behind another balancer.
//! - [`process`]: spawning from one thread, reaping in one place (orphans too: rolld is
//!   a child subreaper, and may be PID 1), stopping what a process left running.
//! - [`tree`]: which processes belong to a started process (group, mark, descendants).
//! - [`cgroup`]: cgroup v2 mode, where a subtree is delegated to rolld.
//! - [`output`]: child stdout/stderr into prefixed log lines.
//! - [`guard`]: the process that kills every app if rolld itself is killed.
//! - [`signals`]: signals into commands.
//! - [`control`]: the control socket (`rolld reload`, `status`, `stop`, `pause`,
//!   `resume`, `maintenance`).
//! - [`status`]: what rolld is doing, for status and metrics.
//! - [`admin`]: `/metrics`, `/status`, `/healthz`.
//! - [`notify`]: systemd readiness notifications.
//! - [`tls`]: certificate files, read and checked for the proxy's TLS listener.
//! - [`logs`]: rolld's own output, through queues that drop rather than block.
//! - [`nginx_reload`]: when an nginx in front has finished a reload (nginx mode).
//!
//! Data flows one way: config -> supervisor -> generation -> proxy upstream set.

mod actions;
mod admin;
mod cgroup;
mod config;
mod connections;
mod control;
mod generation;
mod guard;
mod health;
mod logs;
mod nginx_reload;
mod notify;
mod output;
mod process;
mod rolling;
mod rollout;
mod signals;
mod status;
mod supervisor;
mod tls;
mod tree;
mod yaml_lines;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigHandler, Signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::config::{Action, Config, PortPlan, SmokeTest};

/// An error or warning for the operator, on stderr through the log queue (never blocks,
/// never panics).
macro_rules! say {
    ($($arg:tt)*) => {
        logs::send(
            logs::Stream::Stderr,
            format!("rolld: {}\n", format_args!($($arg)*)).into_bytes(),
        )
    };
}

/// A line of a CLI command's output on stdout; a closed stdout is ignored.
macro_rules! out {
    () => {
        logs::print("\n")
    };
    ($($arg:tt)*) => {
        logs::print(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// Like [`out!`], without the newline.
macro_rules! out_raw {
    ($($arg:tt)*) => {
        logs::print(&format!($($arg)*))
    };
}

/// Restart a group of app-server processes gracefully, without losing a request.
///
/// rolld starts your app processes (a command with a {port} placeholder), serves them
/// behind its built-in reverse proxy, and on SIGHUP rolls them: it starts a new set on
/// other ports, waits until it is healthy, swaps the proxy over, waits until the old set
/// has no request in flight, and stops it.
#[derive(Parser, Debug)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Config file to run (the same as `rolld run FILE`).
    config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace); RUST_LOG takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// How the control commands find a running rolld.
#[derive(clap::Args, Debug)]
struct Target {
    /// The config file the running rolld was started with (its control socket is found from it).
    #[arg(short, long, default_value = "rolld.yml")]
    config: PathBuf,
    /// The control socket, instead of finding it from the config file.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run in the foreground: start the processes, roll them on SIGHUP, stop on SIGTERM.
    Run {
        /// The config file (YAML).
        config: PathBuf,
    },
    /// Validate a config file and print the plan it resolves to; exit 0 if valid, 2 if not.
    Check {
        /// The config file (YAML).
        config: PathBuf,
    },
    /// Ask the running rolld to roll, print its progress, and exit 0 once the new set
    /// serves and the old one is stopped (non-zero, with the reason, if it rolled back).
    Reload {
        #[command(flatten)]
        target: Target,
        /// Return as soon as the roll is asked for.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the running rolld's processes, upstreams and rolls.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running rolld gracefully (as SIGTERM).
    Stop {
        #[command(flatten)]
        target: Target,
    },
    /// End the canary or bake in progress for the new set: it takes every request and
    /// the old set stops.
    Promote {
        #[command(flatten)]
        target: Target,
    },
    /// Switch back to the old set during a canary or bake: the new set drains and stops.
    Rollback {
        #[command(flatten)]
        target: Target,
    },
    /// Hold new requests (in-flight ones finish) and exit once nothing is in flight, so
    /// that a migration can run; `rolld resume` releases the held requests.
    Pause {
        #[command(flatten)]
        target: Target,
        /// The pause ends by itself after this (at most 1h).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// End a pause: the held requests go to the serving set, in arrival order.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Answer every request with 503 and a page (`on`), or stop doing so (`off`).
    /// Lasts across reloads, not across a restart of rolld.
    Maintenance {
        #[command(flatten)]
        target: Target,
        state: Switch,
        /// The page: a file ending in .html or .htm is served as HTML, any other as
        /// plain text (read by rolld, at most 1 MiB).
        #[arg(long)]
        page: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// jemalloc, for what a burst of clients costs afterwards: the memory that 10,000 requests
/// in flight at once needed goes back to the system within seconds, where the system
/// allocator kept it, fragmented over its per-thread arenas (measured: 291 MB kept, 128
/// MB even after `malloc_trim`; with jemalloc 57 MB, the 10,000 clients still connected).
/// The benchmark measures it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts: one background thread returns pages unused for
/// a second (`dirty_decay_ms`) and drops them at once after that (`muzzy_decay_ms: 0`),
/// so no request has to. Objects of 4 to 16 KiB come from 16 KiB slabs: by default an 8 KiB
/// object has a slab of its own, and the 8 KiB read buffer that each HTTP/1 connection
/// takes anew for nearly every request (the last one's bytes are still in use) made and
/// unmade a slab each time (measured: 770 of 40,500 instructions a request). One arena
/// (`narenas:1`) for all threads, not four per core: the proxy's workers allocate from
/// their thread caches, and each arena's partly used slabs cost RSS (measured: 0.6 MB idle,
/// both at start and after load; no change in instructions a request).
/// `_RJEM_MALLOC_CONF` in the environment overrides them.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static u8> = Some(
    &b"narenas:1,background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0,slab_sizes:4097-16384:4\0"[0],
);

fn main() -> ExitCode {
    // The guard is rolld's binary run again; it takes no part in the CLI.
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some(guard::SUBCOMMAND) {
        guard::run(&args.next().unwrap_or_default());
    }
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_format);
    // The default hook writes to stderr itself, and would block on a stalled one.
    std::panic::set_hook(Box::new(|info| {
        let trace = std::backtrace::Backtrace::capture();
        match trace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                tracing::error!(target: "rolld::panic", "{info}\n{trace}")
            }
            _ => tracing::error!(target: "rolld::panic", "{info}"),
        }
    }));
    let code = match (cli.command, cli.config) {
        (Some(Cmd::Check { config }), _) => check(&config),
        (Some(Cmd::Reload { target, no_wait }), _) => reload(&target, !no_wait),
        (Some(Cmd::Status { target, json }), _) => status(&target, json),
        (Some(Cmd::Stop { target }), _) => stop(&target),
        (Some(Cmd::Promote { target }), _) => command(&target, &control::Request::Promote),
        (Some(Cmd::Rollback { target }), _) => command(&target, &control::Request::Rollback),
        (Some(Cmd::Pause { target, timeout }), _) => pause(&target, timeout),
        (Some(Cmd::Resume { target }), _) => command(&target, &control::Request::Resume),
        (
            Some(Cmd::Maintenance {
                target,
                state,
                page,
            }),
            _,
        ) => maintenance(&target, state, page),
        (Some(Cmd::Run { config }), _) | (None, Some(config)) => run(&config),
        (None, None) => {
            say!("no config file given\n\nUsage: rolld [run] CONFIG | rolld check CONFIG\nSee `rolld --help`.");
            ExitCode::from(2)
        }
    };
    // What is still queued for stderr (the last log lines, an error), unless it stalls.
    logs::flush(std::time::Duration::from_secs(2));
    code
}

fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    // Never `std::io::stderr` directly: a stalled stderr would stop whatever logs, and
    // the formatter's own error report (`eprintln!`) panics on a closed one.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logs::Writer)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|err| {
        say!("{err}");
        ExitCode::from(2)
    })
}

/// The first set's ports, for rendering templates before any roll, and what they are.
fn first_ports(config: &Config) -> (Vec<u16>, &'static str) {
    match &config.app.ports {
        PortPlan::Worksets(sets) => (sets.first().cloned().unwrap_or_default(), "set 1"),
        PortPlan::Pick { count, range } => (
            (*range.start()..=*range.end()).take(*count).collect(),
            "example ports; the real ones are picked at each roll",
        ),
    }
}

/// Renders every `replace_file` template for the first set: a template that cannot
/// render is a config error, found before anything starts.
fn render_templates(config: &Config) -> Result<Vec<(PathBuf, String)>, String> {
    let (ports, _) = first_ports(config);
    let mut rendered = Vec::new();
    for action in &config.app.after_start {
        if let Action::ReplaceFile { template, output } = action {
            let text = actions::render(template, &ports, 1)
                .map_err(|why| format!("config {}: {why}", config.path.display()))?;
            rendered.push((output.clone(), text));
        }
    }
    Ok(rendered)
}

/// How rolld will keep its app processes together; a `cgroup` setting it cannot use is
/// a config error (exit 2).
fn containment(config: &Config) -> Result<cgroup::Mode, ExitCode> {
    cgroup::Mode::choose(config.cgroup.as_deref()).map_err(|why| {
        say!("config {}: {why}", config.path.display());
        ExitCode::from(2)
    })
}

fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let rendered = match render_templates(&config) {
        Ok(rendered) => rendered,
        Err(why) => {
            say!("{why}");
            return ExitCode::from(2);
        }
    };
    let mode = match containment(&config) {
        Ok(mode) => mode,
        Err(code) => return code,
    };
    out_raw!("{}", plan(&config));
    out!("containment:  {}", mode.describe());
    // Show what the balancer will get, rendered for the first set.
    let (_, which) = first_ports(&config);
    for (output, text) in rendered {
        out!("\n--- {} ({which}) ---", output.display());
        out_raw!("{text}");
        if !text.ends_with('\n') {
            out!();
        }
    }
    if let Some(warning) = rolling::port_range_warning(&config.app.ports) {
        say!("warning: {warning}");
    }
    ExitCode::SUCCESS
}

/// The resolved plan, as `rolld check` prints it.
fn plan(config: &Config) -> String {
    use std::fmt::Write;
    let app = &config.app;
    let mut out = String::new();
    let _ = writeln!(out, "config {} is valid", config.path.display());
    let _ = writeln!(
        out,
        "working dir:  {} (relative `directory`, `replace_file` and `run_proc` resolve here)",
        config.workdir.display()
    );
    match (config.listen, &config.tls) {
        (Some(addr), Some(tls)) if tls.redirect_http => {
            let _ = writeln!(
                out,
                "proxy:        HTTPS on {}, balance {}; {addr} redirects to HTTPS (308)",
                tls.listen, app.balance
            );
        }
        (Some(addr), Some(tls)) => {
            let _ = writeln!(
                out,
                "proxy:        listening on {addr} and HTTPS on {}, balance {}",
                tls.listen, app.balance
            );
        }
        (None, Some(tls)) => {
            let _ = writeln!(
                out,
                "proxy:        HTTPS on {}, balance {}",
                tls.listen, app.balance
            );
        }
        (Some(addr), None) => {
            let _ = writeln!(
                out,
                "proxy:        listening on {addr}, balance {}",
                app.balance
            );
        }
        (None, None) => {
            let _ = writeln!(
                out,
                "proxy:        none (no `listen`); another balancer is expected in front"
            );
        }
    }
    if let Some(tls) = &config.tls {
        let now = std::time::SystemTime::now();
        let hsts = tls.hsts.map_or_else(
            || "no HSTS".to_string(),
            |age| format!("HSTS max-age={}", age.as_secs()),
        );
        let _ = writeln!(
            out,
            "tls:          TLS 1.2 and 1.3, ALPN h2 and http/1.1, handshake timeout {}, {hsts}",
            humantime::format_duration(tls.handshake_timeout)
        );
        for (i, loaded) in tls.loaded.iter().enumerate() {
            let info = &loaded.info;
            let _ = writeln!(
                out,
                "certificate:  {}{}: {} (expires {}, in {} days)",
                info.cert.display(),
                if i == 0 { " (default)" } else { "" },
                info.names.join(", "),
                info.expires(),
                info.days_left(now)
            );
        }
    }
    if config.proxied() {
        let p = &config.proxy;
        let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
        let _ = writeln!(
            out,
            "timeouts:     client header {}, keep-alive {}, connect {}, response {}, body idle {}",
            d(p.client_header_timeout),
            d(p.keepalive_timeout),
            d(p.connect_timeout),
            d(p.response_timeout),
            d(p.body_idle_timeout)
        );
        let body = p
            .max_body_size
            .map_or_else(|| "unlimited".to_string(), |n| format!("{n} bytes"));
        let _ = writeln!(
            out,
            "limits:       body {body}, header {} bytes, {} connections, {} worker thread(s)",
            p.max_header_size, p.max_connections, p.workers
        );
        let _ = writeln!(
            out,
            "http/2:       {} streams per connection, PING every {} answered within {}; tunnels closed after {} idle",
            p.http2_max_concurrent_streams,
            d(p.http2_keepalive_interval),
            d(p.http2_keepalive_timeout),
            d(p.tunnel_idle_timeout)
        );
        let _ = writeln!(
            out,
            "upstreams:    idle connections kept up to {}, at most {} per process and worker",
            d(p.upstream_keepalive_timeout),
            rolld_proxy::MAX_IDLE_UPSTREAM_CONNECTIONS
        );
        if p.hold_timeout.is_zero() {
            let _ = writeln!(
                out,
                "hold:         off (503 at once while no process can take a request)"
            );
        } else {
            let _ = writeln!(
                out,
                "hold:         up to {} while no process can take a request, at most {} request(s)",
                d(p.hold_timeout),
                p.max_held
            );
        }
        let b = &p.buffering;
        if b.enabled {
            let opted_out = if b.unbuffered_paths.is_empty() {
                String::new()
            } else {
                format!("; streamed: {}", b.unbuffered_paths.join(", "))
            };
            let _ = writeln!(
                out,
                "buffering:    requests {} and answers {} bytes each in memory, {} bytes in all, then temporary files in {} (at most {} bytes, {} per answer){opted_out}",
                b.request_buffer,
                b.response_buffer,
                b.memory,
                b.dir.display(),
                b.disk,
                b.max_response_file
            );
        } else {
            let _ = writeln!(
                out,
                "buffering:    off (requests and answers stream both ways)"
            );
        }
        let trusted: Vec<String> = p.trusted_proxies.iter().map(|n| n.to_string()).collect();
        let trusted = if trusted.is_empty() {
            "none".to_string()
        } else {
            trusted.join(", ")
        };
        let _ = writeln!(
            out,
            "trusted:      {trusted}; access log {}",
            if p.access_log { "on" } else { "off" }
        );
    }
    let _ = writeln!(out, "control:      {}", config.control_socket().display());
    if let Some(admin) = config.admin {
        let _ = writeln!(out, "admin:        http://{admin}/metrics /status /healthz");
    }
    if let Some(run_as) = &config.run_as {
        let _ = writeln!(
            out,
            "run as:       {} (uid {}, gid {})",
            run_as.user, run_as.uid, run_as.gid
        );
    }
    let _ = writeln!(out, "command:      {}", app.cmd);
    let _ = writeln!(out, "directory:    {}", app.directory.display());
    if !app.environment.is_empty() {
        let vars: Vec<String> = app
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "environment:  {}", vars.join(" "));
    }
    let (first, _) = first_ports(config);
    for (name, path) in [("stdout", &app.stdout), ("stderr", &app.stderr)] {
        let target = match (path, first.first()) {
            (None, _) => format!("rolld's {name}, each line prefixed `PORT: `"),
            (Some(p), Some(&port))
                if config::fill(&p.display().to_string(), port) != p.display().to_string() =>
            {
                format!(
                    "{} (port {port}: {})",
                    p.display(),
                    config::fill(&p.display().to_string(), port)
                )
            }
            (Some(p), _) => p.display().to_string(),
        };
        let _ = writeln!(out, "{name}:       {target}");
    }
    match &app.ports {
        PortPlan::Worksets(sets) => {
            for (i, set) in sets.iter().enumerate() {
                let ports: Vec<String> = set.iter().map(u16::to_string).collect();
                let _ = writeln!(out, "set {}:        ports {}", i + 1, ports.join(", "));
            }
            if let Some(&port) = sets.first().and_then(|s| s.first()) {
                let _ = writeln!(
                    out,
                    "first cmd:    {}",
                    shell_words::join(config.command_for(port))
                );
            }
        }
        PortPlan::Pick { count, range } => {
            let _ = writeln!(
                out,
                "sets:         {count} process(es) on free ports picked from {}-{}",
                range.start(),
                range.end()
            );
        }
    }
    let _ = writeln!(out, "health:       {}", app.health);
    for test in &app.smoke_tests {
        match test {
            SmokeTest::CheckAllHttpPorts(check) => {
                let _ = writeln!(
                    out,
                    "smoke test:   check_all_http_ports (GET {} on every port answers {})",
                    check.path, check.status
                );
            }
        }
    }
    for action in &app.after_start {
        match action {
            Action::ReplaceFile { template, output } => {
                let _ = writeln!(
                    out,
                    "after start:  replace_file {} -> {}",
                    template.display(),
                    output.display()
                );
            }
            Action::RunProc { command } => {
                let _ = writeln!(
                    out,
                    "after start:  run_proc {command} (sh -c, in {})",
                    config.workdir.display()
                );
            }
        }
    }
    let waits_for = match (config.proxied(), app.after_start.is_empty()) {
        (true, true) => "in-flight requests of the old set",
        (true, false) => "in-flight requests of the old set, then its connections to close",
        (false, _) => "connections to the old set to close",
    };
    let _ = writeln!(
        out,
        "drain:        up to {} for {waits_for}",
        humantime::format_duration(app.drain_timeout)
    );
    let _ = writeln!(
        out,
        "stop:         {} to each process and what it started, SIGKILL after {}",
        app.stop_signal,
        humantime::format_duration(app.stop_timeout)
    );
    out
}

/// The control socket of the rolld that runs `target`.
fn socket_of(target: &Target) -> PathBuf {
    if let Some(socket) = &target.socket {
        return socket.clone();
    }
    // Read only `control_socket`, so that a config being edited still finds rolld.
    let path = std::path::absolute(&target.config).unwrap_or_else(|_| target.config.clone());
    let configured = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|yaml| yaml.get("control_socket")?.as_str().map(PathBuf::from));
    match configured {
        Some(socket) => path.parent().unwrap_or(Path::new("/")).join(socket),
        None => control::default_path(&path),
    }
}

fn reload(target: &Target, wait: bool) -> ExitCode {
    command(target, &control::Request::Reload { wait })
}

fn status(target: &Target, json: bool) -> ExitCode {
    let mut shown = false;
    let called = control::call(&socket_of(target), &control::Request::Status, |answer| {
        if let control::Answer::Error { message } = &answer {
            say!("{message}");
        }
        if let control::Answer::Status { status } = answer {
            shown = true;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                out_raw!("{}", status.render());
            }
        }
    });
    match called {
        Ok(()) if shown => ExitCode::SUCCESS,
        Ok(()) => {
            say!("no status in the answer");
            ExitCode::from(1)
        }
        Err(why) => {
            say!("{why}");
            ExitCode::from(1)
        }
    }
}

fn pause(target: &Target, timeout: std::time::Duration) -> ExitCode {
    if timeout < std::time::Duration::from_secs(1) || timeout > control::MAX_PAUSE {
        say!(
            "--timeout must be between 1s and {}",
            humantime::format_duration(control::MAX_PAUSE)
        );
        return ExitCode::from(2);
    }
    command(
        target,
        &control::Request::Pause {
            timeout_ms: timeout.as_millis() as u64,
        },
    )
}

fn maintenance(target: &Target, state: Switch, page: Option<PathBuf>) -> ExitCode {
    let request = match (state, page) {
        (Switch::Off, Some(_)) => {
            say!("--page goes with `maintenance on`");
            return ExitCode::from(2);
        }
        (Switch::Off, None) => control::Request::Maintenance {
            on: false,
            page: None,
        },
        // rolld reads the page: from wherever it runs, the path must name the same file.
        (Switch::On, page) => match page.map(std::path::absolute).transpose() {
            Ok(page) => control::Request::Maintenance { on: true, page },
            Err(e) => {
                say!("--page: {e}");
                return ExitCode::from(2);
            }
        },
    };
    command(target, &request)
}

/// Sends a request whose answer is progress lines and one `done` (`reload`, `pause`,
/// `maintenance`, `promote`, `rollback`); exits 0 if it says ok, 1 otherwise.
fn command(target: &Target, request: &control::Request) -> ExitCode {
    use control::Answer;
    let mut outcome = None;
    let called = control::call(&socket_of(target), request, |answer| match answer {
        // `reload --no-wait`: the roll is asked for, and that is the whole answer.
        Answer::Accepted => {
            out!("roll requested");
            outcome = Some(true);
        }
        Answer::Progress { message } => out!("{message}"),
        Answer::Done { ok, message } => {
            if ok {
                out!("{message}");
            } else {
                say!("{message}");
            }
            outcome = Some(ok);
        }
        Answer::Error { message } => {
            say!("{message}");
            outcome = Some(false);
        }
        Answer::Status { .. } => {}
    });
    match (called, outcome) {
        (Err(why), _) => {
            say!("{why}");
            ExitCode::from(1)
        }
        (Ok(()), Some(true)) => ExitCode::SUCCESS,
        (Ok(()), Some(false)) => ExitCode::from(1),
        (Ok(()), None) => {
            say!("the connection closed before rolld answered");
            ExitCode::from(1)
        }
    }
}

fn stop(target: &Target) -> ExitCode {
    let mut refused = false;
    let called = control::call(&socket_of(target), &control::Request::Stop, |answer| {
        if let control::Answer::Error { message } = answer {
            say!("{message}");
            refused = true;
        }
    });
    match called {
        Ok(()) if refused => ExitCode::from(1),
        Ok(()) => {
            out!("rolld is stopping");
            ExitCode::SUCCESS
        }
        Err(why) => {
            say!("{why}");
            ExitCode::from(1)
        }
    }
}

/// A proxy holds two descriptors per request in flight: take the hard limit on open
/// files, as nginx's `worker_rlimit_nofile` would. App processes inherit it.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                say!("cannot raise the open files limit from {soft} to {hard}: {e}");
            }
        }
    }
}

/// Switches to `run_as` for good: the user's supplementary groups (as `login` sets
/// them, from the group database), its group, then the user.
fn drop_privileges(run_as: &config::RunAs) -> nix::Result<()> {
    use nix::unistd::{getuid, initgroups, setgid, setuid};
    if getuid() == run_as.uid {
        return Ok(());
    }
    let user = std::ffi::CString::new(run_as.user.as_str()).map_err(|_| nix::Error::EINVAL)?;
    initgroups(&user, run_as.gid)?;
    setgid(run_as.gid)?;
    setuid(run_as.uid)
}

fn run(path: &Path) -> ExitCode {
    // Until the runtime's handlers are installed a SIGHUP or SIGUSR1 would kill rolld;
    // ignore them meanwhile (the handlers replace this, and exec resets it for children).
    for sig in [Signal::SIGHUP, Signal::SIGUSR1] {
        // SAFETY: SIG_IGN runs no code in a signal context.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigIgn) };
    }
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // A template that cannot render is a config error: found before anything starts.
    if let Err(why) = render_templates(&config) {
        say!("{why}");
        return ExitCode::from(2);
    }
    if let Some(warning) = rolling::port_range_warning(&config.app.ports) {
        tracing::warn!("{warning}");
    }
    notify::init();
    raise_file_limit();
    // The control socket first: a second rolld on the same config stops here.
    let mut control = match control::ControlSocket::bind(&config.control_socket()) {
        Ok(control) => control,
        Err(err) => {
            say!("{err}");
            return ExitCode::from(1);
        }
    };
    // Bind first: port 80 needs root, the rest of rolld does not. A front listener
    // has a socket for each proxy worker.
    let refused = |addr: std::net::SocketAddr, what: &str, err| {
        format!("cannot listen on {addr} ({what}): {err}")
    };
    let bind = |addr: std::net::SocketAddr, what: &str| {
        rolld_proxy::bind_for_workers(addr, config.proxy.workers)
            .map_err(|err| refused(addr, what, err))
    };
    let listener = match config.listen.map(|addr| bind(addr, "listen")).transpose() {
        Ok(listener) => listener,
        Err(why) => {
            say!("{why}");
            return ExitCode::from(1);
        }
    };
    // 443 needs root too; the key files were read as root when the config was loaded.
    let tls_listener = match config
        .tls
        .as_ref()
        .map(|tls| bind(tls.listen, "tls.listen"))
        .transpose()
    {
        Ok(listener) => listener,
        Err(why) => {
            say!("{why}");
            return ExitCode::from(1);
        }
    };
    let admin = match config
        .admin
        .map(|addr| rolld_proxy::bind(addr).map_err(|err| refused(addr, "admin", err)))
        .transpose()
    {
        Ok(admin) => admin,
        Err(why) => {
            say!("{why}");
            return ExitCode::from(1);
        }
    };
    if let Some(run_as) = &config.run_as {
        let switched = control
            .chown(run_as.uid, run_as.gid)
            .and_then(|()| drop_privileges(run_as));
        if let Err(err) = switched {
            say!("cannot switch to user `{}`: {err}", run_as.user);
            return ExitCode::from(1);
        }
    }
    // A daemonized app process is re-parented to rolld, not to init: rolld still stops
    // and reaps it.
    if let Err(err) = process::become_subreaper() {
        say!("cannot become a child subreaper: {err}");
        return ExitCode::from(1);
    }
    let mode = match containment(&config) {
        Ok(mode) => mode,
        Err(code) => return code,
    };
    let cgroups = match &mode {
        cgroup::Mode::Cgroup { root, .. } => match cgroup::Hierarchy::create(root) {
            Ok(hierarchy) => Some(Arc::new(hierarchy)),
            Err(err) => {
                say!(
                    "cannot create rolld's cgroup under {}: {err}",
                    root.display()
                );
                return ExitCode::from(1);
            }
        },
        cgroup::Mode::Groups { .. } => None,
    };
    let cgroups_at_exit = cgroups.clone();
    let guard = match guard::Guard::start(cgroups.as_ref().map(|h| h.dir().to_path_buf())) {
        Ok(guard) => Arc::new(guard),
        Err(err) => {
            say!("cannot start the guard process: {err}");
            return ExitCode::from(1);
        }
    };
    // Supervision, health checks and the control socket; the proxy has threads of its own.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            say!("cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let (commands_tx, commands) = signals::listen()?;
        if let Some(addr) = config.listen {
            info!(%addr, "listening");
        }
        info!(mode = %mode.describe(), "containment");
        if std::process::id() == 1 {
            info!("running as PID 1: reaping every orphan");
        }
        if let Some(tls) = &config.tls {
            info!(addr = %tls.listen, "listening for HTTPS");
        }
        info!(
            guard = guard.pid().as_raw(),
            config = %config.path.display(),
            control = %control.path().display(),
            "rolld {} starting",
            env!("CARGO_PKG_VERSION")
        );
        let board = Arc::new(status::Board::default());
        let supervisor =
            supervisor::Supervisor::new(config.clone(), guard, board.clone(), cgroups)?;
        control.serve(commands_tx, board.clone(), supervisor.proxy().cloned())?;
        if let Some(admin) = admin {
            info!(addr = ?config.admin, "admin endpoints: /metrics /status /healthz");
            admin::serve(
                admin,
                board,
                supervisor.proxy().cloned(),
                supervisor.tls().cloned(),
            )?;
        }
        supervisor.run(listener, tls_listener, commands).await
    });
    // Do not wait for stray tasks (tunnels of cut connections) at exit.
    runtime.shutdown_background();
    // Stray tasks may still hold it: remove rolld's cgroups now.
    if let Some(cgroups) = &cgroups_at_exit {
        cgroups.close();
    }
    match result {
        Ok(()) => {
            info!("rolld stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            say!("{err}");
            ExitCode::from(1)
        }
    }
}
