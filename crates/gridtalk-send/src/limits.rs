//! The send limits: the number's throughput and the per-recipient pair limit, both GCRA.
//!
//! The throughput limiter is governor's. The pair limiter keeps one theoretical arrival time per
//! recipient so that it can be **seeded**: when an outbox partition moves to this process, the
//! sends its previous owner made (restored from the sent index with their times) are replayed
//! into it, so a recipient who just got a burst from the old owner is not sent another burst by
//! the new one.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use gridtalk_config::SendConfig;
use gridtalk_telemetry::Metrics;

/// Both limiters of one sending number.
pub struct SendLimits {
    throughput: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
    pair: PairLimiter,
}

impl std::fmt::Debug for SendLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendLimits")
    }
}

impl SendLimits {
    pub fn new(config: &SendConfig) -> Self {
        let margin = config.rate_safety_margin_percent as f64 / 100.0;
        // Throughput: evenly spaced sends (burst 1), so no one-second window ever holds more than
        // the limit even when Meta counts in sliding windows.
        let per_second = (config.max_messages_per_second as f64 * (1.0 - margin)).max(0.1);
        let spacing = Duration::from_secs_f64(1.0 / per_second);
        let throughput = Quota::with_period(spacing)
            .expect("positive spacing")
            .allow_burst(NonZeroU32::MIN);
        let pair_spacing =
            Duration::from_secs_f64(config.pair_interval_ms as f64 / 1000.0 * (1.0 + margin));
        SendLimits {
            throughput: RateLimiter::direct(throughput),
            pair: PairLimiter::new(
                pair_spacing.max(Duration::from_millis(1)),
                config.pair_burst.max(1),
            ),
        }
    }

    /// Waits until `recipient` may receive a message and the number may send one, and counts
    /// the send against both limits at the same instant, right before it goes out.
    ///
    /// The pair limit is only *checked* before the throughput wait and charged after it: charged
    /// first, a long throughput wait after one send and a short one after the next would bring
    /// the two closer together at WhatsApp than the pair limiter allowed. Sends to one recipient
    /// are one at a time, so nothing else charges the recipient's bucket in between.
    pub async fn until_ready(&self, recipient: &str) {
        let metrics = Metrics::global();
        let started = Instant::now();
        self.pair.until_conforming(recipient).await;
        metrics
            .rate_limit_wait_seconds
            .with_label_values(&["pair"])
            .observe(started.elapsed().as_secs_f64());
        let started = Instant::now();
        self.throughput.until_ready().await;
        metrics
            .rate_limit_wait_seconds
            .with_label_values(&["throughput"])
            .observe(started.elapsed().as_secs_f64());
        self.pair.until_taken(recipient).await;
    }

