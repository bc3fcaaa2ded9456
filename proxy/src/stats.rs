//! Counters of the proxy's traffic, kept as plain atomics so the per-request cost is a
//! few relaxed increments; the caller renders them in whatever format it serves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::retry::{NotResent, RetryReason};

/// Upper bounds (seconds) of the upstream response time histogram's buckets.
pub const RESPONSE_TIME_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Traffic counters of one proxy.
#[derive(Debug, Default)]
pub struct Stats {
    /// Responses by status class: index 0 is 1xx, 4 is 5xx.
    responses: [AtomicU64; 5],
    /// Upstream response times (until the response headers): one counter per bucket of
    /// [`RESPONSE_TIME_BUCKETS`] (not cumulative), then the overflow.
    buckets: [AtomicU64; 13],
    sum_micros: AtomicU64,
    /// HTTP/1 client connections that gave hyper's buffers back while idle (see
    /// `activity`): the saving is invisible otherwise.
    idle_releases: AtomicU64,
    /// Requests sent again, by [`RetryReason`] (in the order of `RetryReason::ALL`).
    retries: [AtomicU64; RetryReason::ALL.len()],
    /// Retries the retry budget refused (the request got its error at once).
    retries_refused: AtomicU64,
    /// 502 answers, by [`NotResent`] (in the order of `NotResent::ALL`).
    bad_gateways: [AtomicU64; NotResent::ALL.len()],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    /// Counts per bucket (not cumulative): each bound of [`RESPONSE_TIME_BUCKETS`], then
    /// `f64::MAX` for the rest.
    pub buckets: Vec<(f64, u64)>,
    pub response_count: u64,
    pub response_seconds_sum: f64,
    /// Times an idle HTTP/1 client connection gave its buffers back.
    pub idle_releases: u64,
    /// Requests sent again, by reason (`connect`, `unsent`, `no_answer`, `timeout`).
    pub retries: Vec<(&'static str, u64)>,
    /// Retries the retry budget refused.
    pub retries_refused_by_budget: u64,
    /// 502 answers, by why the request was not sent again.
    pub bad_gateways: Vec<(&'static str, u64)>,
}

impl Stats {
    pub(crate) fn count_response(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_idle_release(&self) {
        self.idle_releases.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_retry(&self, reason: RetryReason) {
        let i = RetryReason::ALL.iter().position(|&r| r == reason);
        if let Some(i) = i {
            self.retries[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_retry_refused(&self) {
        self.retries_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_bad_gateway(&self, why: NotResent) {
        let i = NotResent::ALL.iter().position(|&r| r == why);
        if let Some(i) = i {
            self.bad_gateways[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn observe_upstream(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = RESPONSE_TIME_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(RESPONSE_TIME_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let responses = std::array::from_fn(|i| self.responses[i].load(Ordering::Relaxed));
        let buckets: Vec<(f64, u64)> = RESPONSE_TIME_BUCKETS
            .iter()
            .chain(std::iter::once(&f64::MAX))
            .zip(&self.buckets)
            .map(|(&bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let response_count = buckets.iter().map(|(_, n)| n).sum();
        StatsSnapshot {
            responses,
            buckets,
            response_count,
            response_seconds_sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            idle_releases: self.idle_releases.load(Ordering::Relaxed),
            retries: RetryReason::ALL
                .iter()
                .zip(&self.retries)
                .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
                .collect(),
            retries_refused_by_budget: self.retries_refused.load(Ordering::Relaxed),
            bad_gateways: NotResent::ALL
                .iter()
                .zip(&self.bad_gateways)
                .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_classes_and_cumulative_buckets() {
        let stats = Stats::default();
        stats.count_response(http::StatusCode::OK);
        stats.count_response(http::StatusCode::BAD_GATEWAY);
        stats.observe_upstream(Duration::from_millis(3));
        stats.observe_upstream(Duration::from_secs(30));
        let s = stats.snapshot();
        assert_eq!(s.responses, [0, 1, 0, 0, 1]);
        assert_eq!(s.response_count, 2);
        assert_eq!(s.buckets[0], (0.001, 0));
        assert_eq!(s.buckets[1], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::MAX, 1)));
    }

    #[test]
    fn counts_retries_and_502s_by_reason() {
        let stats = Stats::default();
        stats.count_retry(RetryReason::NoAnswer);
        stats.count_retry(RetryReason::NoAnswer);
        stats.count_retry(RetryReason::Timeout);
        stats.count_retry_refused();
        stats.count_bad_gateway(NotResent::Budget);
        let s = stats.snapshot();
        assert_eq!(
            s.retries,
            vec![
                ("connect", 0),
                ("unsent", 0),
                ("no_answer", 2),
                ("timeout", 1)
            ]
        );
        assert_eq!(s.retries_refused_by_budget, 1);
        assert!(s.bad_gateways.contains(&("budget", 1)));
        assert_eq!(s.bad_gateways.iter().map(|(_, n)| n).sum::<u64>(), 1);
    }
}
