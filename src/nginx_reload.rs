//! Knowing when an nginx in front of rolld has finished a reload.
//!
//! `nginx -s reload` (and `systemctl reload nginx`) return once the master has been
//! signalled, before it has read the new upstreams and started new workers. Until the
//! master tells its old workers to stop, they accept new clients and send them to the
//! old ports. With sparse traffic the old set can look drained (no connection for a
//! while) in that gap, and stopping it then would turn the next requests into 502s.
//!
//! So when an `after_start` command names nginx, rolld notes the workers of every nginx
//! master before running it, and drains the old set only once one of those masters has
//! none of its noted workers accepting any more (each exited, or titled "shutting
//! down") and it has new ones, up to `drain_timeout`. Worker titles are nginx's own
//! (`nginx: worker process`, `... is shutting down`), read from `/proc`. On a host
//! with several nginx masters, another one reloading at that moment ends the wait
//! early: the drain then falls back to watching the old set's connections alone.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Action;

/// The accepting workers of each nginx master before a reload.
#[derive(Debug)]
pub struct Reload {
    before: HashMap<i32, HashSet<i32>>,
}

/// How often `/proc` is read while waiting.
const POLL: Duration = Duration::from_millis(50);

impl Reload {
    /// Notes nginx's workers, when one of `actions` is a command that names nginx and
    /// an nginx master runs on this machine.
    pub fn before(actions: &[Action]) -> Option<Reload> {
        let names_nginx = actions.iter().any(|action| match action {
            Action::RunProc { command } => command.contains("nginx"),
            Action::ReplaceFile { .. } => false,
        });
        if !names_nginx {
            return None;
        }
        let before = accepting_workers();
        (!before.is_empty()).then_some(Reload { before })
    }

    /// Whether one of the masters noted has reloaded: it has accepting workers, none of
    /// them noted. (A master that is gone says nothing: it may be another nginx.)
    fn done(&self) -> bool {
        let now = accepting_workers();
        self.before.iter().any(|(master, workers)| {
            now.get(master)
                .is_some_and(|current| !current.is_empty() && workers.is_disjoint(current))
        })
    }

    /// Waits until nginx's reload has taken effect, or `deadline`.
    pub async fn wait(&self, generation: u64, deadline: tokio::time::Instant) {
        let mut logged = false;
        while !self.done() {
            if tokio::time::Instant::now() >= deadline {
                warn!(generation, "drain_timeout passed and nginx's old workers still accept; the old set stops anyway");
                return;
            }
            if !logged {
                info!(
                    generation,
                    "waiting for nginx's reload: its old workers still accept clients"
                );
                logged = true;
            }
            tokio::time::sleep(POLL).await;
        }
        if logged {
            info!(generation, "nginx's old workers stopped accepting");
        }
    }
}

/// nginx's accepting workers, by master, from `/proc`.
fn accepting_workers() -> HashMap<i32, HashSet<i32>> {
    let mut masters: HashMap<i32, HashSet<i32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return masters;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // nginx sets its title over argv: "nginx: worker process" while it accepts,
        // "nginx: worker process is shutting down" once told to stop.
        let title = String::from_utf8_lossy(&cmdline);
        let title = title.trim_end_matches('\0');
        if !title.starts_with("nginx: worker process") || title.contains("shutting down") {
            continue;
        }
        if let Some(master) = parent_of(pid) {
            masters.entry(master).or_default().insert(pid);
        }
    }
    masters
}

/// The parent of `pid`, from `/proc/PID/stat` (after the command, which may hold
/// spaces and parentheses).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_command_that_names_nginx_waits_for_it() {
        let haproxy = [Action::RunProc {
            command: "systemctl reload haproxy".into(),
        }];
        assert!(Reload::before(&haproxy).is_none());
    }

    #[test]
    fn a_process_parent_is_read_past_a_command_with_parentheses() {
        let me = std::process::id() as i32;
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
    }
}
