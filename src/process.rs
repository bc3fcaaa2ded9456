//! Starting, reaping and stopping child processes.
//!
//! Every child is forked by one long-lived thread, because `PR_SET_PDEATHSIG` fires
//! when the *thread* that forked exits, and every child is reaped by one [`Reaper`], so
//! no exit status is lost to another `wait` and no zombie is left. rolld is a child
//! subreaper (and may be PID 1 in a container): the reaper also reaps the orphans the
//! kernel re-parents to it (daemonized app processes), and drops their status.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::cgroup::Cgroup;
use crate::guard::Guard;
use crate::tree;

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(sig) => write!(f, "killed by {sig}"),
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub argv: Vec<String>,
    pub directory: PathBuf,
    pub environment: Vec<(String, String)>,
    /// Pipe stdout and stderr to rolld (else they go to /dev/null).
    pub capture_output: bool,
    /// The `cgroup.procs` file the child moves itself into before exec (cgroup mode);
    /// if it cannot, it does not run.
    pub cgroup: Option<std::ffi::CString>,
}

/// Held while forking and while reaping. When `exec` fails, std reaps the failed child
/// itself inside `spawn`; a concurrent `waitpid(-1)` must not take that child first.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

/// The children rolld started and someone will wait for; any other child the reaper
/// meets is an orphan re-parented to rolld. Filled under [`SPAWN_LOCK`], so the reaper
/// never sees a child of ours before it is known.
static KNOWN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Someone will wait for `pid` (a child forked outside the spawner, such as the guard).
pub fn expect_child(pid: Pid) {
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    known.get_or_insert_with(HashSet::new).insert(pid.as_raw());
}

/// Makes rolld the reaper of its orphaned descendants: a daemonized app process is
/// re-parented to rolld rather than to init, so rolld can still stop and reap it.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

type SpawnRequest = (Spec, oneshot::Sender<io::Result<Child>>);

/// Forks children from one thread that lives as long as rolld.
#[derive(Clone)]
pub struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    pub fn start() -> io::Result<Spawner> {
        let (requests, rx) = mpsc::channel::<SpawnRequest>();
        let parent = std::process::id();
        std::thread::Builder::new()
            .name("rolld-spawner".into())
            .spawn(move || {
                for (spec, reply) in rx {
                    let _ = reply.send(spawn_now(&spec, parent));
                }
            })?;
        Ok(Spawner { requests })
    }

    /// Starts `spec` in a process group of its own, stdin from /dev/null.
    pub async fn spawn(&self, spec: Spec) -> io::Result<Child> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send((spec, reply))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
    }
}

fn spawn_now(spec: &Spec, parent: u32) -> io::Result<Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&spec.directory)
        .envs(spec.environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    if spec.capture_output {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let cgroup = spec.cgroup.clone();
    // SAFETY: the closure only makes async-signal-safe system calls (prctl, getppid,
    // open, write, close).
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &cgroup {
                Cgroup::join_self(procs)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // rolld may have died between fork and prctl; then nobody would kill us.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::other("rolld exited while starting this process"));
            }
            Ok(())
        });
    }
    let _forking = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn()?;
    expect_child(Pid::from_raw(child.id() as i32));
    Ok(child)
}

/// Starts `command` as a child the reaper knows (the guard), without the app processes'
/// death signal: it must outlive rolld.
pub fn spawn_unguarded(command: &mut Command) -> io::Result<Child> {
    let _forking = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn()?;
    expect_child(Pid::from_raw(child.id() as i32));
    Ok(child)
}

enum Slot {
    Waiting(oneshot::Sender<Exit>),
    Exited(Exit),
}

