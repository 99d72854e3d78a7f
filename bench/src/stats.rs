//! Percentiles, reload windows and per-second series.

/// One finished request: when it completed (µs since the load started), how long
/// it took, and whether it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub done_us: u64,
    pub latency_us: u32,
    pub ok: bool,
}

impl Sample {
    pub fn start_us(&self) -> u64 {
        self.done_us.saturating_sub(self.latency_us as u64)
    }
}

/// Successful requests grouped by when they started after the latest reload start
/// (`marks`, sorted µs): the latency of each `[edges[i], edges[i+1])` ms. Where inside
/// a reload the latency goes.
pub fn by_offset(samples: &[Sample], marks: &[u64], edges_ms: &[u64]) -> Vec<Latency> {
    let mut groups = vec![Vec::new(); edges_ms.len().saturating_sub(1)];
    for sample in samples.iter().filter(|s| s.ok) {
        let start = sample.start_us();
        let Some(mark) = marks[..marks.partition_point(|&m| m <= start)].last() else {
            continue;
        };
        let offset_ms = (start - mark) / 1000;
        if let Some(i) = edges_ms
            .windows(2)
            .position(|w| w[0] <= offset_ms && offset_ms < w[1])
        {
            groups[i].push(sample.latency_us);
        }
    }
    groups.into_iter().map(Latency::of).collect()
}

pub use ally_testkit::stats::percentile;

/// Time intervals in µs since the load started, sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Windows(Vec<(u64, u64)>);

impl Windows {
    pub fn new(mut intervals: Vec<(u64, u64)>) -> Windows {
        intervals.sort();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
        for (start, end) in intervals {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Windows(merged)
    }

    pub fn intervals(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Whether `[start, end]` overlaps a window.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // The first window that ends at or after `start`.
        let i = self.0.partition_point(|&(_, e)| e < start);
        self.0.get(i).is_some_and(|&(s, _)| s <= end)
    }

    /// Total time covered, µs.
    pub fn covered_us(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Latency figures of a set of requests, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
}

impl Latency {
    pub fn of(mut values: Vec<u32>) -> Latency {
        values.sort_unstable();
        Latency {
            count: values.len() as u64,
            p50: percentile(&values, 50.0),
            p99: percentile(&values, 99.0),
            max: values.last().copied().unwrap_or(0),
        }
    }
}

/// What a run of load amounted to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub failed: u64,
    /// Successful requests per second over the whole run.
    pub rps: f64,
    /// Successful requests that overlapped no reload window.
    pub steady: Latency,
    /// Successful requests that overlapped a reload window.
    pub reload: Latency,
}

/// Summarises `samples` of a load that ran `duration_us`.
pub fn summarise(samples: &[Sample], windows: &Windows, duration_us: u64) -> Summary {
    let mut steady = Vec::new();
    let mut reload = Vec::new();
    let mut failed = 0;
    for s in samples {
        if !s.ok {
            failed += 1;
        } else if windows.overlaps(s.start_us(), s.done_us) {
            reload.push(s.latency_us);
        } else {
            steady.push(s.latency_us);
        }
    }
    let ok = samples.len() as u64 - failed;
    Summary {
        requests: samples.len() as u64,
        failed,
        rps: if duration_us == 0 {
            0.0
        } else {
            ok as f64 * 1e6 / duration_us as f64
        },
        steady: Latency::of(steady),
        reload: Latency::of(reload),
    }
}

/// Successful and failed requests per second, by completion time.
pub fn per_second(samples: &[Sample], seconds: usize) -> Vec<(u64, u64)> {
    let mut series = vec![(0u64, 0u64); seconds];
    for s in samples {
        let i = (s.done_us / 1_000_000) as usize;
        if let Some(slot) = series.get_mut(i) {
            if s.ok {
                slot.0 += 1;
            } else {
                slot.1 += 1;
            }
        }
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_merge_and_overlap() {
        let w = Windows::new(vec![(50, 60), (10, 20), (15, 30), (100, 100)]);
        assert_eq!(w.intervals(), &[(10, 30), (50, 60), (100, 100)]);
        assert_eq!(w.covered_us(), 30);
        assert!(w.overlaps(0, 10));
        assert!(w.overlaps(25, 40));
        assert!(!w.overlaps(31, 49));
        assert!(w.overlaps(31, 50));
        assert!(w.overlaps(100, 200));
        assert!(!w.overlaps(61, 99));
        assert!(!w.overlaps(101, 500));
        assert!(!Windows::default().overlaps(0, u64::MAX));
    }

    #[test]
    fn summary_splits_by_window_and_counts_failures() {
        let s = |done_us, latency_us, ok| Sample {
            done_us,
            latency_us,
            ok,
        };
        let samples = vec![
            s(1_000, 100, true),
            s(2_000, 100, true),
            s(5_100, 200, true), // started at 4_900: overlaps the window
            s(5_500, 900, false),
            s(9_000, 300, true),
        ];
        let w = Windows::new(vec![(5_000, 6_000)]);
        let sum = summarise(&samples, &w, 1_000_000);
        assert_eq!(sum.requests, 5);
        assert_eq!(sum.failed, 1);
        assert_eq!(sum.rps, 4.0);
        assert_eq!(sum.steady.count, 3);
        assert_eq!(sum.steady.max, 300);
        assert_eq!(sum.reload.count, 1);
        assert_eq!(sum.reload.p99, 200);
        let series = per_second(
            &[s(10, 1, true), s(999_999, 1, false), s(1_000_000, 1, true)],
            3,
        );
        assert_eq!(series, vec![(1, 1), (1, 0), (0, 0)]);
    }

    #[test]
    fn latency_by_time_since_the_latest_reload_start() {
        let s = |done_us: u64, latency_us: u32, ok: bool| Sample {
            done_us,
            latency_us,
            ok,
        };
        let samples = [
            s(500, 100, true),        // before any reload: left out
            s(1_000_100, 100, true),  // 0 ms after the reload at 1 s
            s(1_007_000, 900, true),  // started 6.1 ms after
            s(1_007_000, 900, false), // failed: left out
            s(2_030_000, 50, true),   // 30 ms after the reload at 2 s
        ];
        let groups = by_offset(&samples, &[1_000_000, 2_000_000], &[0, 5, 10, 50]);
        let one = |us| Latency {
            count: 1,
            p50: us,
            p99: us,
            max: us,
        };
        assert_eq!(groups, vec![one(100), one(900), one(50)]);
    }
}
