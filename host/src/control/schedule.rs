//! Schedules: functions that run by themselves, every period or on a cron pattern.
//!
//! The time each function last fired is kept in the state store, written *before* the run
//! starts, so a restart never runs the same slot twice. Slots that passed while the host was
//! down are logged and skipped: a host back after an hour does not run a five-second period
//! 720 times.

use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

use crate::control::Server;
use crate::store::state::Table;
use crate::telemetry::logs::Stream;

/// How often the scheduler looks at the clock.
const TICK: Duration = Duration::from_millis(100);

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
    fn latest_slot(&self, due_ms: u64, now_ms: u64) -> u64 {
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn time_text(ms: u64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms as i64).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
    )
}

/// What a slot that is due should do.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Nothing yet.
    Wait,
    /// Run the slot at this time.
    Run(u64),
    /// Slots from the first to the second passed unrun (the host was down): skip to the last.
    Missed(u64, u64),
}

/// Decides about one function. Late by more than a period means the slot was missed.
fn decide(schedule: &Schedule, last_ms: u64, now_ms: u64) -> Due {
    let Some(due) = schedule.next_after(last_ms) else {
        return Due::Wait;
    };
    if now_ms < due {
        return Due::Wait;
    }
    match schedule.next_after(due) {
        Some(following) if following <= now_ms => {
            Due::Missed(due, schedule.latest_slot(due, now_ms))
        }
        _ => Due::Run(due),
    }
}

/// Runs scheduled functions until the server is dropped.
pub async fn run(server: Weak<Server>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(server) = server.upgrade() else {
            break;
        };
        tick(&server);
    }
}

fn tick(server: &Arc<Server>) {
    let now = now_ms();
    for live in server.apps() {
        let manifest = &live.record.manifest;
        for (name, schedule) in &live.schedules {
            let key = format!("{}/{name}", manifest.app);
            let last = match server.state.get_entry(Table::Schedules, &key) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).parse().unwrap_or(0),
                Ok(None) => live.record.deployed_at_ms,
                Err(e) => {
                    tracing::warn!(%key, error = %e, "reading the schedule mark failed");
                    continue;
                }
            };
            let (slot, run) = match decide(schedule, last, now) {
                Due::Wait => continue,
                Due::Run(slot) => (slot, true),
                Due::Missed(first, latest) => (latest, {
                    server.logs.push(
                        &manifest.app,
                        None,
                        Stream::System,
                        format!(
                            "schedule {}: runs due from {} to {} were missed while the host was \
                             down; they are not replayed",
                            name,
                            time_text(first),
                            time_text(latest)
                        ),
                    );
                    false
                }),
            };
            // Marked before it runs: a crash during the run does not run it again.
            if let Err(e) =
                server
                    .state
                    .put_entry(Table::Schedules, &key, slot.to_string().as_bytes())
            {
                tracing::warn!(%key, error = %e, "recording the schedule mark failed; not running");
                continue;
            }
            if !run {
                continue;
            }
            let server = server.clone();
            let (app, name) = (manifest.app.clone(), name.clone());
            tokio::spawn(async move {
                server.logs.push(
                    &app,
                    None,
                    Stream::System,
                    format!("schedule {name}: running the slot of {}", time_text(slot)),
                );
                let body = serde_json::json!({"args": [], "kwargs": {}});
                let message = match server.call(&app, &name, &body).await {
                    Ok(outcome) => match outcome.error {
                        None => format!("schedule {name}: done"),
                        Some(e) => format!("schedule {name}: failed: {}: {}", e.kind, e.message),
                    },
                    Err(e) => format!("schedule {name}: could not run: {}", e.error.message),
                };
                server.logs.push(&app, None, Stream::System, message);
            });
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

    #[test]
    fn a_due_slot_runs_once_and_missed_slots_are_skipped() {
        let every = Schedule::parse("every 5s").unwrap();
        assert_eq!(decide(&every, 10_000, 14_999), Due::Wait);
        assert_eq!(decide(&every, 10_000, 15_100), Due::Run(15_000));
        // The mark moved to the slot that ran: the same slot is not due again.
        assert_eq!(decide(&every, 15_000, 15_200), Due::Wait);
        // Down from 15 s to 42 s: slots 20..40 passed; the latest is 40 s, none replayed.
        assert_eq!(decide(&every, 15_000, 42_000), Due::Missed(20_000, 40_000));
    }
}
