//! cgroup v2 mode: where the host delegates a cgroup v2 subtree to rolld (the `cgroup`
//! setting, or systemd's `Delegate=yes`), every app process runs in a cgroup of its own
//! under its set's: `<root>/rolld-<pid>/set-<generation>/port-<port>`. Stopping is then
//! exact, however an app forks or daemonizes: the stop signal, the stop timeout, then
//! `cgroup.kill`. The set's cgroup gives `rolld status` its memory and CPU.
//!
//! Without a delegated subtree, rolld falls back to process groups, marks and the child
//! subreaper (see `tree`); [`Mode`] says which one runs, for `rolld check` and the log.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;
use tracing::{debug, warn};

/// How rolld keeps its app processes together.
#[derive(Debug)]
pub enum Mode {
    /// A delegated cgroup v2 subtree; `how` says how it was found.
    Cgroup { root: PathBuf, how: &'static str },
    /// Process groups, marks and the child subreaper.
    Groups { why: String },
}

impl Mode {
    /// The mode for `setting` (the `cgroup` key): a configured folder must be a usable
    /// cgroup v2 folder, else rolld does not start; without one, a subtree systemd
    /// delegated to rolld's service is used if there is one.
    pub fn choose(setting: Option<&Path>) -> Result<Mode, String> {
        if let Some(root) = setting {
            usable(root).map_err(|why| format!("`cgroup` {}: {why}", root.display()))?;
            return Ok(Mode::Cgroup {
                root: root.to_path_buf(),
                how: "the `cgroup` setting",
            });
        }
        match delegated() {
            Ok(root) => Ok(Mode::Cgroup {
                root,
                how: "delegated by systemd (Delegate=yes)",
            }),
            Err(why) => Ok(Mode::Groups { why }),
        }
    }

    /// One line for `rolld check` and the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Mode::Cgroup { root, how } => format!(
                "cgroup v2 under {} ({how}); a set is stopped with cgroup.kill",
                root.display()
            ),
            Mode::Groups { why } => format!(
                "process groups + child subreaper ({why}); daemonized processes are found by their mark"
            ),
        }
    }
}

/// Why `dir` cannot hold rolld's cgroups, if it cannot.
fn usable(dir: &Path) -> Result<(), String> {
    if !dir.join("cgroup.controllers").is_file() || !dir.join("cgroup.procs").is_file() {
        return Err("not a cgroup v2 folder (no cgroup.controllers and cgroup.procs)".into());
    }
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("cannot create cgroups in it ({e})"))
}

/// The cgroup systemd delegated to rolld's service, if it did: rolld's own cgroup on a
/// unified hierarchy, marked delegated (`trusted.delegate` or `user.delegate`, which
/// systemd sets with `Delegate=yes`) and writable.
fn delegated() -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Err("no cgroup v2 hierarchy".into());
    };
    let mount = Path::new("/sys/fs/cgroup");
    if !mount.join("cgroup.controllers").is_file() {
        return Err("no unified cgroup v2 hierarchy at /sys/fs/cgroup".into());
    }
    let dir = mount.join(path.trim_start_matches('/'));
    if dir == mount || !is_delegated(&dir) {
        return Err(
            "no cgroup delegated to rolld: no `cgroup` setting, no systemd Delegate=yes".into(),
        );
    }
    usable(&dir)?;
    Ok(dir)
}

fn is_delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let (Ok(path), Ok(name)) = (
            CString::new(dir.as_os_str().as_bytes()),
            CString::new(*name),
        ) else {
            return false;
        };
        let mut value = [0u8; 8];
        // SAFETY: both strings are NUL-terminated and `value` is writable for its length.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        n > 0 && value[0] == b'1'
    })
}

/// rolld's own part of the hierarchy: `<root>/rolld-<pid>`.
#[derive(Debug)]
pub struct Hierarchy {
    dir: PathBuf,
}

impl Hierarchy {
    /// Creates rolld's folder under `root`. When rolld itself runs in `root` (systemd's
    /// delegated service cgroup), rolld moves to `<root>/supervisor` first: a cgroup with
    /// processes of its own cannot hand controllers to its children.
    pub fn create(root: &Path) -> io::Result<Hierarchy> {
        let own = Pid::from_raw(std::process::id() as i32);
        let in_root = read_procs(root).contains(&own);
        if in_root {
            let leaf = root.join("supervisor");
            make_dir(&leaf)?;
            std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
        }
        // Memory and CPU figures for the sets, where the controllers are available.
        enable_controllers(root);
        let dir = root.join(format!("rolld-{}", std::process::id()));
        make_dir(&dir)?;
        enable_controllers(&dir);
        Ok(Hierarchy { dir })
    }