    /// Waits for the number's throughput only: for calls that are not messages to the
    /// recipient (marking their message read), which the pair limit does not count.
    pub async fn until_throughput(&self) {
        let started = Instant::now();
        self.throughput.until_ready().await;
        Metrics::global()
            .rate_limit_wait_seconds
            .with_label_values(&["throughput"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts sends another process made (recipient, wall-clock milliseconds) against the pair
    /// limit, as if this process had made them. The previous owner may also have had one send
    /// per recipient on the wire when it gave the partition up (sends to one recipient are one
    /// at a time), which the restored history cannot show yet: for `in_flight_window` (the send
    /// request timeout) every recipient is charged one such send.
    pub fn seed_pair_history(
        &self,
        sends: &[(String, i64)],
        now_ms: i64,
        in_flight_window: Duration,
    ) {
        self.pair
            .seed(sends, now_ms, Instant::now(), in_flight_window);
    }

    /// How far back a send still weighs on its recipient's pair limit.
    pub fn pair_memory(&self) -> Duration {
        self.pair.memory()
    }

    /// Drops limiter state of recipients idle long enough to be full again.
    pub fn shrink(&self) {
        self.pair.shrink(Instant::now());
    }
}

/// GCRA per recipient: `spacing` between sends on average, up to `burst` at once.
#[derive(Debug)]
struct PairLimiter {
    spacing: Duration,
    burst: u32,
    /// Theoretical arrival time per recipient: the instant the recipient's bucket is empty again.
    arrivals: Mutex<HashMap<String, Instant>>,
    /// Until then, a recipient not seen yet starts with one send charged (see `seed`).
    unseen_charged_until: Mutex<Option<Instant>>,
}

impl PairLimiter {
    fn new(spacing: Duration, burst: u32) -> Self {
        PairLimiter {
            spacing,
            burst,
            arrivals: Mutex::new(HashMap::new()),
            unseen_charged_until: Mutex::new(None),
        }
    }

    /// How far ahead of now a recipient's arrival time may be while a send still conforms.
    fn tolerance(&self) -> Duration {
        self.spacing.saturating_mul(self.burst)
    }

    /// Sends older than this leave no trace in a recipient's bucket.
    fn memory(&self) -> Duration {
        self.tolerance().saturating_add(self.spacing)
    }

    /// Takes a send for `recipient` at `now` if it conforms; otherwise says how long to wait.
    fn try_take(&self, recipient: &str, now: Instant) -> Result<(), Duration> {
        self.check(recipient, now, true)
    }

    /// Whether a send for `recipient` would conform at `now`, without taking it.
    fn would_take(&self, recipient: &str, now: Instant) -> Result<(), Duration> {
        self.check(recipient, now, false)
    }

    fn check(&self, recipient: &str, now: Instant, take: bool) -> Result<(), Duration> {
        let mut arrivals = self.arrivals.lock().expect("pair limiter");
        let unseen = match *self.unseen_charged_until.lock().expect("pair limiter") {
            Some(until) if now < until => now + self.spacing,
            _ => now,
        };
        let arrival = arrivals.get(recipient).copied().unwrap_or(unseen).max(now);
        let next = arrival + self.spacing;
        let earliest = next.checked_sub(self.tolerance()).unwrap_or(now);
        if earliest > now {
            return Err(earliest - now);
        }
        if take {
            arrivals.insert(recipient.to_string(), next);
        }
        Ok(())
    }

    async fn until_conforming(&self, recipient: &str) {
        while let Err(wait) = self.would_take(recipient, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    async fn until_taken(&self, recipient: &str) {
        while let Err(wait) = self.try_take(recipient, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    fn seed(&self, sends: &[(String, i64)], now_ms: i64, now: Instant, in_flight_window: Duration) {
        let mut ordered: Vec<&(String, i64)> = sends.iter().collect();
        ordered.sort_by_key(|(_, at)| *at);
        let window = self.memory();
        let mut arrivals = self.arrivals.lock().expect("pair limiter");
        let mut recent = Vec::new();
        for (recipient, at_ms) in ordered {
            let ago = Duration::from_millis(now_ms.saturating_sub(*at_ms).max(0) as u64);
            if ago > window {
                continue; // long enough ago to leave no trace in the bucket
            }
            let at = now.checked_sub(ago).unwrap_or(now);
            let arrival = arrivals.get(recipient).copied().unwrap_or(at).max(at);
            arrivals.insert(recipient.clone(), arrival + self.spacing);
            recent.push(recipient);
        }
        recent.sort();
        recent.dedup();
        for recipient in recent {
            let arrival = arrivals[recipient.as_str()].max(now);
            arrivals.insert(recipient.clone(), arrival + self.spacing);
        }
        let mut until = self.unseen_charged_until.lock().expect("pair limiter");
        *until = Some(until.unwrap_or(now).max(now + in_flight_window));
    }

    fn shrink(&self, now: Instant) {
        let mut arrivals = self.arrivals.lock().expect("pair limiter");
        arrivals.retain(|_, arrival| *arrival > now);
        arrivals.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACING: Duration = Duration::from_millis(200);

    fn sends_allowed_at(limiter: &PairLimiter, recipient: &str, at: Instant) -> usize {
        (0..100)
            .take_while(|_| limiter.try_take(recipient, at).is_ok())
            .count()
    }

    #[test]
    fn allows_a_burst_then_one_per_spacing() {
        let limiter = PairLimiter::new(SPACING, 5);
        let start = Instant::now();
        assert_eq!(limiter.would_take("a", start), Ok(()));
        assert_eq!(
            limiter.would_take("a", start),
            Ok(()),
            "checking takes nothing"
        );
        assert_eq!(sends_allowed_at(&limiter, "a", start), 5);
        assert_eq!(limiter.try_take("a", start), Err(SPACING));
        assert_eq!(sends_allowed_at(&limiter, "a", start + SPACING), 1);
        assert_eq!(sends_allowed_at(&limiter, "b", start), 5, "per recipient");
        // Idle long enough, the whole burst is back.
        assert_eq!(sends_allowed_at(&limiter, "a", start + SPACING * 20), 5);
    }

    #[test]
    fn a_seeded_history_counts_like_own_sends_plus_one_in_flight() {
        let now = Instant::now();
        let now_ms = 1_000_000;
        // The previous owner sent "a" a burst of 4 in the last 100 ms, and "b" one 10 s ago.
        let history: Vec<(String, i64)> = (0..4)
            .map(|i| ("a".to_string(), now_ms - 100 + i * 10))
            .chain([("b".to_string(), now_ms - 10_000)])
            .collect();
        let limiter = PairLimiter::new(SPACING, 5);
        let window = Duration::from_secs(10);
        limiter.seed(&history, now_ms, now, window);
        // 4 restored + 1 possibly in flight: the burst of 5 is used up.
        assert!(limiter.try_take("a", now).is_err());
        // Old history leaves no trace, but anyone may have had one send in flight at the
        // handover, while the window lasts.
        assert_eq!(sends_allowed_at(&limiter, "b", now), 4);
        assert_eq!(sends_allowed_at(&limiter, "c", now), 4);
        assert_eq!(sends_allowed_at(&limiter, "d", now + window), 5);
    }

    #[test]
    fn idle_recipients_are_dropped_by_shrink() {
        let limiter = PairLimiter::new(SPACING, 2);
        let now = Instant::now();
        limiter.try_take("a", now).unwrap();
        limiter.shrink(now + SPACING * 3);
        assert!(limiter.arrivals.lock().unwrap().is_empty());
    }
}
