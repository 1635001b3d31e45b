//! The send limits: the number's throughput and the per-recipient pair limit, as GCRA limiters.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use gridtalk_config::SendConfig;
use gridtalk_telemetry::Metrics;

/// Both limiters of one sending number.
pub struct SendLimits {
    throughput: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
    pair: RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>,
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
        let pair = Quota::with_period(pair_spacing.max(Duration::from_millis(1)))
            .expect("positive spacing")
            .allow_burst(NonZeroU32::new(config.pair_burst).unwrap_or(NonZeroU32::MIN));
        SendLimits {
            throughput: RateLimiter::direct(throughput),
            pair: RateLimiter::keyed(pair),
        }
    }

    /// Waits until `recipient` may receive a message and the number may send one.
    pub async fn until_ready(&self, recipient: &str) {
        let metrics = Metrics::global();
        let started = Instant::now();
        self.pair.until_key_ready(&recipient.to_string()).await;
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
    }

    /// Drops limiter state of recipients idle long enough to be full again.
    pub fn shrink(&self) {
        self.pair.retain_recent();
        self.pair.shrink_to_fit();
    }
}
