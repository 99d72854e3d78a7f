//! Percentiles and medians, the one definition every test and benchmark uses.

/// The nearest-rank percentile (`p` in 0..=100) of sorted values; the default
/// (0) when there are none.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median: the middle value, or the mean of the two middle ones; 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A set of measurements (durations, rates) kept sorted.
#[derive(Debug, Clone)]
pub struct Distribution {
    sorted: Vec<f64>,
    mean: f64,
}

impl Distribution {
    /// Panics when `values` is empty: a figure of nothing is a bug in the bench.
    pub fn new(values: impl IntoIterator<Item = f64>) -> Distribution {
        let mut sorted: Vec<f64> = values.into_iter().collect();
        assert!(!sorted.is_empty(), "a distribution of no values");
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Distribution { sorted, mean }
    }

    /// Nearest-rank percentile.
    pub fn p(&self, percent: f64) -> f64 {
        percentile(&self.sorted, percent)
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    pub fn max(&self) -> f64 {
        *self.sorted.last().expect("not empty")
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile::<u32>(&[], 99.0), 0);
        // 1000 values: p99 is the 990th.
        let v: Vec<u32> = (0..1000).collect();
        assert_eq!(percentile(&v, 99.0), 989);
        assert_eq!(percentile(&[1.5, 2.5], 50.0), 1.5);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn distributions() {
        let d = Distribution::new([4.0, 1.0, 3.0, 2.0]);
        assert_eq!(
            (d.p(50.0), d.p(99.0), d.mean(), d.max()),
            (2.0, 4.0, 2.5, 4.0)
        );
        assert_eq!(d.len(), 4);
    }
}
