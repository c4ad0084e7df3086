//! Schedules as the manifest gives them: `every 5s` or a five-field cron pattern, in UTC.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// When a function runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every so long, counted from the last run (or the deploy).
    Period(Duration),
    /// A five-field cron pattern, in UTC.
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// Reads `every 5s` / `every 2m` (a period) or a five-field cron pattern.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(period) = text.strip_prefix("every ") {
            let period = humantime::parse_duration(period.trim())
                .map_err(|e| format!("{period:?} is not a duration like 5s or 2m: {e}"))?;
            if period < Duration::from_secs(1) {
                return Err("a period must be at least 1 second".into());
            }
            return Ok(Self::Period(period));
        }
        if text.split_whitespace().count() != 5 {
            return Err(
                "expected a period like \"every 5s\" or a cron pattern of five fields \
                 (minute hour day-of-month month day-of-week)"
                    .into(),
            );
        }
        croner::Cron::from_str(text)
            .map(|cron| Self::Cron(Box::new(cron)))
            .map_err(|e| format!("not a cron pattern: {e}"))
    }

    /// The first slot strictly after `after_ms` (milliseconds since the epoch).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Self::Period(period) => Some(after_ms + period.as_millis() as u64),
            Self::Cron(cron) => {
                let after = DateTime::<Utc>::from_timestamp_millis(after_ms as i64)?;
                let next = cron.find_next_occurrence(&after, false).ok()?;
                Some(next.timestamp_millis() as u64)
            }
        }
    }

    /// The last slot at or before `now_ms`, starting the search at `due_ms` (itself a slot).
    pub fn latest_slot(&self, due_ms: u64, now_ms: u64) -> u64 {
        match self {
            Self::Period(period) => {
                let period = period.as_millis() as u64;
                due_ms + (now_ms - due_ms) / period * period
            }
            Self::Cron(_) => {
                let mut latest = due_ms;
                // Bounded: a year of minutes.
                for _ in 0..530_000 {
                    match self.next_after(latest) {
                        Some(next) if next <= now_ms => latest = next,
                        _ => break,
                    }
                }
                latest
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_cron_patterns_parse_with_named_errors() {
        assert!(
            matches!(Schedule::parse("every 5s"), Ok(Schedule::Period(p)) if p == Duration::from_secs(5))
        );
        assert!(
            matches!(Schedule::parse("every 2m"), Ok(Schedule::Period(p)) if p == Duration::from_secs(120))
        );
        assert!(Schedule::parse("*/5 * * * *").is_ok());
        assert!(
            Schedule::parse("every 0s")
                .unwrap_err()
                .contains("at least")
        );
        assert!(
            Schedule::parse("every soon")
                .unwrap_err()
                .contains("duration")
        );
        assert!(
            Schedule::parse("* * *")
                .unwrap_err()
                .contains("five fields")
        );
        assert!(Schedule::parse("61 * * * *").is_err());
    }

    #[test]
    fn cron_slots_follow_the_pattern() {
        let schedule = Schedule::parse("*/5 * * * *").unwrap();
        // 2026-01-01 00:01:00 UTC: the next slot is 00:05.
        let start = 1_767_225_660_000;
        assert_eq!(schedule.next_after(start), Some(1_767_225_900_000));
    }
}
