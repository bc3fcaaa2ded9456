//! What rolld is doing, for `rolld status`, `/status` and `/metrics`: written by the
//! keepers, rolls and the supervisor, read by the control socket and the admin server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::histogram::Histogram;
use rolld_proxy::Outcomes;
use serde::{Deserialize, Serialize};

use crate::cgroup::Hierarchy;
use crate::rollout::{Phase, Reason};

/// The shared record. Counters are atomics; the rest sits behind one lock taken only on
/// state changes (process started, roll phase) and reads, never per request.
#[derive(Debug)]
pub struct Board {
    state: Mutex<State>,
    pub rolls_started: AtomicU64,
    pub rolls_succeeded: AtomicU64,
    pub rolls_rolled_back: AtomicU64,
    pub restarts: AtomicU64,
    /// Seconds each drain took.
    pub drain_seconds: Histogram,
    /// rolld's cgroups (cgroup mode), for each set's memory and CPU.
    cgroups: std::sync::OnceLock<Arc<Hierarchy>>,
    /// Releases rolled back after their switch (canary or bake), by [`Reason`].
    pub rollbacks_after_switch: [AtomicU64; 3],
    /// The new set's failed share at the last look of a canary or bake (f64 bits).
    judged_error_rate: AtomicU64,
}

/// A canary or bake in progress, for status and metrics.
#[derive(Debug, Clone)]
pub struct RolloutView {
    pub phase: Phase,
    pub generation: u64,
    pub old_generation: u64,
    pub ends_at: Instant,
    /// The sets' request counts (none without the built-in proxy).
    pub new: Option<Arc<Outcomes>>,
    pub old: Option<Arc<Outcomes>>,
}

#[derive(Debug, Default)]
struct State {
    serving: Option<u64>,
    processes: BTreeMap<(u64, u16), Process>,
    roll: Option<(u64, String)>,
    last_roll: Option<LastRoll>,
    /// The TLS listener's certificates, as last loaded.
    certificates: Vec<crate::tls::CertInfo>,
    rollout: Option<RolloutView>,
}

#[derive(Debug, Clone)]
struct Process {
    pid: Option<i32>,
    state: &'static str,
    since: Instant,
    restarts: u32,
}

/// How the last roll ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastRoll {
    pub generation: u64,
    /// `succeeded`, `rolled back` or `refused`.
    pub outcome: String,
    pub message: String,
    pub duration_ms: u64,
    /// Unix time (seconds) when it ended.
    pub finished_at: u64,
}

