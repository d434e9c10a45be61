//! Percentiles of latencies, as the freshness benchmark and the fault test report them.

/// The `p` quantile (0–1) of `sorted` (ascending), by nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_and_empty() {
        let l: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&l, 0.5), 51.0);
        assert_eq!(percentile(&l, 0.99), 100.0);
        assert_eq!(percentile(&l, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
