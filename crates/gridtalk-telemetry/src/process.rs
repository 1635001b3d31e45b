//! The standard `process_*` metrics (CPU time, memory, open files, threads, start time), read from
//! `/proc/self` at each scrape. On systems without `/proc` they are left out.

use prometheus::{Counter, Gauge, Registry};

/// Clock ticks per second of `/proc/self/stat` times (`USER_HZ`, 100 on every Linux ABI).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub(crate) struct ProcessMetrics {
    cpu_seconds: Counter,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    threads: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    pub(crate) fn register(registry: &Registry) -> ProcessMetrics {
        let counter = |name: &str, help: &str| {
            let c = Counter::new(name, help).expect("metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        ProcessMetrics {
            cpu_seconds: counter(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ),
            resident_memory: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            virtual_memory: gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ),
            open_fds: gauge("process_open_fds", "Number of open file descriptors."),
            threads: gauge("process_threads", "Number of OS threads in the process."),
            start_time: gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ),
        }
    }

    /// Reads `/proc/self` into the metrics; a file that cannot be read leaves its metrics as
    /// they were.
    pub(crate) fn update(&self) {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name, which is in parentheses and may contain spaces.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let field = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
                // rest[0] is field 3 (state): utime is field 14, stime 15, threads 20, starttime 22.
                if let (Some(user), Some(system)) = (field(11), field(12)) {
                    let total = (user + system) / TICKS_PER_SECOND;
                    let delta = total - self.cpu_seconds.get();
                    if delta > 0.0 {
                        self.cpu_seconds.inc_by(delta);
                    }
                }
                if let Some(threads) = field(17) {
                    self.threads.set(threads);
                }
                if let (Some(start), Some(boot)) = (field(19), boot_time()) {
                    self.start_time.set(boot + start / TICKS_PER_SECOND);
                }
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kib = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|v| v * 1024.0)
            };
            if let Some(rss) = kib("VmRSS:") {
                self.resident_memory.set(rss);
            }
            if let Some(size) = kib("VmSize:") {
                self.virtual_memory.set(size);
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(entries.count() as f64);
        }
    }
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}
