//! The rollout guard: judging a release on real traffic after its health checks.
//!
//! Health checks and smoke tests only say a release starts. rolld counts every request
//! of each upstream set exactly (the proxy's [`Outcomes`]), so during a canary and a
//! bake it watches the new set's failed share and its crashes, and tells the roll to
//! switch back the moment a threshold is crossed, while the old processes still run.
//! This module decides; `rolling` acts (swaps, drains, stops).

use std::sync::Arc;
use std::time::Duration;

use rolld_proxy::{OutcomeCounts, Outcomes};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::info;

use crate::config::Rollout;
use crate::generation::Generation;
use crate::status::{Board, RolloutView};

/// Where a guarded roll is between its switch-over steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A share of new requests goes to the new set.
    Canary,
    /// Every new request goes to the new set; the old set stays up, idle.
    Bake,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Canary => "canary",
            Phase::Bake => "bake",
        })
    }
}

/// What an operator asks of a canary or bake in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// End it now, for the new set (`rolld promote`, or a reload during a bake).
    Promote,
    /// Switch back to the old set now (`rolld rollback`).
    RollBack,
}

/// An operator's decision and where to say what came of it.
#[derive(Debug)]
pub struct Operator {
    pub decision: Decision,
    /// Hears what was done, or why nothing was.
    pub reply: Option<oneshot::Sender<Result<String, String>>>,
}

/// Why a release was rolled back, as metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ErrorRate,
    Crash,
    Operator,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::ErrorRate, Reason::Crash, Reason::Operator];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ErrorRate => "error_rate",
            Reason::Crash => "crash",
            Reason::Operator => "operator",
        }
    }
}

/// How a phase ended.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// The new set passed (or the operator promoted it); in words.
    Promote(String),
    /// The operator promoted the new set: no further phase.
    Promoted,
    /// Switch back, and why.
    RollBack { reason: Reason, message: String },
    /// rolld is shutting down.
    Shutdown,
}

/// How often the counts are looked at during a phase.
const JUDGE_EVERY: Duration = Duration::from_millis(50);

/// Everything one phase watches.
pub struct Watch<'a> {
    pub phase: Phase,
    pub rollout: &'a Rollout,
    pub length: Duration,
    /// The new set's counts (none without the built-in proxy: crashes only).
    pub new: Option<Arc<Outcomes>>,
    /// The old set's counts from before the switch: its own failure rate is the
    /// baseline the new set is compared with.
    pub old: Option<Arc<Outcomes>>,
    pub baseline: Option<OutcomeCounts>,
    pub generation: &'a Generation,
    pub old_generation: u64,
    pub operator: &'a mut mpsc::UnboundedReceiver<Operator>,
    pub cancel: watch::Receiver<bool>,
    pub board: &'a Board,
}

impl Watch<'_> {
    /// Watches the new set for the phase's length, or until a threshold is crossed,
    /// the operator decides, or rolld shuts down.
    pub async fn run(self) -> Verdict {
        let Watch {
            phase,
            rollout,
            length,
            new,
            old,
            baseline,
            generation,
            old_generation,
            operator,
            mut cancel,
            board,
        } = self;
        let counts = || new.as_ref().map(|n| n.counts()).unwrap_or_default();
        let at_start = counts();
        let crashes_at_start = generation.crashes().len();
        let deadline = Instant::now() + length;
        board.rollout(Some(RolloutView {
            phase,
            generation: generation.id,
            old_generation,
            ends_at: std::time::Instant::now() + length,
            new: new.clone(),
            old: old.clone(),
        }));
        let verdict = loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    let judged = since(counts(), at_start);
                    break Verdict::Promote(format!(
                        "{phase} of {} passed: {}",
                        humantime::format_duration(length),
                        describe(judged)
                    ));
                }
                () = first_of(tokio::time::sleep(JUDGE_EVERY), generation.crashed()) => {
                    let crashes = generation.crashes();
                    if let Some(crash) = crashes.get(crashes_at_start) {
                        break Verdict::RollBack {
                            reason: Reason::Crash,
                            message: crash.clone(),
                        };
                    }
                    let judged = since(counts(), at_start);
                    let rate = judge(judged, baseline, rollout);
                    board.judged(judged.failure_rate());
                    if let Some(message) = rate {
                        break Verdict::RollBack { reason: Reason::ErrorRate, message };
                    }
                }
                asked = operator.recv() => {
                    let Some(Operator { decision, reply }) = asked else {
                        // The supervisor is gone: only the timer and the counts decide.
                        std::future::pending::<()>().await;
                        continue;
                    };
                    let (verdict, said) = match decision {
                        Decision::Promote => (
                            Verdict::Promoted,
                            format!("promoting generation {} ({phase} ended early)", generation.id),
                        ),
                        Decision::RollBack => (
                            Verdict::RollBack {
                                reason: Reason::Operator,
                                message: format!("asked by the operator during the {phase}"),
                            },
                            format!("rolling back to generation {old_generation}"),
                        ),
                    };
                    info!(generation = generation.id, "{said}");
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(said));
                    }
                    break verdict;
                }
                stopped = async { cancel.wait_for(|stop| *stop).await.is_ok() } => {
                    if stopped {
                        break Verdict::Shutdown;
                    }
                    // The supervisor is gone: only the timer and the counts decide.
                    std::future::pending::<()>().await;
                }
            }
        };
        board.rollout(None);
        verdict
    }
}