/// Reaps every child of rolld and hands each exit to whoever waits for that pid.
#[derive(Clone)]
pub struct Reaper {
    slots: Arc<Mutex<HashMap<i32, Slot>>>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must be called inside the runtime.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            slots: Arc::new(Mutex::new(HashMap::new())),
        };
        let this = reaper.clone();
        tokio::spawn(async move {
            loop {
                this.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap(&self) {
        let _forking = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    warn!(error = %err, "waitpid failed");
                    return;
                }
            };
            let known = KNOWN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .is_some_and(|known| known.remove(&pid.as_raw()));
            if !known {
                debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
                continue;
            }
            debug!(pid = pid.as_raw(), %exit, "reaped");
            let mut slots = self.lock();
            match slots.remove(&pid.as_raw()) {
                Some(Slot::Waiting(tx)) => {
                    let _ = tx.send(exit);
                }
                _ => {
                    slots.insert(pid.as_raw(), Slot::Exited(exit));
                }
            }
        }
    }

    /// Resolves with the exit of `pid`, even if it already exited.
    pub fn wait(&self, pid: Pid) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.lock();
        match slots.remove(&pid.as_raw()) {
            Some(Slot::Exited(exit)) => {
                let _ = tx.send(exit);
            }
            _ => {
                slots.insert(pid.as_raw(), Slot::Waiting(tx));
            }
        }
        rx
    }
}

/// The instant `after` from now; a duration too large to add (a config value of
/// centuries) means "about never" rather than a panic.
pub fn deadline_in(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Signals a whole process group; a group already gone is not an error.
pub fn signal_group(pgid: Pid, sig: Signal) {
    // killpg(0) is the caller's own group, and killpg(1) is kill(-1): every process the
    // caller may signal. Neither is ever an app's group.
    if pgid.as_raw() <= 1 {
        warn!(pgid = pgid.as_raw(), signal = %sig, "refusing to signal process group {pgid}");
        return;
    }
    match killpg(pgid, sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => {
            warn!(pgid = pgid.as_raw(), signal = %sig, error = %err, "cannot signal process group")
        }
    }
}

/// Whether any process of the group is still alive.
fn group_alive(pgid: Pid) -> bool {
    pgid.as_raw() > 1 && !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

/// What rolld stops as one: the process group a started process leads, and, with a
/// mark, every process that carries it and their descendants (see [`tree`]); in
/// cgroup mode, every process of its cgroup.
#[derive(Clone, Copy)]
pub struct Tree<'a> {
    pub leader: Pid,
    pub mark: Option<&'a str>,
    pub cgroup: Option<&'a Cgroup>,
}

impl Tree<'_> {
    /// A process group alone (a `run_proc` command, whose daemons are its business).
    pub fn group(leader: Pid) -> Tree<'static> {
        Tree {
            leader,
            mark: None,
            cgroup: None,
        }
    }

    /// Sends `sig` to every member.
    pub fn signal(&self, sig: Signal) {
        // Listed before the group gets the signal: a leader that exits on it hands its
        // children to rolld meanwhile, and a walk of the tree just then can miss them.
        let marked = self.marked_members();
        signal_group(self.leader, sig);
        let mut others = marked;
        if let Some(cgroup) = self.cgroup {
            others.extend(cgroup.procs());
        }
        tree::signal_all(&self.outside_group(others), sig);
    }

    /// Of `pids`, once each, those the group's signal did not reach: a second stop
    /// signal is "stop now, drop what is in flight" to some servers (uvicorn's second
    /// SIGINT, for one), so a member of the group must get it once only. Asked after
    /// the group was signalled, so a process that leaves the group just then still
    /// gets one.
    fn outside_group(&self, mut pids: Vec<Pid>) -> Vec<Pid> {
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|&pid| nix::unistd::getpgid(Some(pid)).is_ok_and(|g| g != self.leader));
        pids
    }

    /// Kills every member at once.
    pub fn kill(&self) {
        if let Some(cgroup) = self.cgroup {
            cgroup.kill();
        }
        self.signal(Signal::SIGKILL);
    }

    /// Whether any member is alive.
    pub fn alive(&self) -> bool {
        self.group_alive()
            || (self.mark.is_some() && !tree::members(self.leader, self.mark).is_empty())
    }

    /// Whether a process of the group (or, in cgroup mode, of the cgroup) is alive: no
    /// reading of the process table.
    fn group_alive(&self) -> bool {
        group_alive(self.leader) || self.cgroup.is_some_and(Cgroup::populated)
    }

    /// The members found through the mark, now.
    fn marked_members(&self) -> Vec<Pid> {
        if self.mark.is_some() {
            tree::members(self.leader, self.mark)
        } else {
            Vec::new()
        }
    }
}