    /// rolld's folder; writing `1` to its `cgroup.kill` kills every app process.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup of the set `generation`.
    pub fn set_dir(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("set-{generation}"))
    }

    /// Creates the cgroup of the process of `generation` on `port`.
    pub fn create_process(&self, generation: u64, port: u16) -> io::Result<Cgroup> {
        let set = self.set_dir(generation);
        make_dir(&set)?;
        let dir = set.join(format!("port-{port}"));
        make_dir(&dir)?;
        Cgroup::at(dir)
    }

    /// The processes in the cgroup of the process of `generation` on `port`.
    pub fn procs_of(&self, generation: u64, port: u16) -> Vec<Pid> {
        read_procs(&self.set_dir(generation).join(format!("port-{port}")))
    }

    /// Removes the (empty) cgroup of the set `generation`.
    pub fn remove_set(&self, generation: u64) {
        remove_dir(&self.set_dir(generation));
    }

    /// Memory in bytes (if the memory controller is on) and CPU time in microseconds
    /// used by the set `generation`.
    pub fn usage(&self, generation: u64) -> (Option<u64>, Option<u64>) {
        let set = self.set_dir(generation);
        let memory = std::fs::read_to_string(set.join("memory.current"))
            .ok()
            .and_then(|m| m.trim().parse().ok());
        let cpu = std::fs::read_to_string(set.join("cpu.stat"))
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            });
        (memory, cpu)
    }
}

impl Hierarchy {
    /// Kills whatever is left (a set that failed to stop) and removes rolld's cgroups.
    /// Called as rolld exits; again on drop, which then finds nothing to do.
    pub fn close(&self) {
        if !self.dir.exists() {
            return;
        }
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        if let Ok(sets) = std::fs::read_dir(&self.dir) {
            for set in sets.flatten().filter(|e| e.path().is_dir()) {
                if let Ok(procs) = std::fs::read_dir(set.path()) {
                    for p in procs.flatten().filter(|e| e.path().is_dir()) {
                        remove_dir(&p.path());
                    }
                }
                remove_dir(&set.path());
            }
        }
        remove_dir(&self.dir);
    }
}

fn read_procs(dir: &Path) -> Vec<Pid> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Pid::from_raw)
        .collect()
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
}

/// Removes an empty cgroup; the kernel may take a moment to empty it after a kill.
/// Blocks for at most 100 ms.
fn remove_dir(dir: &Path) {
    for _ in 0..10 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => {
                debug!(cgroup = %dir.display(), error = %e, "cannot remove cgroup");
                return;
            }
        }
    }
    warn!(cgroup = %dir.display(), "cgroup still busy; left in place");
}

fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["memory", "cpu"] {
        if available.split_whitespace().any(|c| c == controller) {
            if let Err(e) =
                std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"))
            {
                debug!(cgroup = %dir.display(), controller, error = %e, "cannot enable controller");
            }
        }
    }
}

/// The cgroup of one app process (and of everything it forks).
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    /// `cgroup.procs`, ready for the forked child to write itself into before exec
    /// (no allocation there).
    procs_file: CString,
}

impl Cgroup {
    fn at(dir: PathBuf) -> io::Result<Cgroup> {
        let procs_file = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| io::Error::other("a cgroup path with a NUL byte"))?;
        Ok(Cgroup { dir, procs_file })
    }

    /// Moves the calling process into this cgroup. Async-signal-safe: called between
    /// fork and exec.
    pub fn join_self(procs_file: &std::ffi::CStr) -> io::Result<()> {
        use nix::fcntl::{open, OFlag};
        let fd = open(
            procs_file,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: `fd` was just opened and is owned here.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        nix::unistd::write(&fd, b"0")?;
        Ok(())
    }

    pub fn procs_file(&self) -> &std::ffi::CStr {
        &self.procs_file
    }

    /// The processes in it now.
    pub fn procs(&self) -> Vec<Pid> {
        read_procs(&self.dir)
    }

    /// Whether any process is in it.
    pub fn populated(&self) -> bool {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
            // Gone, or unreadable: ask the process list.
            Err(_) => !self.procs().is_empty(),
        }
    }

    /// Kills every process in it, including those forked meanwhile.
    pub fn kill(&self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), "1") {
            // A kernel before 5.14 has no cgroup.kill: signal each process instead.
            debug!(cgroup = %self.dir.display(), error = %e, "no cgroup.kill");
            crate::tree::signal_all(&self.procs(), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.populated() {
            remove_dir(&self.dir);
        }
    }
}
