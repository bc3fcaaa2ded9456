//! One generation: the set of app processes started together by one roll.
//!
//! Each process has a keeper task that starts it, restarts it with backoff if it dies
//! while its generation serves, and stops its whole process group when told to (or
//! when the [`Generation`] is dropped). The proxy's view of each process, its
//! [`Upstream`], is marked unavailable while the process is down. That handle can be
//! replaced: a generation kept through a bake and switched back to serves from a new
//! set, and its keepers must mark availability on the set that serves.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use rolld_proxy::{Upstream, UpstreamSet};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::cgroup::{Cgroup, Hierarchy};
use crate::config::{Config, Health};
use crate::connections;
use crate::guard::Guard;
use crate::health::{self, StartFailed};
use crate::output::{self, Sink};
use crate::process::{self, Exit, Reaper, Spawner, Spec, Tree};
use crate::status::Board;
use crate::tree;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long without dying starts its next backoff from the minimum.
const HEALTHY_RESET: Duration = Duration::from_secs(60);

/// The delay before restarting a process that keeps dying: 1 s, doubling up to 30 s; a
/// process that ran a healthy minute starts again from 1 s.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    /// The delay before restarting a process that died after running for `ran`.
    fn after(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_RESET {
            self.next = BACKOFF_MIN;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

/// How to stop a process group.
#[derive(Clone, Copy, Debug)]
pub struct StopHow {
    pub signal: Signal,
    pub timeout: Duration,
}

impl StopHow {
    pub fn from_config(config: &Config) -> Self {
        StopHow {
            signal: config.app.stop_signal,
            timeout: config.app.stop_timeout,
        }
    }
}

/// What every keeper shares: the machinery to start, reap and guard processes.
pub struct Context {
    pub spawner: Spawner,
    pub reaper: Reaper,
    pub guard: Arc<Guard>,
    /// What `rolld status` and `/metrics` show.
    pub board: Arc<Board>,
    /// rolld's cgroups, in cgroup mode.
    pub cgroups: Option<Arc<Hierarchy>>,
    /// Set once, on shutdown: every keeper stops its process this way.
    pub shutdown: watch::Receiver<Option<StopHow>>,
    /// Never sent on: every keeper holds the context, so the receiver sees the channel
    /// close when the last keeper (and the supervisor) let go of it.
    #[allow(dead_code)]
    pub alive: mpsc::Sender<()>,
}

/// A process's state as its keeper reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessState {
    Starting,
    Running(Pid),
    Restarting,
    /// Exited, and not restarted (its generation was not serving).
    Exited(String),
    Stopped,
}

/// Where a keeper marks its process (un)available: the upstream of the set serving it.
type UpstreamSlot = Arc<Mutex<Option<Arc<Upstream>>>>;

struct Process {
    port: u16,
    upstream: UpstreamSlot,
    state: watch::Receiver<ProcessState>,
    stop: Option<oneshot::Sender<StopHow>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

/// One set of processes, from start to stop.
pub struct Generation {
    pub id: u64,
    pub ports: Vec<u16>,
    processes: Vec<Process>,
    /// While true, a process that dies is restarted; before the swap, it fails the roll.
    serving: Arc<AtomicBool>,
    /// Where the set's cgroup is removed once stopped (cgroup mode).
    cgroups: Option<Arc<Hierarchy>>,
    /// How each unexpected exit went, while serving: a release is judged on these.
    crashes: Arc<Mutex<Vec<String>>>,
    /// Woken at each crash, so that a judge acts at once rather than at its next look.
    crashed: Arc<tokio::sync::Notify>,
}

impl Generation {
    /// Starts one process per port. `set` is the proxy's view of them, if there is a proxy.
    pub fn spawn(
        ctx: &Arc<Context>,
        id: u64,
        ports: &[u16],
        config: &Config,
        set: Option<&UpstreamSet>,
    ) -> Generation {
        let serving = Arc::new(AtomicBool::new(false));
        let crashes = Arc::new(Mutex::new(Vec::new()));
        let crashed = Arc::new(tokio::sync::Notify::new());
        let processes = ports
            .iter()
            .map(|&port| {
                let (state_tx, state) = watch::channel(ProcessState::Starting);
                let (stop, stop_rx) = oneshot::channel();
                let cgroup = match &ctx.cgroups {
                    Some(cgroups) => cgroups
                        .create_process(id, port)
                        .map(Some)
                        .map_err(|e| format!("cannot create its cgroup: {e}")),
                    None => Ok(None),
                };
                let mut spec = spec_for(config, port);
                spec.environment
                    .push((tree::MARK_VAR.to_string(), tree::mark(id, port)));
                if let Ok(Some(cgroup)) = &cgroup {
                    spec.cgroup = Some(cgroup.procs_file().to_owned());
                }
                let upstream: UpstreamSlot = Arc::new(Mutex::new(
                    set.and_then(|s| s.get(health::local(port)).cloned()),
                ));
                let keeper = Keeper {
                    ctx: ctx.clone(),
                    generation: id,
                    port,
                    mark: tree::mark(id, port),
                    cgroup,
                    spec,
                    stdout: sink(config.app.stdout.as_deref(), port, Sink::Stdout),
                    stderr: sink(config.app.stderr.as_deref(), port, Sink::Stderr),
                    health: config.app.health.clone(),
                    upstream: upstream.clone(),
                    serving: serving.clone(),
                    crashes: crashes.clone(),
                    crashed: crashed.clone(),
                    state: state_tx,
                    default_stop: StopHow::from_config(config),
                };
                let done = tokio::spawn(keeper.run(stop_rx));
                Process {
                    port,
                    upstream,
                    state,
                    stop: Some(stop),
                    done: Some(done),
                }
            })
            .collect();
        Generation {
            id,
            ports: ports.to_vec(),
            processes,
            serving,
            cgroups: ctx.cgroups.clone(),
            crashes,
            crashed,
        }
    }

    /// Resolves at the next crash of a process of this generation.
    pub async fn crashed(&self) {
        self.crashed.notified().await
    }

    /// Unexpected exits while serving so far, each in words.
    pub fn crashes(&self) -> Vec<String> {
        lock(&self.crashes).clone()
    }

    /// Makes `set` the proxy's view of these processes: from now on the keepers mark
    /// availability on it. Each upstream starts available if its process runs.
    pub fn attach(&self, set: &UpstreamSet) {
        for p in &self.processes {
            let upstream = set.get(health::local(p.port)).cloned();
            if let Some(upstream) = &upstream {
                let running = matches!(*p.state.borrow(), ProcessState::Running(_));
                upstream.set_available(running);
            }
            *lock(&p.upstream) = upstream;
        }
    }

    /// Waits until every process passes its health check; the first failure ends the wait.
    pub async fn wait_ready(&self, health: &crate::config::Health) -> Result<(), StartFailed> {
        let mut waits = JoinSet::new();
        for p in &self.processes {
            let (port, state, health) = (p.port, p.state.clone(), health.clone());
            waits.spawn(async move { health::wait_ready(port, &health, state).await });
        }
        while let Some(result) = waits.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(failed)) => return Err(failed),
                Err(join) => {
                    return Err(StartFailed::Exited {
                        port: 0,
                        how: format!("health check task failed: {join}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// From now on a process that dies is restarted (true), or left dead (false).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }

    /// Why a process of this generation is gone, if one exited and was not restarted.
    pub fn exited(&self) -> Option<String> {
        self.processes
            .iter()
            .find_map(|p| match &*p.state.borrow() {
                ProcessState::Exited(how) => {
                    Some(format!("process on port {} exited ({how})", p.port))
                }
                _ => None,
            })
    }

    /// Checks that each process's port is answered by that process or one it started
    /// (a forked worker, a daemon), not by a stranger that took the port.
    pub fn check_owners(&self) -> Result<(), String> {
        let owners: Vec<(u16, Pid, Vec<Pid>)> = self
            .processes
            .iter()
            .filter_map(|p| match &*p.state.borrow() {
                ProcessState::Running(pid) => Some((
                    p.port,
                    *pid,
                    members(self.cgroups.as_deref(), self.id, p.port, *pid),
                )),
                _ => None,
            })
            .collect();
        connections::check_owners(&owners)
    }

    /// Process ids of the running processes, for logs.
    pub fn pids(&self) -> Vec<i32> {
        self.processes
            .iter()
            .filter_map(|p| match &*p.state.borrow() {
                ProcessState::Running(pid) => Some(pid.as_raw()),
                _ => None,
            })
            .collect()
    }

    /// Stops every process group (`how.signal`, then SIGKILL after `how.timeout`) and
    /// waits until all are gone and reaped.
    pub async fn terminate(mut self, how: StopHow) {
        self.set_serving(false);
        for p in &mut self.processes {
            if let Some(stop) = p.stop.take() {
                let _ = stop.send(how);
            }
        }
        for p in &mut self.processes {
            if let Some(done) = p.done.take() {
                let _ = done.await;
            }
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove_set(self.id);
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Dropping the stop senders tells each keeper to stop its process; the keepers
        // are tracked by `Context::alive`, so shutdown still waits for them.
        self.set_serving(false);
    }
}

/// The processes of the process `pid` of `generation` on `port`: its group, its
/// marked daemons and their descendants, and in cgroup mode whatever is in its cgroup.
fn members(cgroups: Option<&Hierarchy>, generation: u64, port: u16, pid: Pid) -> Vec<Pid> {
    let mut members = tree::members(pid, Some(&tree::mark(generation, port)));
    if let Some(cgroups) = cgroups {
        members.extend(cgroups.procs_of(generation, port));
    }
    members
}

/// A lock whose holder cannot leave its data half-written (a store or a push).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn spec_for(config: &Config, port: u16) -> Spec {
    let mut environment = vec![("PORT".to_string(), port.to_string())];
    environment.extend(
        config
            .app
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), crate::config::fill(v, port))),
    );
    Spec {
        argv: config.command_for(port),
        directory: config.app.directory.clone(),
        environment,
        capture_output: true,
        cgroup: None,
    }
}

fn sink(path: Option<&std::path::Path>, port: u16, default: Sink) -> Sink {
    match path {
        Some(path) => Sink::File(crate::config::fill(&path.display().to_string(), port).into()),
        None => default,
    }
}

struct Keeper {
    ctx: Arc<Context>,
    generation: u64,
    port: u16,
    /// The mark in its environment, which its daemons inherit.
    mark: String,
    /// Its cgroup (cgroup mode), or why it could not be made.
    cgroup: Result<Option<Cgroup>, String>,
    spec: Spec,
    stdout: Sink,
    stderr: Sink,
    health: Health,
    upstream: UpstreamSlot,
    serving: Arc<AtomicBool>,
    crashes: Arc<Mutex<Vec<String>>>,
    crashed: Arc<tokio::sync::Notify>,
    state: watch::Sender<ProcessState>,
    default_stop: StopHow,
}

/// Why a keeper's wait on its running process ended.
enum Ended {
    /// The process is gone (or never started); how, in words.
    Exited(String),
    Stop(StopHow),
}

impl Keeper {
    async fn run(self, mut stop: oneshot::Receiver<StopHow>) {
        let mut shutdown = self.ctx.shutdown.clone();
        let port = self.port;
        let mut backoff = Backoff::new();
        let mut restarted = false;
        loop {
            let started = Instant::now();
            let ended = match self.start().await {
                Err(err) => {
                    error!(port, error = %err, command = ?self.spec.argv, "cannot start process");
                    let program = self.spec.argv.first().map_or("", String::as_str);
                    Ended::Exited(format!("cannot start `{program}`: {err}"))
                }
                Ok(pid) => {
                    let mut exit = self.ctx.reaper.wait(pid);
                    let ended = self
                        .watch(pid, restarted, &mut exit, &mut stop, &mut shutdown)
                        .await;
                    match ended {
                        Ended::Stop(how) => {
                            let status = process::terminate(
                                self.tree(pid),
                                &mut exit,
                                how.signal,
                                how.timeout,
                                &self.ctx.guard,
                            )
                            .await;
                            let status =
                                status.map_or_else(|| "unknown".to_string(), |s| s.to_string());
                            info!(generation = self.generation, port, pid = pid.as_raw(), %status, "process stopped");
                            self.state.send_replace(ProcessState::Stopped);
                            self.ctx.board.forget(self.generation, port);
                            return;
                        }
                        Ended::Exited(status) => {
                            // Its workers and daemons, if any, go with it.
                            self.tree(pid).kill();
                            self.ctx.guard.forget(pid);
                            Ended::Exited(status)
                        }
                    }
                }
            };
            let Ended::Exited(how) = ended else { return };
            self.set_available(false);
            if !self.serving.load(Ordering::SeqCst) {
                self.state.send_replace(ProcessState::Exited(how));
                self.ctx.board.forget(self.generation, port);
                return;
            }
            lock(&self.crashes).push(format!("process on port {port} exited ({how})"));
            self.crashed.notify_waiters();
            let delay = backoff.after(started.elapsed());
            error!(
                generation = self.generation,
                port,
                "process exited unexpectedly ({how}); restarting in {}",
                humantime::format_duration(delay)
            );
            self.state.send_replace(ProcessState::Restarting);
            self.ctx
                .board
                .process(self.generation, port, None, "restarting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = &mut stop => { self.state.send_replace(ProcessState::Stopped); self.ctx.board.forget(self.generation, port); return; }
                _ = shutdown.wait_for(Option::is_some) => { self.state.send_replace(ProcessState::Stopped); self.ctx.board.forget(self.generation, port); return; }
            }
            self.ctx.board.restarted(self.generation, port);
            restarted = true;
        }
    }

    /// What stopping the process `pid` stops: its group, and its cgroup in cgroup mode,
    /// else whatever carries its mark (a scan of the process table, which the cgroup
    /// makes needless).
    fn tree(&self, pid: Pid) -> Tree<'_> {
        let cgroup = self.cgroup.as_ref().ok().and_then(Option::as_ref);
        Tree {
            leader: pid,
            mark: cgroup.is_none().then_some(self.mark.as_str()),
            cgroup,
        }
    }

    /// Marks the process (un)available on the set that serves it, if any.
    fn set_available(&self, available: bool) {
        if let Some(upstream) = &*lock(&self.upstream) {
            upstream.set_available(available);
        }
    }

    async fn start(&self) -> std::io::Result<Pid> {
        if let Err(why) = &self.cgroup {
            return Err(std::io::Error::other(why.clone()));
        }
        let mut child = self.ctx.spawner.spawn(self.spec.clone()).await?;
        let pid = Pid::from_raw(child.id() as i32);
        self.ctx.guard.watch(pid);
        if let Some(out) = child.stdout.take() {
            output::capture(OwnedFd::from(out), self.port, self.stdout.clone());
        }
        if let Some(err) = child.stderr.take() {
            output::capture(OwnedFd::from(err), self.port, self.stderr.clone());
        }
        info!(
            generation = self.generation,
            port = self.port,
            pid = pid.as_raw(),
            "process started"
        );
        self.state.send_replace(ProcessState::Running(pid));
        self.ctx
            .board
            .process(self.generation, self.port, Some(pid.as_raw()), "running");
        Ok(pid)
    }

    /// Waits while the process runs. After a restart the proxy routes to it again only
    /// once it passes its health check.
    async fn watch(
        &self,
        pid: Pid,
        restarted: bool,
        exit: &mut oneshot::Receiver<Exit>,
        stop: &mut oneshot::Receiver<StopHow>,
        shutdown: &mut watch::Receiver<Option<StopHow>>,
    ) -> Ended {
        let ready = async {
            if restarted {
                health::wait_ready(self.port, &self.health, self.state.subscribe()).await
            } else {
                std::future::pending().await
            }
        };
        tokio::pin!(ready);
        let mut checking = restarted;
        loop {
            tokio::select! {
                result = &mut ready, if checking => {
                    checking = false;
                    match result {
                        Ok(()) => match connections::check_owner(self.port, pid, &members(self.ctx.cgroups.as_deref(), self.generation, self.port, pid)) {
                            Ok(()) => {
                                info!(generation = self.generation, port = self.port, pid = pid.as_raw(), "restarted process is ready");
                                self.set_available(true);
                            }
                            Err(why) => {
                                error!(generation = self.generation, port = self.port, pid = pid.as_raw(), "{why}; killing the restarted process to try again");
                                self.tree(pid).kill();
                            }
                        },
                        Err(failed) => {
                            warn!(port = self.port, "{failed}; killing it to try again");
                            self.tree(pid).kill();
                        }
                    }
                }
                status = &mut *exit => {
                    return Ended::Exited(status.map_or_else(|_| "exit status lost".to_string(), |s| s.to_string()));
                }
                how = &mut *stop => return Ended::Stop(how.unwrap_or(self.default_stop)),
                how = shutdown.wait_for(Option::is_some) => {
                    return Ended::Stop(how.ok().and_then(|h| *h).unwrap_or(self.default_stop));
                }
            }
        }
    }
}

/// The proxy's addresses for `ports`.
pub fn addrs(ports: &[u16]) -> Vec<SocketAddr> {
    ports.iter().map(|&p| health::local(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_to_30s_and_resets_after_a_healthy_minute() {
        let mut backoff = Backoff::new();
        let quick = Duration::from_millis(10);
        let delays: Vec<u64> = (0..8).map(|_| backoff.after(quick).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        // 59 s is not a healthy minute: the backoff keeps its cap.
        assert_eq!(backoff.after(Duration::from_secs(59)), BACKOFF_MAX);
        // A minute without dying starts over from the minimum.
        assert_eq!(backoff.after(HEALTHY_RESET), BACKOFF_MIN);
        assert_eq!(backoff.after(quick), Duration::from_secs(2));
    }
}
