//! The records of spawned calls.
//!
//! Spawned calls are kept in memory, the newest [`MAX_RECORDS`], and in the state store for
//! [`RETENTION`] (status, engine, duration, result or error), so `call.get()` works across a
//! restart. A call that was running when the server stopped reads as failed, by name. Calls'
//! summaries also go to the call history ([`super::history`]).
//!
//! Where hosts share a PostgreSQL state, calls spawned from outside go through its queue
//! instead ([`SharedQueue`], run by [`super::spawned`]): any host takes them, and they are
//! read from there (and their records from the store) only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_native_runner::agent::{ErrorInfo, Outcome};
use serde_json::Value;
use tokio::sync::watch;

use crate::proto::calls::{CallRecord, CallStatus, MAX_WAIT};
use crate::store::postgres::queue::{Found, PgQueue, SpawnedInput};
use crate::store::state::{StateStore, Table};

/// Spawned calls remembered at once; the oldest finished ones go first.
pub const MAX_RECORDS: usize = 10_000;

/// Bytes of results and errors the records may hold; past it the oldest finished go.
pub const MAX_RECORD_BYTES: usize = 256 << 20;

/// How long a spawned call's record is kept in the state store.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

struct Entry {
    record: CallRecord,
    done: watch::Sender<bool>,
    /// What its result or error weighs, once finished.
    bytes: usize,
    /// The task running it, while it runs.
    task: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Records {
    map: HashMap<String, Entry>,
    /// Oldest first.
    order: VecDeque<String>,
    bytes: usize,
    /// Calls recorded since start, to sweep the store now and then.
    created: u64,
}

impl Records {
    /// Drops records, the oldest finished first, until both bounds hold. Running calls go
    /// only when every record is running and the count is over.
    fn evict(&mut self) {
        while self.map.len() > MAX_RECORDS || self.bytes > MAX_RECORD_BYTES {
            let finished = self.order.iter().position(|id| {
                self.map
                    .get(id)
                    .is_some_and(|e| e.record.status != CallStatus::Running)
            });
            let at = match finished {
                Some(at) => at,
                None if self.map.len() > MAX_RECORDS => 0,
                None => break,
            };
            let Some(id) = self.order.remove(at) else {
                break;
            };
            if let Some(entry) = self.map.remove(&id) {
                self.bytes -= entry.bytes;
            }
        }
    }
}

/// A record as the store keeps it: its id and its JSON.
type StoredRecord = (String, Vec<u8>);

/// The spawned-call queue hosts share, and how this host uses it.
pub struct SharedQueue {
    /// The queue in PostgreSQL.
    pub queue: Arc<PgQueue>,
    /// How long a taken input stays this host's without a renewal.
    pub lease: Duration,
    /// Inputs this host runs from the queue at once.
    pub slots: usize,
    /// Woken when inputs may be ready.
    pub ready: Arc<tokio::sync::Notify>,
}

/// Records of spawned calls.
#[derive(Default)]
pub struct Calls {
    inner: Mutex<Records>,
    /// Where records outlive the process; `None` keeps them in memory only.
    store: Option<Arc<dyn StateStore>>,
    /// This host's id, stamped on the calls it runs, where hosts share the store.
    host: Option<String>,
    /// The queue calls spawned from outside go through, where hosts share one.
    pub shared: Option<SharedQueue>,
}

/// `record` as `outcome` ends it.
pub fn settle(record: &mut CallRecord, outcome: Outcome) {
    record.duration_ms = Some(crate::util::now_ms().saturating_sub(record.created_ms));
    if let Some(error) = outcome.error {
        record.status = CallStatus::Failed;
        record.error = Some(error);
    } else {
        record.status = CallStatus::Succeeded;
        record.result_pickled = outcome.result_pickled;
        if record.result_pickled.is_none() {
            record.result = Some(outcome.result.unwrap_or(Value::Null));
        }
    }
}

/// The record of a queued call, running on `host` if one holds its lease.
pub(crate) fn queued_record(id: &str, input: &SpawnedInput, host: Option<String>) -> CallRecord {
    CallRecord {
        call_id: id.to_string(),
        app: input.app.clone(),
        function: input.function.clone(),
        engine: input.engine.clone(),
        status: CallStatus::Running,
        result: None,
        result_pickled: None,
        error: None,
        created_ms: input.created_ms,
        duration_ms: None,
        host,
    }
}

fn mark_cancelled(record: &mut CallRecord) {
    record.status = CallStatus::Cancelled;
    record.duration_ms = Some(crate::util::now_ms().saturating_sub(record.created_ms));
    record.error = Some(ErrorInfo::lode(
        "cancelled",
        format!("call {} was cancelled", record.call_id),
    ));
}

/// A new call's id.
fn new_call_id() -> String {
    format!("ca-{:024x}", rand::random::<u128>() >> 32)
}

impl Calls {
    /// Records kept in `store` too. Records older than [`RETENTION`] go now, and calls that
    /// were running here when this host last stopped are marked failed. `host` is this
    /// host's id where several share the store: the calls other hosts run are theirs.
    pub fn persistent(
        store: Arc<dyn StateStore>,
        host: Option<String>,
        shared: Option<SharedQueue>,
    ) -> Self {
        let calls = Self {
            inner: Mutex::default(),
            store: Some(store),
            host,
            shared,
        };
        calls.sweep(true);
        calls
    }

