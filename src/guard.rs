//! The guard: a small process that kills every app process if rolld dies.
//!
//! `PR_SET_PDEATHSIG` only reaches a direct child, so an app that forks workers or
//! daemonizes would leave them behind when rolld is killed with SIGKILL. The guard is
//! rolld's own binary run again (`rolld __guard`), holding the read end of a pipe and
//! nothing else; rolld writes each process group it starts (`+pgid`) and stops
//! (`-pgid`). When rolld dies, for any reason, the kernel closes the write end, the
//! guard reads end-of-file and kills what is left: the groups, every process carrying
//! one of rolld's marks (see `tree`), and in cgroup mode rolld's whole cgroup.
//!
//! Its name (`rld-guard`, in `ps` and as `pkill` matches it) does not contain `rolld`,
//! so `pkill rolld` or `pkill -9 -x rolld` leaves it to do its job. rolld watches it
//! and starts a new one if it dies.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{kill, killpg, signal, SigHandler, Signal};
use nix::unistd::Pid;

/// The guard's process name.
pub const NAME: &str = "rld-guard";
/// The hidden subcommand that runs the guard.
pub const SUBCOMMAND: &str = "__guard";
/// Environment variable naming rolld's cgroup folder, for the guard to kill.
const CGROUP_VAR: &str = "ROLLD_GUARD_CGROUP";

/// rolld's end of the guard's pipe.
pub struct Guard {
    state: Mutex<State>,
    cgroup: Option<PathBuf>,
}

struct State {
    pipe: File,
    pid: Pid,
    /// The groups the guard watches now, to tell a new guard after a restart.
    groups: BTreeSet<i32>,
}

impl Guard {
    /// Starts the guard; in cgroup mode it also kills `cgroup` (rolld's folder).
    pub fn start(cgroup: Option<PathBuf>) -> std::io::Result<Guard> {
        let (pipe, pid) = launch(cgroup.as_ref())?;
        Ok(Guard {
            state: Mutex::new(State {
                pipe,
                pid,
                groups: BTreeSet::new(),
            }),
            cgroup,
        })
    }

    pub fn pid(&self) -> Pid {
        self.lock().pid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new guard after the last one died, and tells it every group.
    pub fn restart(&self) -> std::io::Result<Pid> {
        let (mut pipe, pid) = launch(self.cgroup.as_ref())?;
        let mut state = self.lock();
        for pgid in &state.groups {
            let _ = pipe.write_all(format!("+{pgid}\n").as_bytes());
        }
        state.pipe = pipe;
        state.pid = pid;
        Ok(pid)
    }

    /// The guard kills `pgid` should rolld die.
    pub fn watch(&self, pgid: Pid) {
        self.send('+', pgid);
    }

    /// `pgid` is gone; the guard forgets it.
    pub fn forget(&self, pgid: Pid) {
        self.send('-', pgid);
    }

    fn send(&self, op: char, pgid: Pid) {
        let mut state = self.lock();
        if op == '+' {
            state.groups.insert(pgid.as_raw());
        } else {
            state.groups.remove(&pgid.as_raw());
        }
        // One short line is written atomically to a pipe. If the guard is gone the write
        // fails; rolld logs that, and restarts it, when it reaps the guard.
        let _ = state.pipe.write_all(format!("{op}{pgid}\n").as_bytes());
    }
}

#[cfg(test)]
impl Guard {
    /// No guard: what rolld would tell it goes to /dev/null. For unit tests of the code
    /// that tells it (a test binary cannot run `rolld __guard`).
    pub fn absent() -> Guard {
        let pipe = File::options()
            .write(true)
            .open("/dev/null")
            .expect("open /dev/null");
        Guard {
            state: Mutex::new(State {
                pipe,
                pid: Pid::from_raw(0),
                groups: BTreeSet::new(),
            }),
            cgroup: None,
        }
    }
}

/// Runs `rolld __guard` with the read end of a new pipe as its stdin.
fn launch(cgroup: Option<&PathBuf>) -> std::io::Result<(File, Pid)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0(NAME)
        .arg(SUBCOMMAND)
        .arg(std::process::id().to_string())
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_remove(crate::tree::MARK_VAR)
        // Its own group: a Ctrl-C in the terminal is for rolld, not for the guard.
        .process_group(0);
    match cgroup {
        Some(dir) => command.env(CGROUP_VAR, dir),
        None => command.env_remove(CGROUP_VAR),
    };
    let child = crate::process::spawn_unguarded(&mut command)?;
    Ok((File::from(write), Pid::from_raw(child.id() as i32)))
}

/// Closes every descriptor but stdin, stdout and stderr: whatever rolld inherited
/// without close-on-exec (from its own parent) must not be held open by the guard
/// after rolld is gone.
fn close_inherited() {
    // Collected before closing: the listing holds a descriptor of its own.
    let open: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in open.into_iter().filter(|&fd| fd > 2) {
        let _ = nix::unistd::close(fd);
    }
}

/// The guard's whole life (`rolld __guard ROLLD_PID`): wait for rolld to close the pipe
/// on stdin, then kill what it left.
pub fn run(rolld: &str) -> ! {
    let _ = nix::sys::prctl::set_name(c"rld-guard");
    // Signals meant for rolld (a terminal's Ctrl-C, `killall -HUP rolld`) are not for us.
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
    ] {
        // SAFETY: installing SIG_IGN runs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let rolld: u32 = rolld.parse().unwrap_or(0);
    close_inherited();
    let cgroup = std::env::var_os(CGROUP_VAR).map(PathBuf::from);

    let mut groups = BTreeSet::new();
    let mut lines = BufReader::new(std::io::stdin().lock());
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let (op, pgid) = line.trim_end().split_at(1.min(line.len()));
        let Ok(pgid) = pgid.parse::<i32>() else {
            continue;
        };
        match op {
            // killpg(0) is the guard's own group and killpg(1) every process.
            "+" if pgid <= 1 => false,
            "+" => groups.insert(pgid),
            "-" => groups.remove(&pgid),
            _ => false,
        };
    }
    // A process forking as fast as it can may add members between a listing and the
    // kill: kill until none is left, for up to 5 s.
    let prefix = crate::tree::marks_of(rolld);
    for _ in 0..250 {
        for &pgid in &groups {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        if let Some(dir) = &cgroup {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        let marked = crate::tree::marked(&prefix);
        if marked.is_empty() {
            break;
        }
        for pid in marked.into_iter().filter(|p| p.as_raw() > 1) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::process::exit(0);
}