/// Stops `tree`: `sig`, then up to `timeout` for the leader and every other member to
/// exit, then SIGKILL (`cgroup.kill` in cgroup mode) until none is left. Returns the
/// leader's exit.
pub async fn terminate(
    tree: Tree<'_>,
    exit: &mut oneshot::Receiver<Exit>,
    sig: Signal,
    timeout: Duration,
    guard: &Guard,
) -> Option<Exit> {
    let deadline = deadline_in(timeout);
    tree.signal(sig);
    let mut status = tokio::time::timeout_at(deadline, &mut *exit)
        .await
        .ok()
        .and_then(Result::ok);
    // The leader is gone; give the rest (forked workers, daemons) the same deadline.
    // rolld's descendants are listed again every 0.5 s, not at every poll (a process
    // that forks meanwhile, or leaves the tree, is seen then), and once more before
    // the rest is taken for gone: one listing can miss a process that is re-parented
    // to rolld while the tree is walked (its parent, stopped by the same signal, exits
    // just then), and that process would get SIGKILL before its grace period.
    if status.is_some() {
        let mut members = tree.marked_members();
        let mut polls = 0u32;
        while tokio::time::Instant::now() < deadline {
            if !tree.group_alive() && !members.iter().any(|&pid| tree::live(pid)) {
                members = tree.marked_members();
                if !members.iter().any(|&pid| tree::live(pid)) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            polls += 1;
            if polls % 25 == 0 {
                members = tree.marked_members();
            }
        }
    }
    if status.is_none() || tree.alive() {
        if sig != Signal::SIGKILL {
            warn!(
                pgid = tree.leader.as_raw(),
                ?timeout,
                "process group still running after {sig}; sending SIGKILL"
            );
        }
        // A process forking as fast as it can may add members between a listing and
        // the kill: kill again until none is left (bounded: 10 s). None means two
        // listings in a row, 20 ms apart, found none: a marked process caught in the
        // middle of an exec shows no environment, so one listing can miss it.
        let killing = deadline_in(Duration::from_secs(10));
        let mut empty_listings = 0;
        loop {
            tree.kill();
            empty_listings = if tree.alive() { 0 } else { empty_listings + 1 };
            if empty_listings == 2 || tokio::time::Instant::now() >= killing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if status.is_none() {
        status = tokio::time::timeout(Duration::from_secs(10), &mut *exit)
            .await
            .ok()
            .and_then(Result::ok);
    }
    guard.forget(tree.leader);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::path::Path;
    use std::sync::OnceLock;
    use std::time::Instant;

    /// Runs `test` on the one runtime that holds the one reaper of this test binary: as
    /// in rolld, a second reaper would take the first one's children. The test binary is
    /// a subreaper too, so a daemon that leaves its parent stays ours to see and reap.
    fn with_reaper<F: Future>(test: impl FnOnce(Reaper) -> F) -> F::Output {
        static RUNTIME: OnceLock<(tokio::runtime::Runtime, Reaper)> = OnceLock::new();
        let (runtime, reaper) = RUNTIME.get_or_init(|| {
            become_subreaper().expect("become a child subreaper");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let reaper = runtime.block_on(async { Reaper::start() }).expect("reaper");
            (runtime, reaper)
        });
        runtime.block_on(test(reaper.clone()))
    }

    /// `script` run by `sh` in a process group of its own, as rolld starts an app,
    /// with `mark` in its environment when given.
    fn start_sh(script: &str, mark: Option<&str>) -> Pid {
        let spec = Spec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            directory: PathBuf::from("/"),
            environment: mark
                .map(|m| (tree::MARK_VAR.to_string(), m.to_string()))
                .into_iter()
                .collect(),
            capture_output: false,
            cgroup: None,
        };
        // The reaper waits for it, not std.
        #[allow(clippy::zombie_processes)]
        let child = spawn_now(&spec, std::process::id()).expect("start sh");
        Pid::from_raw(child.id() as i32)
    }

    /// Polls `cond` (every 20 ms, at most 10 s).
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A file `name` in `dir` holding `term`, which a shell's TERM trap writes.
    fn trapped(dir: &Path, name: &str) -> bool {
        std::fs::read_to_string(dir.join(name)).is_ok_and(|s| s.trim() == "term")
    }

    /// A shell loop that sets `trap` for TERM, then says so in the file `name.ready`.
    fn looping(dir: &Path, name: &str, trap: &str) -> String {
        format!(
            "trap '{trap}' TERM; touch {}.ready; while :; do sleep 0.02; done",
            dir.join(name).display()
        )
    }

    /// A TERM trap that takes 300 ms, then writes the file `name` and exits: a worker
    /// finishing its last request. Killed before, it writes nothing.
    fn slow_exit(dir: &Path, name: &str) -> String {
        let done = dir.join(name);
        looping(
            dir,
            name,
            &format!("sleep 0.3; echo term > {}; exit 0", done.display()),
        )
    }

    /// Waits until each of `names` has set its trap.
    async fn ready(dir: &Path, names: &[&str]) {
        until("the traps set", || {
            names
                .iter()
                .all(|name| dir.join(format!("{name}.ready")).exists())
        })
        .await;
    }

    /// Starts `script` (with `mark`), waits until each of `names` has set its trap, then
    /// stops it as rolld does: TERM, up to `timeout` for every member, then KILL. The
    /// leader, its exit, and how long stopping took.
    async fn start_and_stop(
        reaper: &Reaper,
        dir: &Path,
        script: &str,
        mark: Option<&str>,
        names: &[&str],
        timeout: Duration,
    ) -> (Pid, Option<Exit>, Duration) {
        let leader = start_sh(script, mark);
        let mut exit = reaper.wait(leader);
        ready(dir, names).await;
        let tree = Tree {
            leader,
            mark,
            cgroup: None,
        };
        let started = Instant::now();
        let status = terminate(tree, &mut exit, Signal::SIGTERM, timeout, &Guard::absent()).await;
        (leader, status, started.elapsed())
    }

    /// The signal goes to the whole group, and stopping waits for every member to end
    /// on its own, well before the timeout; the leader's exit is returned.
    #[test]
    fn terminate_signals_the_group_and_waits_for_a_worker_that_outlives_its_leader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        with_reaper(|reaper| async move {
            let script = format!(
                "trap 'exit 7' TERM; ({}) & {}",
                slow_exit(dir, "worker"),
                looping(dir, "leader", "exit 7")
            );
            let (leader, status, took) = start_and_stop(
                &reaper,
                dir,
                &script,
                None,
                &["worker", "leader"],
                Duration::from_secs(30),
            )
            .await;
            assert_eq!(status, Some(Exit::Code(7)));
            assert!(
                trapped(dir, "worker"),
                "the worker was killed instead of left to finish"
            );
            assert!(!Tree::group(leader).alive(), "the group is gone");
            assert!(
                took < Duration::from_secs(20),
                "stopping took {took:?}, as long as its timeout"
            );
        });
    }

    /// A group that ignores the signal is killed once the timeout passes.
    #[test]
    fn terminate_kills_a_group_that_ignores_the_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        with_reaper(|reaper| async move {
            let script = format!(
                "trap '' TERM; ({}) & {}",
                looping(dir, "worker", ""),
                looping(dir, "leader", "")
            );
            let (leader, status, took) = start_and_stop(
                &reaper,
                dir,
                &script,
                None,
                &["worker", "leader"],
                Duration::from_millis(300),
            )
            .await;
            assert_eq!(status, Some(Exit::Signal(Signal::SIGKILL)));
            assert!(took >= Duration::from_millis(300));
            assert!(took < Duration::from_secs(8), "killing took {took:?}");
            assert!(!Tree::group(leader).alive(), "the group is gone");
        });
    }

    /// A worker that ignores the signal after its leader exited is killed at the
    /// deadline; the leader's own exit is still the one returned.
    #[test]
    fn terminate_kills_a_worker_left_behind_by_its_leader_at_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        with_reaper(|reaper| async move {
            let script = format!(
                "trap 'exit 7' TERM; ({}) & {}",
                looping(dir, "worker", ""),
                looping(dir, "leader", "exit 7")
            );
            let (leader, status, _) = start_and_stop(
                &reaper,
                dir,
                &script,
                None,
                &["worker", "leader"],
                Duration::from_millis(300),
            )
            .await;
            assert_eq!(status, Some(Exit::Code(7)));
            assert!(!Tree::group(leader).alive(), "the worker is gone");
        });
    }

    /// A daemon that left the group (a session of its own) but carries the mark gets
    /// the signal and is waited for while it finishes; one that ignores the signal is
    /// killed.
    #[test]
    fn terminate_reaches_marked_daemons_outside_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        let mark = format!("test-{}/terminate", std::process::id());
        with_reaper(|reaper| async move {
            let script = format!(
                "trap 'exit 7' TERM; setsid sh -c \"{}\" & setsid sh -c \"{}\" & {}",
                slow_exit(dir, "daemon"),
                looping(dir, "stubborn", ""),
                looping(dir, "leader", "exit 7")
            );
            let leader = start_sh(&script, Some(&mark));
            let mut exit = reaper.wait(leader);
            ready(dir, &["daemon", "stubborn", "leader"]).await;
            let tree = Tree {
                leader,
                mark: Some(&mark),
                cgroup: None,
            };
            let daemons: Vec<Pid> = tree::members(leader, Some(&mark))
                .into_iter()
                .filter(|&pid| nix::unistd::getpgid(Some(pid)).ok() != Some(leader))
                .collect();
            assert!(
                daemons.len() >= 2,
                "two daemons outside the group: {daemons:?}"
            );
            let status = terminate(
                tree,
                &mut exit,
                Signal::SIGTERM,
                Duration::from_secs(2),
                &Guard::absent(),
            )
            .await;
            assert_eq!(status, Some(Exit::Code(7)));
            assert!(
                trapped(dir, "daemon"),
                "the daemon was killed instead of left to finish"
            );
            assert!(
                !daemons.iter().any(|&pid| tree::live(pid)),
                "a daemon outlived the stop: {daemons:?}"
            );
            assert!(!tree.alive());
        });
    }

    /// The group's signal reaches the leader and its workers; of the rest rolld lists
    /// (the marked tree, the cgroup), only those outside the group are signalled one by
    /// one, and once each: a second stop signal makes some servers drop what is in flight.
    #[test]
    fn a_stop_signal_reaches_each_member_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        let mark = format!("test-{}/once", std::process::id());
        with_reaper(|reaper| async move {
            let script = format!(
                "trap 'exit 7' TERM; ({}) & setsid sh -c \"{}\" & {}",
                looping(dir, "worker", "exit 0"),
                looping(dir, "daemon", "exit 0"),
                looping(dir, "leader", "exit 7")
            );
            let leader = start_sh(&script, Some(&mark));
            let mut exit = reaper.wait(leader);
            ready(dir, &["worker", "daemon", "leader"]).await;
            let tree = Tree {
                leader,
                mark: Some(&mark),
                cgroup: None,
            };
            let members = tree::members(leader, Some(&mark));
            let (group, outside): (Vec<Pid>, Vec<Pid>) = members
                .iter()
                .partition(|&&pid| nix::unistd::getpgid(Some(pid)).ok() == Some(leader));
            assert!(group.len() >= 2, "the leader and its worker: {group:?}");
            assert!(!outside.is_empty(), "the daemon: {members:?}");
            // Listed twice (marked and in a cgroup): still once. (A `sleep` of the
            // loops listed may have ended since, so the result may be smaller.)
            let twice = [members.clone(), members.clone()].concat();
            let signalled = tree.outside_group(twice);
            let mut once = signalled.clone();
            once.dedup();
            assert_eq!(once, signalled, "each once");
            assert!(!signalled.is_empty(), "the daemon: {members:?}");
            assert!(
                signalled.iter().all(|pid| outside.contains(pid)),
                "no member of the group: {signalled:?}, group {group:?}"
            );
            let status = terminate(
                tree,
                &mut exit,
                Signal::SIGTERM,
                Duration::from_secs(5),
                &Guard::absent(),
            )
            .await;
            assert_eq!(status, Some(Exit::Code(7)));
            assert!(!tree.alive());
        });
    }

    /// A daemon forked by a worker after the leader exited (a worker handing its work
    /// on as it stops) is seen by the wait, which lists the tree again as it goes, and
    /// is waited for until it ends on its own: not killed as soon as the workers it was
    /// not listed with are gone.
    #[test]
    fn terminate_waits_for_a_daemon_forked_while_stopping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        let mark = format!("test-{}/forked-while-stopping", std::process::id());
        with_reaper(|reaper| async move {
            // On TERM the leader leaves a worker behind that, 0.6 s later, starts a
            // daemon in a session of its own (done 2.5 s after), and lives 1.4 s more.
            let daemon = format!("sleep 2.5; echo term > {}", dir.join("daemon").display());
            let worker = format!("sleep 0.6; setsid sh -c '{daemon}' & sleep 1.4");
            let script = format!(
                "handoff() {{ ({worker}) & exit 7; }}; trap handoff TERM; touch {}.ready; while :; do sleep 0.02; done",
                dir.join("leader").display()
            );
            let (leader, status, _) = start_and_stop(
                &reaper,
                dir,
                &script,
                Some(&mark),
                &["leader"],
                Duration::from_secs(10),
            )
            .await;
            assert_eq!(status, Some(Exit::Code(7)));
            assert!(
                trapped(dir, "daemon"),
                "the daemon was killed instead of left to finish"
            );
            assert!(tree::members(leader, Some(&mark)).is_empty());
        });
    }

    /// How an exit reads in rolld's log ("process exited unexpectedly (...)").
    #[test]
    fn an_exit_reads_as_its_code_or_its_signal() {
        assert_eq!(Exit::Code(3).to_string(), "exit code 3");
        assert_eq!(
            Exit::Signal(Signal::SIGKILL).to_string(),
            "killed by SIGKILL"
        );
    }

    /// The exit of a process reaped before anyone asked for it is kept for whoever asks.
    #[test]
    fn an_exit_reaped_before_the_wait_is_handed_to_the_wait() {
        with_reaper(|reaper| async move {
            // The reaper waits for it, not std.
            #[allow(clippy::zombie_processes)]
            let child = spawn_unguarded(Command::new("true").stdin(Stdio::null())).expect("true");
            let pid = child.id() as i32;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !matches!(reaper.lock().get(&pid), Some(Slot::Exited(_))) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "`true` reaped within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let exit =
                tokio::time::timeout(Duration::from_secs(10), reaper.wait(Pid::from_raw(pid)))
                    .await
                    .expect("the wait resolves at once with the exit reaped earlier")
                    .expect("exit");
            assert!(matches!(exit, Exit::Code(0)), "{exit}");
        });
    }

    #[tokio::test]
    async fn a_deadline_too_far_to_add_is_a_century_away_not_a_panic() {
        let now = tokio::time::Instant::now();
        let far = deadline_in(Duration::MAX);
        assert!(far > now + Duration::from_secs(99 * 365 * 24 * 3600));
        let near = deadline_in(Duration::from_secs(5));
        assert!(near >= now + Duration::from_secs(5));
        assert!(near < now + Duration::from_secs(60));
    }
}