    /// Queues a call any host may take; returns its id once it is stored. Its waiters read
    /// it from the queue, then its record from the store.
    pub async fn enqueue(&self, input: SpawnedInput) -> anyhow::Result<String> {
        let shared = self
            .shared
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no shared queue"))?;
        let id = new_call_id();
        shared.queue.push(&id, &input).await?;
        shared.ready.notify_one();
        Ok(id)
    }

    /// The store and every record in it; `None` (logged) where there is none to read.
    fn stored(&self) -> Option<(&Arc<dyn StateStore>, Vec<StoredRecord>)> {
        let store = self.store.as_ref()?;
        match store.list_entries(Table::Calls) {
            Ok(entries) => Some((store, entries)),
            Err(e) => {
                tracing::warn!(error = %e, "reading call records failed");
                None
            }
        }
    }

    /// Marks failed, as lost, the running calls of hosts that are gone: those `alive`
    /// does not name (this host's own are left to it).
    pub fn fail_orphans(&self, alive: &dyn Fn(&str) -> bool) {
        let Some((store, entries)) = self.stored() else {
            return;
        };
        for (_, bytes) in entries {
            let Ok(record) = serde_json::from_slice::<CallRecord>(&bytes) else {
                continue;
            };
            let Some(host) = record.host.clone() else {
                continue;
            };
            if record.status != CallStatus::Running
                || Some(&host) == self.host.as_ref()
                || alive(&host)
            {
                continue;
            }
            let id = record.call_id.clone();
            // Marked only if still running: the host may have finished it meanwhile.
            let marked = store.update_table(Table::Calls, &mut |edit| {
                let Some(now) = edit.get(&id)? else {
                    return Ok(());
                };
                let Ok(mut now) = serde_json::from_slice::<CallRecord>(&now) else {
                    return Ok(());
                };
                if now.status != CallStatus::Running {
                    return Ok(());
                }
                now.status = CallStatus::Failed;
                now.duration_ms = Some(crate::util::now_ms().saturating_sub(now.created_ms));
                now.error = Some(ErrorInfo::lode(
                    "lost",
                    format!(
                        "host {host} stopped answering while this call ran there; call it again"
                    ),
                ));
                edit.put(&id, &serde_json::to_vec(&now)?)
            });
            match marked {
                Ok(()) => tracing::warn!(call = %id, host, "a call of a host that is gone is lost"),
                Err(e) => tracing::warn!(call = %id, error = %e, "marking a lost call failed"),
            }
        }
    }

