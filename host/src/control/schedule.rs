//! Schedules: functions that run by themselves, every period or on a cron pattern.
//!
//! The time each function last fired is kept in the state store, written *before* the run
//! starts, so a restart never runs the same slot twice. Slots that passed while the host was
//! down are logged and skipped: a host back after an hour does not run a five-second period
//! 720 times.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::control::Control;
use crate::function::Dispatch;
use crate::proto::log::Stream;
use crate::proto::schedule::Schedule;
use crate::store::state::Table;

/// How often the scheduler looks at the clock.
const TICK: Duration = Duration::from_millis(100);

fn time_text(ms: u64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms as i64).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
    )
}

/// What a slot that is due should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
pub async fn run(control: Weak<Control>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(control) = control.upgrade() else {
            break;
        };
        tick(&control);
    }
}

fn tick(control: &Arc<Control>) {
    let now = crate::util::now_ms();
    for live in control.apps() {
        let manifest = &live.record.manifest;
        for (name, schedule) in &live.schedules {
            let key = format!("{}/{name}", manifest.app);
            let deployed = live.record.deployed_at_ms;
            let last_of = |bytes: &Option<Vec<u8>>| {
                bytes.as_ref().map_or(deployed, |b| {
                    String::from_utf8_lossy(b).parse().unwrap_or(0)
                })
            };
            // A cheap look first: most ticks find nothing due.
            match control.state.get_entry(Table::Schedules, &key) {
                Ok(bytes) if decide(schedule, last_of(&bytes), now) == Due::Wait => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%key, error = %e, "reading the schedule mark failed");
                    continue;
                }
            }
            // The slot is claimed by moving the mark in one transaction: of several hosts
            // sharing the state, exactly one finds it unmarked. Marked before it runs: a crash
            // during the run does not run it again.
            let mut due = Due::Wait;
            let claimed = control.state.update_table(Table::Schedules, &mut |edit| {
                due = decide(schedule, last_of(&edit.get(&key)?), now);
                match due {
                    Due::Wait => Ok(()),
                    Due::Run(slot) | Due::Missed(_, slot) => {
                        edit.put(&key, slot.to_string().as_bytes())
                    }
                }
            });
            if let Err(e) = claimed {
                tracing::warn!(%key, error = %e, "recording the schedule mark failed; not running");
                continue;
            }
            let (slot, run) = match due {
                Due::Wait => continue,
                Due::Run(slot) => (slot, true),
                Due::Missed(first, latest) => (latest, {
                    control.logs.push(
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
            if !run {
                continue;
            }
            let control = control.clone();
            let (app, name) = (manifest.app.clone(), name.clone());
            tokio::spawn(async move {
                control.logs.push(
                    &app,
                    None,
                    Stream::System,
                    format!("schedule {name}: running the slot of {}", time_text(slot)),
                );
                let body = serde_json::json!({"args": [], "kwargs": {}});
                let message = match control.call(&app, &name, &body, None, None).await {
                    Ok(outcome) => match outcome.error {
                        None => format!("schedule {name}: done"),
                        Some(e) => format!("schedule {name}: failed: {}: {}", e.kind, e.message),
                    },
                    Err(e) => format!("schedule {name}: could not run: {}", e.error.message),
                };
                control.logs.push(&app, None, Stream::System, message);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
