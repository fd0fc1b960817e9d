//! How long a page fetch takes (`--fault-latency`) and in which order a batch of fetches
//! completes (`--fault-order`). The pager applies these to faults the guest can wait for
//! asynchronously; whoever serves the faults decides the order of the guest's completions.

use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyModel {
    /// Every fetch takes the same time (0 = served as soon as a worker picks it up).
    Fixed(Duration),
    /// Uniformly distributed in [min, max].
    Uniform(Duration, Duration),
    /// Exponentially distributed with this mean (a long tail, like a remote store).
    Exponential(Duration),
}

impl Default for LatencyModel {
    fn default() -> Self {
        LatencyModel::Fixed(Duration::ZERO)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LatencyError {
    #[error(
        "bad --fault-latency '{0}': use a duration (100us, 5ms, 1s), a range (5ms-30ms) or \
         exp:MEAN (exp:5ms)"
    )]
    BadLatency(String),
    #[error("--fault-latency '{0}' is longer than the longest modelled fetch, 1 hour")]
    TooLong(String),
    #[error("bad --fault-order '{0}': use 'arrival' or 'reverse:N' with N >= 2")]
    BadOrder(String),
}

/// Parses `250us`, `5ms`, `1s`, `1.5ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    // No time needs no unit (`--fault-latency 0`, as `--help` shows the default).
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let secs = match unit {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// The longest fetch the model takes (a bound that keeps due times far from overflowing).
pub const MAX_LATENCY: Duration = Duration::from_secs(3600);

impl LatencyModel {
    pub fn parse(spec: &str) -> Result<LatencyModel, LatencyError> {
        let model = Self::parse_unbounded(spec)?;
        let longest = match model {
            LatencyModel::Fixed(d) | LatencyModel::Exponential(d) => d,
            LatencyModel::Uniform(_, hi) => hi,
        };
        if longest > MAX_LATENCY {
            return Err(LatencyError::TooLong(spec.to_string()));
        }
        Ok(model)
    }

    fn parse_unbounded(spec: &str) -> Result<LatencyModel, LatencyError> {
        let bad = || LatencyError::BadLatency(spec.to_string());
        if let Some(mean) = spec.strip_prefix("exp:") {
            return Ok(LatencyModel::Exponential(
                parse_duration(mean).ok_or_else(bad)?,
            ));
        }
        if let Some((lo, hi)) = spec.split_once('-') {
            let (lo, hi) = (
                parse_duration(lo).ok_or_else(bad)?,
                parse_duration(hi).ok_or_else(bad)?,
            );
            if lo > hi {
                return Err(bad());
            }
            return Ok(LatencyModel::Uniform(lo, hi));
        }
        Ok(LatencyModel::Fixed(parse_duration(spec).ok_or_else(bad)?))
    }

    pub fn sample(&self, rng: &mut SmallRng) -> Duration {
        match *self {
            LatencyModel::Fixed(d) => d,
            LatencyModel::Uniform(lo, hi) if lo == hi => lo,
            LatencyModel::Uniform(lo, hi) => rng.random_range(lo..=hi),
            LatencyModel::Exponential(mean) => {
                // Inverse transform; 1 - u is in (0, 1], so the log is finite.
                let u: f64 = rng.random();
                mean.mul_f64(-(1.0 - u).ln()).min(MAX_LATENCY * 40)
            }
        }
    }
}

/// The order in which fetched pages are handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultOrder {
    /// Each fetch completes when its own latency has passed.
    #[default]
    Arrival,
    /// Faults are collected in batches of N (or whatever arrived within the batch window)
    /// and each batch completes in reverse arrival order: deterministic out-of-order
    /// completion for tests.
    Reverse(usize),
}

impl FaultOrder {
    pub fn parse(spec: &str) -> Result<FaultOrder, LatencyError> {
        let bad = || LatencyError::BadOrder(spec.to_string());
        match spec {
            "arrival" => Ok(FaultOrder::Arrival),
            _ => {
                let n: usize = spec
                    .strip_prefix("reverse:")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?;
                if n < 2 {
                    return Err(bad());
                }
                Ok(FaultOrder::Reverse(n))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn latencies_past_an_hour_are_refused_at_parse_time() {
        for spec in [
            "9300000000000000000s",
            "7200s-10800s",
            "1ms-3601s",
            "exp:3601s",
            "3600.001s",
        ] {
            assert_eq!(
                LatencyModel::parse(spec),
                Err(LatencyError::TooLong(spec.to_string())),
                "{spec}"
            );
        }
        assert_eq!(
            LatencyModel::parse("3600s"),
            Ok(LatencyModel::Fixed(MAX_LATENCY))
        );
    }

    #[test]
    fn parses_latency_specs() {
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5ms"), Some(Duration::from_micros(1500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("-1ms"), None);
        assert_eq!(
            LatencyModel::parse("5ms").unwrap(),
            LatencyModel::Fixed(Duration::from_millis(5))
        );
        assert_eq!(
            LatencyModel::parse("5ms-30ms").unwrap(),
            LatencyModel::Uniform(Duration::from_millis(5), Duration::from_millis(30))
        );
        assert_eq!(
            LatencyModel::parse("exp:2ms").unwrap(),
            LatencyModel::Exponential(Duration::from_millis(2))
        );
        assert!(LatencyModel::parse("30ms-5ms").is_err());
        assert!(LatencyModel::parse("soon").is_err());
    }

    #[test]
    fn samples_stay_in_range_and_vary() {
        let mut rng = SmallRng::seed_from_u64(1);
        let m = LatencyModel::parse("5ms-30ms").unwrap();
        let samples: Vec<_> = (0..1000).map(|_| m.sample(&mut rng)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_millis(5) && *d <= Duration::from_millis(30))
        );
        assert!(samples.iter().any(|d| *d < Duration::from_millis(10)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(25)));
        let e = LatencyModel::parse("exp:1ms").unwrap();
        let mean: f64 = (0..20_000)
            .map(|_| e.sample(&mut rng).as_secs_f64())
            .sum::<f64>()
            / 20_000.0;
        assert!((0.0009..0.0011).contains(&mean), "mean {mean}");
    }

    #[test]
    fn parses_orders() {
        assert_eq!(FaultOrder::parse("arrival").unwrap(), FaultOrder::Arrival);
        assert_eq!(
            FaultOrder::parse("reverse:8").unwrap(),
            FaultOrder::Reverse(8)
        );
        assert!(FaultOrder::parse("reverse:1").is_err());
        assert!(FaultOrder::parse("random").is_err());
    }
}