    /// Drops expired records from the store; with `after_restart`, fails the ones left
    /// running.
    fn sweep(&self, after_restart: bool) {
        let Some((store, entries)) = self.stored() else {
            return;
        };
        let oldest = crate::util::now_ms().saturating_sub(RETENTION.as_millis() as u64);
        for (id, bytes) in entries {
            match serde_json::from_slice::<CallRecord>(&bytes) {
                Ok(record) if record.created_ms >= oldest => {
                    let ours = record.host.is_none() || record.host == self.host;
                    if after_restart && ours && record.status == CallStatus::Running {
                        let mut lost = record;
                        lost.status = CallStatus::Failed;
                        lost.error = Some(ErrorInfo::lode(
                            "lost",
                            "the server stopped while this call ran; call it again",
                        ));
                        self.persist(&lost);
                    }
                }
                _ => {
                    let _ = store.delete_entry(Table::Calls, &id);
                }
            }
        }
    }

    fn persist(&self, record: &CallRecord) {
        if let Some(store) = &self.store {
            let bytes = serde_json::to_vec(record).expect("records encode");
            if let Err(e) = store.put_entry(Table::Calls, &record.call_id, &bytes) {
                tracing::warn!(call = %record.call_id, error = %e, "recording the call failed");
            }
        }
    }

    /// Records a new running call on `engine` and returns its id.
    pub fn create(&self, app: &str, function: &str, engine: &str) -> String {
        let id = new_call_id();
        let record = CallRecord {
            call_id: id.clone(),
            app: app.into(),
            function: function.into(),
            engine: engine.into(),
            status: CallStatus::Running,
            result: None,
            result_pickled: None,
            error: None,
            created_ms: crate::util::now_ms(),
            duration_ms: None,
            host: self.host.clone(),
        };
        self.persist(&record);
        let created = {
            let mut records = self.inner.lock().unwrap();
            records.map.insert(
                id.clone(),
                Entry {
                    record,
                    done: watch::channel(false).0,
                    bytes: 0,
                    task: None,
                },
            );
            records.order.push_back(id.clone());
            records.evict();
            records.created += 1;
            records.created
        };
        if created % 1000 == 0 {
            self.sweep(false);
        }
        id
    }

