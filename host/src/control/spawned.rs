//! This host's side of the spawned-call queue hosts share ([`crate::store::postgres::queue`]):
//! it takes ready inputs while it has room, runs each through the router, renews the leases
//! of those running, and stores each result with the lease it still holds.
//!
//! An input taken again after its host stopped renewing (killed, cut off) is a rerun: it runs
//! if the function's `Retries` allow one more, counted with the runs spent before, and else
//! ends as `lost`, naming that host. A call cancelled meanwhile, or whose lease another host
//! took over, is stopped here at the next renewal and its result is not stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lode_native_runner::agent::{ErrorInfo, Outcome};

use crate::control::Control;
use crate::control::calls::{queued_record, settle};
use crate::proto::calls::CallStatus;
use crate::store::postgres::queue::Taken;

/// How often the queue is read when no notification came.
const POLL: Duration = Duration::from_secs(1);

/// The calls this host runs from the queue, by id.
type Running = Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>;

/// Takes and runs inputs until the control plane is dropped.
pub async fn run(control: Weak<Control>) {
    let running: Running = Arc::default();
    // Set when a take filled every free slot: a slot freed then is worth a take at once.
    let saturated = Arc::new(AtomicBool::new(false));
    let mut renew_at = tokio::time::Instant::now();
    loop {
        let Some(strong) = control.upgrade() else {
            return;
        };
        let Some(shared) = &strong.calls.shared else {
            return;
        };
        let (ready, lease) = (shared.ready.clone(), shared.lease);
        let host = strong.host.id.clone();
        let free = shared.slots.saturating_sub(running.lock().unwrap().len());
        if free > 0 {
            match shared.queue.take(&host, free, lease).await {
                Ok(taken) => {
                    saturated.store(taken.len() == free, Ordering::Relaxed);
                    for taken in taken {
                        start(&strong, taken, &running, &saturated);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "taking spawned calls failed");
                    renew_at = renew_at.min(tokio::time::Instant::now() + POLL);
                }
            }
        }
        if tokio::time::Instant::now() >= renew_at {
            renew(&strong, &running).await;
            renew_at = tokio::time::Instant::now() + lease / 3;
        }
        drop(strong);
        let wait = renew_at
            .saturating_duration_since(tokio::time::Instant::now())
            .min(POLL);
        let _ = tokio::time::timeout(wait, ready.notified()).await;
    }
}

/// Extends the leases of the calls running here; stops those whose lease is gone.
async fn renew(control: &Control, running: &Running) {
    let Some(shared) = &control.calls.shared else {
        return;
    };
    let ids: Vec<String> = running.lock().unwrap().keys().cloned().collect();
    if ids.is_empty() {
        return;
    }
    match shared
        .queue
        .renew(&control.host.id, ids.clone(), shared.lease)
        .await
    {
        Ok(held) => {
            let held: std::collections::HashSet<String> = held.into_iter().collect();
            let mut running = running.lock().unwrap();
            for id in ids.iter().filter(|id| !held.contains(*id)) {
                // It may have just finished and left the queue; only a call still running
                // here is stopped.
                if let Some(task) = running.remove(id) {
                    task.abort();
                    tracing::info!(call = %id, "a spawned call was cancelled or taken over; stopped here");
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "renewing spawned calls' leases failed")
        }
    }
}

/// Runs a taken input in a task of its own (or ends it as lost, where its retries are spent),
/// then stores its record.
fn start(control: &Arc<Control>, taken: Taken, running: &Running, saturated: &Arc<AtomicBool>) {
    let host = control.host.id.clone();
    let mut record = queued_record(&taken.call_id, &taken.input, Some(host.clone()));
    let spent = taken.takes.saturating_sub(1);
    let previous = taken.previous_host.as_deref().unwrap_or("another host");
    let max_retries = taken.input.max_retries;
    if spent > max_retries {
        let why = if max_retries == 0 {
            "its function has no retries".to_string()
        } else {
            format!("its function's {max_retries} retries are spent")
        };
        settle(
            &mut record,
            Outcome::failed(ErrorInfo::lode(
                "lost",
                format!(
                    "host {previous} stopped answering while this call ran there, and {why}; \
                     call it again"
                ),
            )),
        );
        tracing::warn!(call = %taken.call_id, host = previous, "a spawned call of a host that died is lost");
    } else if spent > 0 {
        tracing::warn!(
            call = %taken.call_id,
            host = previous,
            "running again a spawned call whose host stopped answering (run {} of {})",
            spent + 1,
            max_retries + 1
        );
    }
    let id = taken.call_id.clone();
    let weak = Arc::downgrade(control);
    let (done_running, done_saturated) = (running.clone(), saturated.clone());
    let mut guard = running.lock().unwrap();
    let task = tokio::spawn(async move {
        if record.status == CallStatus::Running {
            let Some(control) = weak.upgrade() else {
                return;
            };
            let input = &taken.input;
            let called = control
                .call_at(
                    &input.app,
                    &input.function,
                    &input.body,
                    None,
                    input.caller.as_deref(),
                    crate::control::forward::Delivery {
                        attempts: spent,
                        forward: crate::control::forward::Forward::Never,
                    },
                )
                .await;
            settle(
                &mut record,
                match called {
                    Ok(outcome) => outcome,
                    Err(e) => Outcome::failed(e.error),
                },
            );
        }
        let Some(control) = weak.upgrade() else {
            return;
        };
        if let Some(shared) = &control.calls.shared {
            let bytes = serde_json::to_vec(&record).expect("records encode");
            // Kept among the running (its lease renewed) until the result is stored: a
            // state that is briefly away loses nothing.
            let mut warned = false;
            loop {
                match shared
                    .queue
                    .finish(&record.call_id, &host, bytes.clone())
                    .await
                {
                    Ok(true) => break,
                    Ok(false) => {
                        tracing::info!(
                            call = %record.call_id,
                            "a spawned call finished after it was cancelled or taken over; its result is dropped"
                        );
                        break;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(
                                call = %record.call_id,
                                error = %format!("{e:#}"),
                                "storing a spawned call's result failed; retrying until the state is back"
                            );
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            done_running.lock().unwrap().remove(&record.call_id);
            if done_saturated.swap(false, Ordering::Relaxed) {
                shared.ready.notify_one();
            }
        }
    });
    guard.insert(id, task.abort_handle());
}