/// Resolves when either does.
async fn first_of(
    a: impl std::future::Future<Output = ()>,
    b: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = a => {}
        () = b => {}
    }
}

/// Counts between two readings.
fn since(now: OutcomeCounts, start: OutcomeCounts) -> OutcomeCounts {
    OutcomeCounts {
        requests: now.requests.saturating_sub(start.requests),
        server_errors: now.server_errors.saturating_sub(start.server_errors),
        upstream_errors: now.upstream_errors.saturating_sub(start.upstream_errors),
    }
}

/// `12 of 400 requests failed (5xx 10, upstream errors 2)`, for reports.
fn describe(c: OutcomeCounts) -> String {
    format!(
        "{} of {} request(s) failed{}",
        c.failed(),
        c.requests,
        detail(c)
    )
}

fn detail(c: OutcomeCounts) -> String {
    match (c.server_errors, c.upstream_errors) {
        (_, 0) => format!(" (5xx {})", c.server_errors),
        (0, u) => format!(" (upstream errors {u})"),
        (s, u) => format!(" (5xx {s}, upstream errors {u})"),
    }
}

/// Percent, as an operator reads it: `7.5%`, `2%`.
fn percent(share: f64) -> String {
    let p = share * 100.0;
    if (p - p.round()).abs() < 0.05 {
        format!("{}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

/// Whether `counts` of the new set cross `max_error_rate`: `None` while they do not,
/// or while there are fewer than `min_requests`. When the old set failed on its own
/// before the switch (`baseline`, over at least `min_requests`), only the failures
/// above its rate count against the new set.
pub fn judge(
    counts: OutcomeCounts,
    baseline: Option<OutcomeCounts>,
    rollout: &Rollout,
) -> Option<String> {
    if counts.requests < rollout.min_requests {
        return None;
    }
    let rate = counts.failure_rate();
    let base = baseline
        .filter(|b| b.requests >= rollout.min_requests)
        .map_or(0.0, |b| b.failure_rate());
    if rate - base <= rollout.max_error_rate {
        return None;
    }
    let above = if base > 0.0 {
        format!(" above the old set's {}", percent(base))
    } else {
        String::new()
    };
    Some(format!(
        "{} of {} requests failed{} > {}{above}",
        percent(rate),
        counts.requests,
        detail(counts),
        percent(rollout.max_error_rate)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        Rollout {
            canary: None,
            bake: Duration::from_secs(60),
            max_error_rate: 0.02,
            min_requests: 50,
        }
    }

    fn counts(requests: u64, server_errors: u64, upstream_errors: u64) -> OutcomeCounts {
        OutcomeCounts {
            requests,
            server_errors,
            upstream_errors,
        }
    }

    #[test]
    fn a_failure_rate_over_the_threshold_is_judged_with_its_numbers() {
        assert_eq!(
            judge(counts(400, 30, 0), None, &rollout()).as_deref(),
            Some("7.5% of 400 requests failed (5xx 30) > 2%")
        );
        assert_eq!(
            judge(counts(100, 2, 1), None, &rollout()).as_deref(),
            Some("3% of 100 requests failed (5xx 2, upstream errors 1) > 2%")
        );
        // At the threshold is not over it.
        assert_eq!(judge(counts(100, 2, 0), None, &rollout()), None);
    }

    #[test]
    fn fewer_than_min_requests_are_not_judged() {
        assert_eq!(judge(counts(49, 49, 0), None, &rollout()), None);
        assert!(judge(counts(50, 49, 0), None, &rollout()).is_some());
    }

    #[test]
    fn the_old_sets_own_failure_rate_is_the_baseline() {
        // The old set failed 5% by itself: 6% is within 2% of that, 8% is not.
        let old = Some(counts(1000, 50, 0));
        assert_eq!(judge(counts(100, 6, 0), old, &rollout()), None);
        assert_eq!(
            judge(counts(100, 8, 0), old, &rollout()).as_deref(),
            Some("8% of 100 requests failed (5xx 8) > 2% above the old set's 5%")
        );
        // A baseline over too few requests says nothing.
        assert!(judge(counts(100, 6, 0), Some(counts(10, 5, 0)), &rollout()).is_some());
    }

    #[test]
    fn counts_of_a_phase_start_at_its_start() {
        assert_eq!(
            since(counts(500, 40, 3), counts(100, 10, 1)),
            counts(400, 30, 2)
        );
        assert_eq!(
            describe(counts(400, 30, 2)),
            "32 of 400 request(s) failed (5xx 30, upstream errors 2)"
        );
    }
}