    /// A call of the shared queue (or one this host ran itself, in memory no more), read
    /// from the queue and the store every 50 ms until it ended or `wait` is up.
    async fn wait_queued(
        &self,
        shared: &SharedQueue,
        id: &str,
        wait: Duration,
    ) -> Option<CallRecord> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let found = match shared.queue.lookup(id).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(call = %id, error = %format!("{e:#}"), "reading a spawned call failed");
                    return None;
                }
            };
            match found {
                Found::Ended(bytes) => return serde_json::from_slice(&bytes).ok(),
                Found::Unknown => return None,
                Found::Queued(input, host) if tokio::time::Instant::now() >= deadline => {
                    return Some(queued_record(id, &input, host));
                }
                Found::Queued(..) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Stores how the call ended and wakes its waiters.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut records = self.inner.lock().unwrap();
        let weight = outcome.result.as_ref().map_or(0, |v| v.to_string().len())
            + outcome.result_pickled.as_ref().map_or(0, String::len)
            + outcome.error.as_ref().map_or(0, |e| {
                e.message.len() + e.traceback.as_ref().map_or(0, String::len)
            });
        let mut added = 0;
        let mut finished = None;
        if let Some(entry) = records.map.get_mut(id)
            && entry.record.status != CallStatus::Cancelled
        {
            entry.bytes = weight;
            added = weight;
            settle(&mut entry.record, outcome);
            finished = Some(entry.record.clone());
            // send_replace: the value must change even when no one is waiting yet.
            entry.done.send_replace(true);
        }
        records.bytes += added;
        records.evict();
        drop(records);
        if let Some(record) = finished {
            self.persist(&record);
        }
    }

    /// Marks a running call cancelled (its waiters wake to that) and stops its task, so an
    /// input still queued is dropped. An input a container runs already runs to its end;
    /// its result is not kept. A call in the shared queue is taken off it; the host that
    /// runs it stops it at its next lease renewal. Returns the record, `None` if unknown.
    pub fn cancel(&self, id: &str) -> anyhow::Result<Option<CallRecord>> {
        let mut records = self.inner.lock().unwrap();
        let Some(entry) = records.map.get_mut(id) else {
            drop(records);
            let Some(shared) = &self.shared else {
                return Ok(None);
            };
            let found = shared.queue.cancel(id, |id, input| {
                let mut record = queued_record(id, input, None);
                mark_cancelled(&mut record);
                serde_json::to_vec(&record).expect("records encode")
            })?;
            return match found {
                Found::Ended(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
                Found::Queued(..) | Found::Unknown => Ok(None),
            };
        };
        if entry.record.status == CallStatus::Running {
            mark_cancelled(&mut entry.record);
            if let Some(task) = entry.task.take() {
                task.abort();
            }
            entry.done.send_replace(true);
        }
        let record = entry.record.clone();
        drop(records);
        self.persist(&record);
        Ok(Some(record))
    }

    /// Keeps the task that runs the call, for [`Calls::cancel`].
    pub fn set_task(&self, id: &str, task: tokio::task::AbortHandle) {
        if let Some(entry) = self.inner.lock().unwrap().map.get_mut(id) {
            entry.task = Some(task);
        }
    }

    /// The call's record, after waiting up to `wait` for it to finish; `None` if unknown.
    pub async fn wait(&self, id: &str, wait: Duration) -> Option<CallRecord> {
        let subscribed = {
            let records = self.inner.lock().unwrap();
            records.map.get(id).map(|e| e.done.subscribe())
        };
        let Some(mut done) = subscribed else {
            if let Some(shared) = &self.shared {
                return self.wait_queued(shared, id, wait).await;
            }
            // Not in memory: a record from before a restart, or evicted.
            let store = self.store.as_ref()?;
            let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
            loop {
                let bytes = store.get_entry(Table::Calls, id).ok()??;
                let record: CallRecord = serde_json::from_slice(&bytes).ok()?;
                if record.status != CallStatus::Running || tokio::time::Instant::now() >= deadline {
                    return Some(record);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(wait.min(MAX_WAIT), done.wait_for(|d| *d)).await;
        let records = self.inner.lock().unwrap();
        records.map.get(id).map(|e| e.record.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_outlive_a_restart_and_running_ones_read_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (done, running) = {
            let store: Arc<dyn StateStore> =
                Arc::new(crate::store::state::RedbStore::open(dir.path()).unwrap());
            let calls = Calls::persistent(store, None, None);
            let done = calls.create("demo", "square", "wasm");
            calls.finish(&done, Outcome::value(serde_json::json!(9)));
            (done, calls.create("demo", "square", "python"))
        };
        let store: Arc<dyn StateStore> =
            Arc::new(crate::store::state::RedbStore::open(dir.path()).unwrap());
        let calls = Calls::persistent(store, None, None);
        let record = calls.wait(&done, Duration::ZERO).await.unwrap();
        assert_eq!(
            (record.status, record.result, record.engine.as_str()),
            (CallStatus::Succeeded, Some(serde_json::json!(9)), "wasm")
        );
        let lost = calls.wait(&running, Duration::ZERO).await.unwrap();
        assert_eq!(lost.status, CallStatus::Failed);
        assert_eq!(lost.error.unwrap().kind, "lost");
    }

    #[tokio::test]
    async fn spawned_calls_are_waited_for_and_finish_once() {
        let calls = Calls::default();
        let id = calls.create("demo", "square", "python");
        let pending = calls.wait(&id, Duration::from_millis(10)).await.unwrap();
        assert_eq!(pending.status, CallStatus::Running);
        calls.finish(&id, Outcome::value(serde_json::json!(49)));
        // Finished before anyone waited: the wait still sees it at once (a generous bound
        // well under MAX_WAIT tells "at once" from "at the timeout").
        let done = tokio::time::timeout(Duration::from_secs(20), calls.wait(&id, MAX_WAIT))
            .await
            .expect("a finished call is seen without waiting for the timeout")
            .unwrap();
        assert_eq!(done.status, CallStatus::Succeeded);
        assert_eq!(done.result, Some(serde_json::json!(49)));
        assert!(calls.wait("ca-unknown", Duration::ZERO).await.is_none());
    }
}
