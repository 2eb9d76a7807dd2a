//! Prometheus text-format metrics, kept with atomics and one small histogram.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::jobs::lock;

/// Upper bounds (seconds) of the step-time histogram buckets.
const STEP_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; STEP_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters of the worker.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs that produced images.
    pub completed: AtomicU64,
    /// Jobs that failed.
    pub failed: AtomicU64,
    /// Jobs cancelled (requests, interrupts, shutdown, disconnects).
    pub cancelled: AtomicU64,
    /// Submissions answered 429.
    pub rejected: AtomicU64,
    /// Connections answered 503 because `--max-connections` were open.
    pub refused_connections: AtomicU64,
    /// Finished jobs evicted from the job table by its count or byte cap.
    pub evicted: AtomicU64,
    /// Models loaded on the engine now.
    pub models_loaded: AtomicU64,
    /// Their weight bytes (the model cache's measure).
    pub model_bytes: AtomicU64,
    /// Model loads since start (switching to a model not in the cache).
    pub model_loads: AtomicU64,
    steps: Mutex<Histogram>,
    job_seconds: Mutex<(f64, u64)>,
}

impl Metrics {
    /// Records one denoising step's duration.
    pub fn observe_step(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = lock(&self.steps);
        for (i, b) in STEP_BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Records a finished job's run time (used for Retry-After estimates).
    pub fn observe_job(&self, d: Duration) {
        let mut g = lock(&self.job_seconds);
        g.0 += d.as_secs_f64();
        g.1 += 1;
    }

    /// Mean run time of finished jobs, if any finished.
    pub fn mean_job_seconds(&self) -> Option<f64> {
        let g = lock(&self.job_seconds);
        (g.1 > 0).then(|| g.0 / g.1 as f64)
    }

    /// Renders every metric; the gauges (`queue_depth`, `running`, `ready`, the job table's size)
    /// are read by the caller.
    pub fn render(&self, queue_depth: usize, running: bool, ready: bool, stored: (usize, usize)) -> String {
        let mut s = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(s, "# HELP sd_worker_queue_depth Jobs waiting behind the running one.");
        let _ = writeln!(s, "# TYPE sd_worker_queue_depth gauge");
        let _ = writeln!(s, "sd_worker_queue_depth {queue_depth}");
        let _ = writeln!(s, "# HELP sd_worker_running_jobs Jobs on the engine (0 or 1).");
        let _ = writeln!(s, "# TYPE sd_worker_running_jobs gauge");
        let _ = writeln!(s, "sd_worker_running_jobs {}", u8::from(running));
        let _ = writeln!(s, "# HELP sd_worker_model_ready Whether the model is loaded.");
        let _ = writeln!(s, "# TYPE sd_worker_model_ready gauge");
        let _ = writeln!(s, "sd_worker_model_ready {}", u8::from(ready));
        let _ = writeln!(s, "# HELP sd_worker_models_loaded Models loaded on the engine (the one in use and the cached).");
        let _ = writeln!(s, "# TYPE sd_worker_models_loaded gauge");
        let _ = writeln!(s, "sd_worker_models_loaded {}", c(&self.models_loaded));
        let _ = writeln!(s, "# HELP sd_worker_model_bytes Weight bytes of the loaded models.");
        let _ = writeln!(s, "# TYPE sd_worker_model_bytes gauge");
        let _ = writeln!(s, "sd_worker_model_bytes {}", c(&self.model_bytes));
        let _ = writeln!(s, "# HELP sd_worker_model_loads_total Model loads, the first included.");
        let _ = writeln!(s, "# TYPE sd_worker_model_loads_total counter");
        let _ = writeln!(s, "sd_worker_model_loads_total {}", c(&self.model_loads));
        let _ = writeln!(s, "# HELP sd_worker_stored_jobs Jobs held in memory (queued, running and finished).");
        let _ = writeln!(s, "# TYPE sd_worker_stored_jobs gauge");
        let _ = writeln!(s, "sd_worker_stored_jobs {}", stored.0);
        let _ = writeln!(s, "# HELP sd_worker_stored_bytes Bytes of prompts, previews and images the job table holds.");
        let _ = writeln!(s, "# TYPE sd_worker_stored_bytes gauge");
        let _ = writeln!(s, "sd_worker_stored_bytes {}", stored.1);
        let _ = writeln!(s, "# HELP sd_worker_jobs_total Finished jobs by outcome.");
        let _ = writeln!(s, "# TYPE sd_worker_jobs_total counter");
        let _ = writeln!(s, "sd_worker_jobs_total{{outcome=\"completed\"}} {}", c(&self.completed));
        let _ = writeln!(s, "sd_worker_jobs_total{{outcome=\"failed\"}} {}", c(&self.failed));
        let _ = writeln!(s, "sd_worker_jobs_total{{outcome=\"cancelled\"}} {}", c(&self.cancelled));
        let _ = writeln!(s, "# HELP sd_worker_rejected_total Submissions refused because the queue was full.");
        let _ = writeln!(s, "# TYPE sd_worker_rejected_total counter");
        let _ = writeln!(s, "sd_worker_rejected_total {}", c(&self.rejected));
        let _ = writeln!(s, "# HELP sd_worker_refused_connections_total Connections refused because --max-connections were open.");
        let _ = writeln!(s, "# TYPE sd_worker_refused_connections_total counter");
        let _ = writeln!(s, "sd_worker_refused_connections_total {}", c(&self.refused_connections));
        let _ = writeln!(s, "# HELP sd_worker_evicted_jobs_total Finished jobs dropped from memory by the job table's caps.");
        let _ = writeln!(s, "# TYPE sd_worker_evicted_jobs_total counter");
        let _ = writeln!(s, "sd_worker_evicted_jobs_total {}", c(&self.evicted));
        let h = lock(&self.steps);
        let _ = writeln!(s, "# HELP sd_worker_step_seconds Duration of one denoising step.");
        let _ = writeln!(s, "# TYPE sd_worker_step_seconds histogram");
        for (b, n) in STEP_BUCKETS.iter().zip(h.counts.iter()) {
            let _ = writeln!(s, "sd_worker_step_seconds_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(s, "sd_worker_step_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(s, "sd_worker_step_seconds_sum {}", h.sum);
        let _ = writeln!(s, "sd_worker_step_seconds_count {}", h.count);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_step(Duration::from_millis(3));
        m.observe_step(Duration::from_millis(70));
        let text = m.render(2, true, true, (3, 1000));
        assert!(text.contains("sd_worker_step_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("sd_worker_step_seconds_bucket{le=\"0.1\"} 2"), "{text}");
        assert!(text.contains("sd_worker_step_seconds_count 2"), "{text}");
        assert!(text.contains("sd_worker_queue_depth 2"), "{text}");
        assert!(text.contains("sd_worker_stored_jobs 3") && text.contains("sd_worker_stored_bytes 1000"), "{text}");
    }
}
