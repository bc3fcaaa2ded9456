//! The guard: a small process that kills every app process group if rolld dies.
//!
//! `PR_SET_PDEATHSIG` only reaches a direct child, so an app that forks workers would
//! leave them behind when rolld is killed with SIGKILL. The guard is forked before
//! anything else runs and holds the read end of a pipe, and nothing else (no listening
//! socket, no log pipe); rolld writes each process
//! group it starts (`+pgid`) and stops (`-pgid`). When rolld dies, for any reason, the
//! kernel closes the write end, the guard reads end-of-file and kills what is left.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::sys::signal::{killpg, signal, SigHandler, Signal};
use nix::unistd::{fork, ForkResult, Pid};

/// rolld's end of the guard's pipe.
pub struct Guard {
    pipe: Mutex<File>,
    pid: Pid,
}

impl Guard {
    /// Forks the guard.
    ///
    /// # Safety
    /// Must be called while the process has a single thread (before the runtime starts):
    /// the child goes on running ordinary Rust code after `fork`.
    pub unsafe fn start() -> std::io::Result<Guard> {
        // The contract, checked where it can be: a thread started too early (a log
        // writer, say) would make the child's state incoherent.
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            let threads = tasks.count();
            if threads > 1 {
                return Err(std::io::Error::other(format!(
                    "rolld has {threads} threads; the guard must be forked while it has one"
                )));
            }
        }
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: the caller guarantees a single thread, so the child's memory is coherent.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(write);
                let read = hold_only(read);
                run(read)
            }
            ForkResult::Parent { child } => {
                drop(read);
                Ok(Guard {
                    pipe: Mutex::new(File::from(write)),
                    pid: child,
                })
            }
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
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
        let mut pipe = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        // One short line is written atomically to a pipe. If the guard is gone the write
        // fails; the supervisor already logged that when it reaped the guard.
        let _ = pipe.write_all(format!("{op}{pgid}\n").as_bytes());
    }
}

/// Closes every descriptor the guard inherited but `keep`, and points stdin, stdout and
/// stderr at /dev/null. Held by the guard, rolld's listening sockets would outlive
/// rolld's closing them (new clients would connect and hang during a shutdown instead of
/// being refused), and so would its control socket and the log pipe.
fn hold_only(keep: OwnedFd) -> OwnedFd {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let keep = keep.into_raw_fd();
    if let Ok(null) = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    ) {
        for fd in 0..3 {
            if fd != null {
                let _ = nix::unistd::dup2(null, fd);
            }
        }
        if null > 2 {
            let _ = nix::unistd::close(null);
        }
    }
    // Collected before closing: the listing holds a descriptor of its own.
    let open: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        // Without /proc, every possible descriptor.
        Err(_) => {
            let max = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft.min(1 << 20));
            (3..max as i32).collect()
        }
    };
    for fd in open {
        if fd > 2 && fd != keep {
            let _ = nix::unistd::close(fd);
        }
    }
    // SAFETY: `keep` came from `into_raw_fd` above and was not closed.
    let kept = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(keep) };
    debug_assert!(kept.as_raw_fd() == keep);
    kept
}

/// The guard's whole life.
fn run(read: OwnedFd) -> ! {
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
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let _ = nix::sys::prctl::set_name(c"rolld-guard");

    let mut groups = BTreeSet::new();
    let mut lines = BufReader::new(File::from(read));
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
            "+" => groups.insert(pgid),
            "-" => groups.remove(&pgid),
            _ => false,
        };
    }
    for pgid in groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    std::process::exit(0);
}
