//! Which processes belong to an app process rolld started, found in `/proc`.
//!
//! A process group is not enough: an app that daemonizes (fork, `setsid`, fork again)
//! leaves its group and its session, and its parent exits, so the daemon is re-parented
//! to rolld (the child subreaper) with nothing tying it to the set it came from. So every
//! app process gets a mark in its environment (`ROLLD_PROCESS=<rolld pid>/<generation>/
//! <port>`), which every descendant inherits unless it clears its environment: a
//! process belongs to a started process when it is in its group, descends from a
//! member, or carries its mark. (In cgroup mode the cgroup is exact; see `cgroup`.)

use std::collections::{HashMap, HashSet};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::warn;

/// The environment variable that marks an app process and its descendants.
pub const MARK_VAR: &str = "ROLLD_PROCESS";

/// The mark of the process rolld starts on `port` for `generation`.
pub fn mark(generation: u64, port: u16) -> String {
    format!("{}/{generation}/{port}", std::process::id())
}

/// The start of every mark this rolld gives, for the guard.
pub fn marks_of(rolld: u32) -> String {
    format!("{rolld}/")
}

/// One live process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgid: i32,
}

/// The live processes (zombies left out: they hold nothing and run nothing).
fn snapshot() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_of)
        .collect()
}

/// `pid`, if it is alive (not a zombie).
fn proc_of(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state, ppid, pgrp.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    Some(Proc {
        pid,
        ppid: fields.next()?.parse().ok()?,
        pgid: fields.next()?.parse().ok()?,
    })
}

/// rolld's live descendants, found by walking `/proc/PID/task/TID/children` down from
/// rolld: a few reads, however many processes the host runs. While rolld lives, every
/// process of its sets is one of them: a daemon is re-parented to rolld (the subreaper)
/// or to a subreaper below it. `None` where the kernel has no `children` files.
fn own_descendants() -> Option<Vec<Proc>> {
    let own = std::process::id() as i32;
    if !Path::new(&format!("/proc/{own}/task/{own}/children")).exists() {
        return None;
    }
    let mut found = Vec::new();
    let mut seen = HashSet::from([own]);
    let mut todo = vec![own];
    // Each pid is visited once, so this ends; the bound holds it on a runaway fork bomb.
    while let Some(pid) = todo.pop() {
        if found.len() > 100_000 {
            break;
        }
        for child in children_of(pid) {
            if seen.insert(child) {
                todo.push(child);
                if let Some(p) = proc_of(child) {
                    found.push(p);
                }
            }
        }
    }
    Some(found)
}

/// The children of every thread of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The value of [`MARK_VAR`] in `pid`'s environment, if it has one.
fn mark_of(pid: i32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{MARK_VAR}=");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// The live processes that belong to the process `leader` rolld started with `mark`:
/// its group, the processes carrying the mark, and their descendants. rolld itself is
/// never one of them.
pub fn members(leader: Pid, mark: Option<&str>) -> Vec<Pid> {
    let procs = own_descendants().unwrap_or_else(snapshot);
    let own = std::process::id() as i32;
    let mut found: HashSet<i32> = procs
        .iter()
        .filter(|p| {
            p.pid != own
                && (p.pgid == leader.as_raw()
                    || p.pid == leader.as_raw()
                    || mark.is_some_and(|m| mark_of(p.pid).as_deref() == Some(m)))
        })
        .map(|p| p.pid)
        .collect();
    add_descendants(&procs, &mut found, own);
    found.into_iter().map(Pid::from_raw).collect()
}

/// Every live process whose mark starts with `prefix` (all sets of one rolld), with
/// their descendants.
pub fn marked(prefix: &str) -> Vec<Pid> {
    let procs = snapshot();
    let own = std::process::id() as i32;
    let mut found: HashSet<i32> = procs
        .iter()
        .filter(|p| p.pid != own && mark_of(p.pid).is_some_and(|m| m.starts_with(prefix)))
        .map(|p| p.pid)
        .collect();
    add_descendants(&procs, &mut found, own);
    found.into_iter().map(Pid::from_raw).collect()
}

fn add_descendants(procs: &[Proc], found: &mut HashSet<i32>, own: i32) {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut todo: Vec<i32> = found.iter().copied().collect();
    // Each pid enters `found` once, so this ends after at most `procs.len()` rounds.
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).map_or(&[][..], Vec::as_slice) {
            if child != own && found.insert(child) {
                todo.push(child);
            }
        }
    }
}

/// The process rolld started or adopted (a child of rolld) that `pid` descends from; or
/// `pid` itself when it carries one of rolld's marks but left rolld's tree.
pub fn rolld_descendant(pid: Pid) -> Option<Pid> {
    let procs = snapshot();
    let own = std::process::id() as i32;
    let parents: HashMap<i32, i32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut at = pid.as_raw();
    // A chain of parents is at most as long as the process table.
    for _ in 0..=procs.len() {
        match parents.get(&at) {
            Some(&parent) if parent == own => return Some(Pid::from_raw(at)),
            Some(&parent) if parent > 1 => at = parent,
            _ => break,
        }
    }
    let ours = marks_of(std::process::id());
    mark_of(pid.as_raw())
        .is_some_and(|m| m.starts_with(&ours))
        .then_some(pid)
}

/// `top` and its live descendants.
pub fn subtree(top: Pid) -> Vec<Pid> {
    let procs = snapshot();
    let mut found = HashSet::from([top.as_raw()]);
    add_descendants(&procs, &mut found, std::process::id() as i32);
    found.into_iter().map(Pid::from_raw).collect()
}

/// Sends `sig` to each of `pids`; one already gone is not an error.
pub fn signal_all(pids: &[Pid], sig: Signal) {
    let own = std::process::id() as i32;
    // kill(0) and kill(-1) mean groups and "everyone", and init is never an app.
    for &pid in pids.iter().filter(|p| p.as_raw() > 1 && p.as_raw() != own) {
        match kill(pid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => warn!(pid = pid.as_raw(), signal = %sig, error = %err, "cannot signal"),
        }
    }
}

/// Whether `pid` runs (a zombie does not).
pub fn live(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The short name (`comm`) of `pid`, for messages.
pub fn name_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|n| n.trim_end().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_process_and_its_children_are_members_whatever_their_group() {
        let mark = format!("test-{}", std::process::id());
        // A shell in a session of its own with a child: neither is in our group.
        let mut child = std::process::Command::new("setsid")
            .args(["sh", "-c", "sleep 30 & wait"])
            .env(MARK_VAR, &mark)
            .env_remove("X")
            .spawn()
            .expect("start setsid sh");
        let shell = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = members(Pid::from_raw(i32::MAX), Some(&mark));
            if found.len() >= 2 || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        signal_all(&found, Signal::SIGKILL);
        let _ = child.wait();
        assert!(found.contains(&Pid::from_raw(shell)), "{found:?}");
        assert_eq!(found.len(), 2, "the shell and its sleep: {found:?}");
        assert!(members(Pid::from_raw(i32::MAX), Some("no such mark")).is_empty());
    }
}
