//! The record of calls made: app, function, engine, status, duration and error, kept in the
//! state store for [`RETENTION`] and at most [`MAX_RECORDS`] (`lode calls APP`).
//!
//! Every call by name is recorded: from the API and the SDK, Python web endpoints,
//! schedules, and calls into or out of a container. A Wasm function's in-process calls to
//! other Wasm functions, which take microseconds each, are counted in `/metrics` instead, as
//! are requests to Wasm web routes (HTTP, not calls by name; `lode logs` shows those).
//!
//! Records go to a writer thread, which commits what queued within [`GATHER`] in one
//! transaction, so a call never waits on the disk; a commit is made durable (fsync) at most
//! every [`DURABLE_EVERY`], and one that was not is followed by a durable one within it, so a
//! crash loses at most about the last second of records. If the
//! writer falls [`QUEUE`] records behind, new ones are dropped and counted
//! (`lode_call_records_dropped_total`) rather than slowing calls.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::proto::calls::HistoryRecord;
use crate::store::state::{StateStore, Table};

/// How long records are kept.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The most records kept; past it the oldest go.
pub const MAX_RECORDS: u64 = 100_000;

/// Records that may wait for the writer.
const QUEUE: usize = 16_384;

/// The most records committed at once.
const BATCH: usize = 4096;

/// How long the writer gathers records after the first before committing them.
const GATHER: Duration = Duration::from_millis(10);

/// How often a commit waits for the disk.
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// Where records are sent; the writer thread ends when this is dropped.
pub struct CallHistory {
    queue: SyncSender<HistoryRecord>,
    store: Arc<dyn StateStore>,
    dropped: Counter,
    /// The writer, joined on drop so that queued records reach the disk.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl CallHistory {
    /// Starts the writer for `store`; drops past the queue are counted in `dropped`.
    pub fn start(store: Arc<dyn StateStore>, dropped: Counter) -> Self {
        let (queue, receiver) = std::sync::mpsc::sync_channel(QUEUE);
        let writer_store = store.clone();
        let writer = std::thread::Builder::new()
            .name("lode-history".into())
            .spawn(move || write_records(receiver, writer_store))
            .expect("spawning the call history writer");
        Self {
            queue,
            store,
            dropped,
            writer: Mutex::new(Some(writer)),
        }
    }

    /// Queues a record without waiting.
    pub fn record(&self, record: HistoryRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(record)
        {
            self.dropped.inc();
        }
    }

    /// The newest records of `app` younger than [`RETENTION`], newest first, at most `limit`.
    pub fn recent(&self, app: &str, limit: usize) -> anyhow::Result<Vec<HistoryRecord>> {
        let oldest = crate::util::now_ms().saturating_sub(RETENTION.as_millis() as u64);
        let mut accept = |bytes: &[u8]| {
            serde_json::from_slice::<HistoryRecord>(bytes)
                .is_ok_and(|record| record.app == app && record.created_ms >= oldest)
        };
        let found = self
            .store
            .newest_entries(Table::History, limit, &mut accept)?;
        Ok(found
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect())
    }
}

impl Drop for CallHistory {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what was queued.
        let (closed, _) = std::sync::mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(writer) = self.writer.lock().unwrap().take() {
            let _ = writer.join();
        }
    }
}

/// Commits records as they come, in batches gathered over [`GATHER`]; a commit that skipped
/// the disk is followed by a durable one within [`DURABLE_EVERY`], records or not.
fn write_records(receiver: Receiver<HistoryRecord>, store: Arc<dyn StateStore>) {
    let mut sequence: u32 = 0;
    let mut last_durable = Instant::now();
    // Whether a commit that skipped the disk waits for a durable one.
    let mut pending = false;
    let mut open = true;
    while open {
        let first = if pending {
            let left = DURABLE_EVERY.saturating_sub(last_durable.elapsed());
            match receiver.recv_timeout(left) {
                Ok(record) => record,
                Err(RecvTimeoutError::Timeout) => {
                    match store.append_entries(Table::History, &[], "", MAX_RECORDS, true) {
                        Ok(()) => pending = false,
                        Err(e) => tracing::warn!(error = %e, "recording calls failed"),
                    }
                    last_durable = Instant::now();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match receiver.recv() {
                Ok(record) => record,
                Err(_) => break,
            }
        };
        let mut batch = vec![first];
        let gathered = Instant::now() + GATHER;
        while batch.len() < BATCH {
            let left = gathered.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(record) => batch.push(record),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let entries: Vec<(String, Vec<u8>)> = batch
            .iter()
            .map(|record| {
                sequence = sequence.wrapping_add(1);
                // Keys sort by time; the sequence keeps records of the same millisecond apart.
                let key = format!("{:013}-{sequence:08x}", record.created_ms);
                (key, serde_json::to_vec(record).expect("records encode"))
            })
            .collect();
        let oldest = crate::util::now_ms().saturating_sub(RETENTION.as_millis() as u64);
        let drop_below = format!("{oldest:013}");
        let durable = last_durable.elapsed() >= DURABLE_EVERY;
        match store.append_entries(Table::History, &entries, &drop_below, MAX_RECORDS, durable) {
            Ok(()) if durable => {
                last_durable = Instant::now();
                pending = false;
            }
            Ok(()) => pending = true,
            Err(e) => {
                tracing::warn!(error = %e, records = entries.len(), "recording calls failed")
            }
        }
    }
    // Whatever was committed without waiting for the disk is made durable now.
    if pending && let Err(e) = store.append_entries(Table::History, &[], "", MAX_RECORDS, true) {
        tracing::warn!(error = %e, "recording calls failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::calls::CallStatus;

    fn record(app: &str, created_ms: u64) -> HistoryRecord {
        HistoryRecord {
            created_ms,
            app: app.into(),
            function: "square".into(),
            engine: "wasm".into(),
            status: CallStatus::Succeeded,
            duration_ms: 0.2,
            depth: 0,
            error: None,
        }
    }

    #[test]
    fn records_reach_the_store_and_read_back_per_app_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(crate::store::state::RedbStore::open(dir.path()).unwrap());
        let now = crate::util::now_ms();
        let expired = now - RETENTION.as_millis() as u64 - 1000;
        {
            let history = CallHistory::start(store.clone(), Counter::default());
            for (app, at) in [("a", expired), ("a", now), ("b", now + 1), ("a", now + 2)] {
                history.record(record(app, at));
            }
            // Dropping the history flushes the queue.
        }
        let history = CallHistory::start(store, Counter::default());
        let a = history.recent("a", 10).unwrap();
        assert_eq!(a, [record("a", now + 2), record("a", now)]);
        assert_eq!(history.recent("a", 1).unwrap(), [record("a", now + 2)]);
        assert_eq!(history.recent("c", 10).unwrap(), []);
    }
}