/// The JSON of `rolld status --json` and `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// The generation serving now (none before the first set is ready).
    pub generation: Option<u64>,
    pub processes: Vec<ProcessStatus>,
    /// Each set's memory and CPU, from its cgroup (cgroup mode only).
    #[serde(default)]
    pub sets: Vec<SetUsage>,
    pub upstreams: Vec<UpstreamStatus>,
    /// The roll in progress, if any.
    pub roll: Option<RollStatus>,
    pub last_roll: Option<LastRoll>,
    /// The canary or bake in progress, if any.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    /// Lines (rolld's log, app output) dropped because rolld's stdout or stderr was
    /// stalled or closed.
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// Requests waiting for a set (see `proxy.hold_timeout`), and what became of
    /// those that waited.
    #[serde(default)]
    pub held: HeldStatus,
    /// Requests sent again after their app process failed before answering, and the
    /// 502s by why they were not (see `proxy.retries`).
    #[serde(default)]
    pub retries: RetryStatus,
    /// Seconds left of the pause on now (`rolld pause`), if one is on.
    #[serde(default)]
    pub paused_for_s: Option<f64>,
    /// Maintenance mode (`rolld maintenance on`): every request gets the page.
    #[serde(default)]
    pub maintenance: Option<MaintenanceStatus>,
    /// The TLS listener's certificates (none without `tls`).
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
    /// What the request and response buffers hold (none without the built-in proxy).
    #[serde(default)]
    pub buffers: Option<BufferStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BufferStatus {
    /// Bytes of request bodies and answers in memory now.
    pub memory_bytes: u64,
    /// Bytes of request bodies and answers in temporary files now.
    pub disk_bytes: u64,
    /// Request bodies that went (partly) to disk so far.
    pub requests_spilled: u64,
    /// Answers that went (partly) to disk so far.
    pub responses_spilled: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldStatus {
    pub now: usize,
    pub released: u64,
    pub timed_out: u64,
    pub refused: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RetryStatus {
    /// Requests sent again, by reason (`connect`, `unsent`, `no_answer`, `timeout`).
    pub by_reason: std::collections::BTreeMap<String, u64>,
    /// Retries the retry budget refused.
    pub refused_by_budget: u64,
    /// 502 answers, by why the request was not sent again.
    pub bad_gateway: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MaintenanceStatus {
    /// `text/html` or `text/plain`.
    pub content_type: String,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub cert: String,
    pub names: Vec<String>,
    /// Unix time (seconds) of its expiry.
    pub not_after: i64,
    pub days_left: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub generation: u64,
    pub port: u16,
    pub pid: Option<i32>,
    pub state: String,
    pub uptime_s: f64,
    pub restarts: u32,
}

/// What a set uses, from its cgroup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetUsage {
    pub generation: u64,
    /// `memory.current`; none when the memory controller is not enabled for rolld.
    pub memory_bytes: Option<u64>,
    /// `usage_usec` of `cpu.stat`: CPU time used, in microseconds.
    pub cpu_usec: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub addr: String,
    pub in_flight: usize,
    pub available: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// `canary` or `bake`.
    pub phase: String,
    pub generation: u64,
    pub old_generation: u64,
    pub seconds_left: f64,
    /// The new set's requests with an outcome, and how many failed.
    pub new_requests: u64,
    pub new_failed: u64,
    pub old_requests: u64,
    pub old_failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollStatus {
    pub generation: u64,
    pub phase: String,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            state: Mutex::default(),
            rolls_started: AtomicU64::new(0),
            rolls_succeeded: AtomicU64::new(0),
            rolls_rolled_back: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            drain_seconds: Histogram::new([0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
            cgroups: std::sync::OnceLock::new(),
            rollbacks_after_switch: Default::default(),
            judged_error_rate: AtomicU64::new(0),
        }
    }
}

impl Board {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where each set's usage comes from, in cgroup mode.
    pub fn set_cgroups(&self, cgroups: Option<Arc<Hierarchy>>) {
        if let Some(cgroups) = cgroups {
            let _ = self.cgroups.set(cgroups);
        }
    }

    /// A process changed state; `pid` None keeps the one known.
    pub fn process(&self, generation: u64, port: u16, pid: Option<i32>, state: &'static str) {
        let mut s = self.state();
        let entry = s.processes.entry((generation, port)).or_insert(Process {
            pid,
            state,
            since: Instant::now(),
            restarts: 0,
        });
        if state == "running" && entry.state != "running" {
            entry.since = Instant::now();
        }
        if pid.is_some() {
            entry.pid = pid;
        }
        entry.state = state;
    }

    pub fn restarted(&self, generation: u64, port: u16) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = self.state().processes.get_mut(&(generation, port)) {
            p.restarts += 1;
        }
    }

    /// The process is gone for good.
    pub fn forget(&self, generation: u64, port: u16) {
        self.state().processes.remove(&(generation, port));
    }

    pub fn serving(&self, generation: u64) {
        self.state().serving = Some(generation);
    }

    /// The current roll reached `phase`.
    pub fn phase(&self, generation: u64, phase: impl Into<String>) {
        self.state().roll = Some((generation, phase.into()));
    }

    /// A canary or bake began (`Some`) or ended (`None`).
    pub fn rollout(&self, view: Option<RolloutView>) {
        self.state().rollout = view;
    }

    /// The phase of the canary or bake in progress, if any.
    pub fn rollout_phase(&self) -> Option<Phase> {
        self.state().rollout.as_ref().map(|r| r.phase)
    }

    /// The new set's failed share at the last look.
    pub fn judged(&self, rate: f64) {
        self.judged_error_rate
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    pub fn judged_error_rate(&self) -> f64 {
        f64::from_bits(self.judged_error_rate.load(Ordering::Relaxed))
    }

    /// A release was rolled back after its switch.
    pub fn rolled_back_after_switch(&self, reason: Reason) {
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.rollbacks_after_switch[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn roll_ended(&self, generation: u64, outcome: &str, message: String, took: Duration) {
        let mut s = self.state();
        s.roll = None;
        s.last_roll = Some(LastRoll {
            generation,
            outcome: outcome.to_string(),
            message,
            duration_ms: took.as_millis() as u64,
            finished_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
    }

    /// The TLS certificates now served to new handshakes.
    pub fn set_certificates(&self, certificates: Vec<crate::tls::CertInfo>) {
        self.state().certificates = certificates;
    }

    pub fn certificates(&self) -> Vec<crate::tls::CertInfo> {
        self.state().certificates.clone()
    }

    pub fn snapshot(&self, proxy: Option<&rolld_proxy::Proxy>) -> Snapshot {
        let front = proxy.map(|p| p.upstreams());
        let upstreams = front;
        let s = self.state();
        let processes = s
            .processes
            .iter()
            .map(|(&(generation, port), p)| ProcessStatus {
                generation,
                port,
                pid: p.pid,
                state: p.state.to_string(),
                uptime_s: if p.state == "running" {
                    p.since.elapsed().as_secs_f64()
                } else {
                    0.0
                },
                restarts: p.restarts,
            })
            .collect();
        let upstreams = upstreams.map_or_else(Vec::new, |u| {
            u.current()
                .upstreams()
                .iter()
                .map(|u| UpstreamStatus {
                    addr: u.addr().to_string(),
                    in_flight: u.in_flight(),
                    available: u.is_available(),
                })
                .collect()
        });
        let sets = match self.cgroups.get() {
            Some(cgroups) => {
                let generations: std::collections::BTreeSet<u64> =
                    s.processes.keys().map(|&(g, _)| g).collect();
                generations
                    .into_iter()
                    .map(|generation| {
                        let (memory_bytes, cpu_usec) = cgroups.usage(generation);
                        SetUsage {
                            generation,
                            memory_bytes,
                            cpu_usec,
                        }
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        Snapshot {
            generation: s.serving,
            processes,
            sets,
            upstreams,
            roll: s.roll.as_ref().map(|(generation, phase)| RollStatus {
                generation: *generation,
                phase: phase.clone(),
            }),
            last_roll: s.last_roll.clone(),
            rollout: s.rollout.as_ref().map(|r| {
                let new = r.new.as_ref().map(|o| o.counts()).unwrap_or_default();
                let old = r.old.as_ref().map(|o| o.counts()).unwrap_or_default();
                RolloutStatus {
                    phase: r.phase.to_string(),
                    generation: r.generation,
                    old_generation: r.old_generation,
                    seconds_left: r
                        .ends_at
                        .saturating_duration_since(Instant::now())
                        .as_secs_f64(),
                    new_requests: new.requests,
                    new_failed: new.failed(),
                    old_requests: old.requests,
                    old_failed: old.failed(),
                }
            }),
            log_lines_dropped: crate::logs::dropped(),
            held: front.map_or_else(HeldStatus::default, |u| {
                let h = u.held();
                HeldStatus {
                    now: h.held,
                    released: h.released,
                    timed_out: h.timed_out,
                    refused: h.refused,
                }
            }),
            retries: proxy.map_or_else(RetryStatus::default, |p| {
                let stats = p.stats().snapshot();
                let named = |counts: &[(&str, u64)]| {
                    counts
                        .iter()
                        .map(|(reason, n)| (reason.to_string(), *n))
                        .collect()
                };
                RetryStatus {
                    by_reason: named(&stats.retries),
                    refused_by_budget: stats.retries_refused_by_budget,
                    bad_gateway: named(&stats.bad_gateways),
                }
            }),
            paused_for_s: front.and_then(|u| u.paused_until()).map(|until| {
                until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs_f64()
            }),
            maintenance: proxy
                .and_then(|p| p.maintenance())
                .map(|page| MaintenanceStatus {
                    content_type: if page.is_html() {
                        "text/html"
                    } else {
                        "text/plain"
                    }
                    .into(),
                    bytes: page.len(),
                }),
            certificates: s
                .certificates
                .iter()
                .map(|c| CertificateStatus {
                    cert: c.cert.display().to_string(),
                    names: c.names.clone(),
                    not_after: c.not_after,
                    days_left: c.days_left(SystemTime::now()),
                })
                .collect(),
            buffers: proxy.map(|p| {
                let b = p.buffer_stats();
                BufferStatus {
                    memory_bytes: b.memory_bytes,
                    disk_bytes: b.disk_bytes,
                    requests_spilled: b.requests_spilled,
                    responses_spilled: b.responses_spilled,
                }
            }),
        }
    }
}

impl Snapshot {
    /// The human-readable form of `rolld status`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        match self.generation {
            Some(g) => {
                let _ = writeln!(out, "generation {g} serving");
            }
            None => {
                let _ = writeln!(out, "no generation serving yet");
            }
        }
        let _ = writeln!(
            out,
            "{:<6} {:<6} {:<8} {:<11} {:>9} {:>8}",
            "GEN", "PORT", "PID", "STATE", "UPTIME", "RESTARTS"
        );
        for p in &self.processes {
            let pid = p.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
            let _ = writeln!(
                out,
                "{:<6} {:<6} {:<8} {:<11} {:>8.0}s {:>8}",
                p.generation, p.port, pid, p.state, p.uptime_s, p.restarts
            );
        }
        for set in &self.sets {
            let memory = set.memory_bytes.map_or_else(
                || "n/a (no memory controller)".to_string(),
                |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
            );
            let cpu = set.cpu_usec.map_or_else(
                || "n/a".to_string(),
                |us| format!("{:.2} s", us as f64 / 1e6),
            );
            let _ = writeln!(
                out,
                "set {} (cgroup): memory {memory}, cpu {cpu}",
                set.generation
            );
        }
        for u in &self.upstreams {
            let _ = writeln!(
                out,
                "upstream {} in flight {}{}",
                u.addr,
                u.in_flight,
                if u.available { "" } else { " (unavailable)" }
            );
        }
        if let Some(r) = &self.roll {
            let _ = writeln!(
                out,
                "roll to generation {} in progress: {}",
                r.generation, r.phase
            );
        }
        if let Some(r) = &self.rollout {
            let _ = writeln!(
                out,
                "{} of generation {}: {:.0}s left; new set {} request(s), {} failed; old set (generation {}) {} request(s), {} failed",
                r.phase,
                r.generation,
                r.seconds_left,
                r.new_requests,
                r.new_failed,
                r.old_generation,
                r.old_requests,
                r.old_failed
            );
        }
        if let Some(l) = &self.last_roll {
            let _ = writeln!(
                out,
                "last roll: generation {} {} in {} ms: {}",
                l.generation, l.outcome, l.duration_ms, l.message
            );
        }
        if let Some(m) = &self.maintenance {
            let _ = writeln!(
                out,
                "maintenance on: every request gets 503 with a {} page of {} bytes",
                m.content_type, m.bytes
            );
        }
        if let Some(left) = self.paused_for_s {
            let _ = writeln!(
                out,
                "paused: new requests are held; resumes by itself in {left:.0}s"
            );
        }
        let h = &self.held;
        if h.now > 0 || h.released > 0 || h.timed_out > 0 || h.refused > 0 {
            let _ = writeln!(
                out,
                "held requests: {} now, {} released, {} timed out, {} refused (queue full)",
                h.now, h.released, h.timed_out, h.refused
            );
        }
        let r = &self.retries;
        let listed = |counts: &std::collections::BTreeMap<String, u64>| {
            let nonzero: Vec<String> = counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect();
            (!nonzero.is_empty()).then(|| nonzero.join(", "))
        };
        let (resent, failed) = (listed(&r.by_reason), listed(&r.bad_gateway));
        if resent.is_some() || failed.is_some() || r.refused_by_budget > 0 {
            let _ = writeln!(
                out,
                "retries: {}; {} refused by the budget; 502s: {}",
                resent.as_deref().unwrap_or("none"),
                r.refused_by_budget,
                failed.as_deref().unwrap_or("none")
            );
        }
        if let Some(b) = &self.buffers {
            if *b != BufferStatus::default() {
                let _ = writeln!(
                    out,
                    "buffers: {} bytes in memory, {} on disk; spilled to disk so far: {} request(s), {} answer(s)",
                    b.memory_bytes, b.disk_bytes, b.requests_spilled, b.responses_spilled
                );
            }
        }
        for c in &self.certificates {
            let _ = writeln!(
                out,
                "certificate {}: {} days to expiry ({})",
                c.names.join(", "),
                c.days_left,
                c.cert
            );
        }
        if self.log_lines_dropped > 0 {
            let _ = writeln!(
                out,
                "log lines dropped: {} (rolld's stdout/stderr stalled or closed)",
                self.log_lines_dropped
            );
        }
        out
    }
}
