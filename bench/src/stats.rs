use std::time::Duration;

/// Latency percentiles of one series, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

pub fn percentiles(samples: &[Duration]) -> Percentiles {
    let mut millis: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    millis.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if millis.is_empty() {
            return f64::NAN;
        }
        // Nearest-rank percentile.
        let rank = ((q * millis.len() as f64).ceil() as usize).clamp(1, millis.len());
        millis[rank - 1]
    };
    Percentiles {
        min: millis.first().copied().unwrap_or(f64::NAN),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = percentiles(&samples);
        assert_eq!(p.min, 1.0);
        assert_eq!(p.p50, 50.0);
        assert_eq!(p.p90, 90.0);
        assert_eq!(p.p99, 99.0);
    }
}
