//! Dicts and Queues: named, durable key-value maps and FIFO queues, as Modal's `Dict` and
//! `Queue`, kept in the state store so that they survive restarts and, with a shared store,
//! are one across hosts.
//!
//! Everything lives in [`Table::Objects`], under keys that sort by object:
//! `D␟name` (a Dict's record), `d␟name␟key` (its entries, the key as canonical JSON),
//! `Q␟name` (a Queue's record, with its next sequence number and partition lengths) and
//! `q␟name␟partition␟seq` (its items, oldest first). Each operation is one transaction.
//! Values are JSON; the SDK encodes what JSON cannot hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use crate::proto::objects::ObjectInfo;
use crate::store::state::{StateStore, Table, TableEdit, TableView};

/// The separator in keys; names, partitions and JSON keys never hold it (JSON escapes it).
const SEP: char = '\u{1f}';
/// The character after [`SEP`]: `prefix␟..prefix␠` covers every key under `prefix`.
const AFTER: char = '\u{20}';

/// The largest key or value, as JSON.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The most items one queue partition holds; puts beyond it are refused.
pub const MAX_PARTITION_ITEMS: u64 = 100_000;
/// The longest a queue `get` waits in one request; the SDK asks again for longer waits.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// The most entries one `items` answer holds.
pub const MAX_LISTED: usize = 10_000;

/// Dict or Queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A key-value map.
    Dict,
    /// A FIFO queue with partitions.
    Queue,
}

impl Kind {
    fn record_key(self, name: &str) -> String {
        match self {
            Kind::Dict => format!("D{SEP}{name}"),
            Kind::Queue => format!("Q{SEP}{name}"),
        }
    }

    fn entries(self, name: &str) -> (String, String) {
        let tag = match self {
            Kind::Dict => 'd',
            Kind::Queue => 'q',
        };
        (
            format!("{tag}{SEP}{name}{SEP}"),
            format!("{tag}{SEP}{name}{AFTER}"),
        )
    }

    /// `Dict` or `Queue`, as users write it.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Dict => "Dict",
            Kind::Queue => "Queue",
        }
    }

    fn cli(self) -> &'static str {
        match self {
            Kind::Dict => "dict",
            Kind::Queue => "queue",
        }
    }
}

/// What a request failed on, with the HTTP status it answers with.
#[derive(Debug)]
pub struct ObjectError {
    /// HTTP status.
    pub status: u16,
    /// Machine-readable kind (`not_found`, `invalid_request`, ...).
    pub kind: &'static str,
    /// What went wrong and what to do.
    pub message: String,
}

impl ObjectError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", message)
    }
}

impl From<anyhow::Error> for ObjectError {
    fn from(e: anyhow::Error) -> Self {
        Self::new(500, "internal", format!("the state store failed: {e:#}"))
    }
}

/// One request on a Dict or Queue: the operation, and whether a missing object is made.
#[derive(Debug, Deserialize)]
pub struct Request {
    /// Make the object if it does not exist (`from_name(..., create_if_missing=True)`).
    #[serde(default)]
    pub create_if_missing: bool,
    /// The operation and its arguments.
    #[serde(flatten)]
    pub op: Value,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum DictOp {
    Put {
        key: Value,
        value_json: String,
        #[serde(default)]
        skip_if_exists: bool,
    },
    Get {
        key: Value,
    },
    Contains {
        key: Value,
    },
    Pop {
        key: Value,
    },
    Update {
        items: Vec<(Value, String)>,
    },
    Len {},
    Items {
        #[serde(default)]
        limit: Option<usize>,
    },
    Clear {},
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum QueueOp {
    Put {
        values_json: Vec<String>,
        #[serde(default)]
        partition: Option<String>,
    },
    Get {
        #[serde(default = "one")]
        n: usize,
        #[serde(default)]
        partition: Option<String>,
        /// Seconds to wait for an item; 0 (the default) does not wait.
        #[serde(default)]
        timeout: f64,
    },
    Peek {
        #[serde(default = "one")]
        n: usize,
        /// Items to pass over first (an iteration's place).
        #[serde(default)]
        skip: usize,
        #[serde(default)]
        partition: Option<String>,
    },
    Len {
        #[serde(default)]
        partition: Option<String>,
        #[serde(default)]
        total: bool,
    },
    Clear {
        #[serde(default)]
        partition: Option<String>,
        #[serde(default)]
        all: bool,
    },
}

fn one() -> usize {
    1
}

/// Dicts and Queues over a state store, with the waiters of blocking queue gets.
pub struct Objects {
    state: Arc<dyn StateStore>,
    /// Wakes queue gets waiting on a queue when items are put in it.
    waiting: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

/// Whether `name` suits a Dict or Queue: `[A-Za-z0-9._-]{1,64}`.
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_name(kind: Kind, name: &str) -> Result<(), ObjectError> {
    if is_object_name(name) {
        Ok(())
    } else {
        Err(ObjectError::invalid(format!(
            "{name:?} is not a {} name: use 1 to 64 letters, digits, '.', '_' or '-'",
            kind.title()
        )))
    }
}

/// A key's stored form: canonical JSON of a string, number, bool, null or list of them.
fn key_text(key: &Value) -> Result<String, ObjectError> {
    fn scalar_or_list(v: &Value) -> bool {
        match v {
            Value::Object(_) => false,
            Value::Array(items) => items.iter().all(scalar_or_list),
            _ => true,
        }
    }
    if !scalar_or_list(key) {
        return Err(ObjectError::invalid(
            "a key is a string, number, bool, None or tuple of them, not a dict",
        ));
    }
    let text = key.to_string();
    if text.len() > MAX_VALUE_BYTES {
        return Err(ObjectError::invalid("a key is over 1 MiB"));
    }
    Ok(text)
}

/// A value as stored: the JSON text the client sent, kept byte for byte (so a Python dict
/// keeps its order), once it is known to be JSON.
fn value_bytes(text: &str) -> Result<Vec<u8>, ObjectError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| ObjectError::invalid(format!("a value is not JSON: {e}")))?;
    let bytes = text.as_bytes().to_vec();
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(ObjectError::new(
            413,
            "too_large",
            format!(
                "a value of {} bytes is over the 1 MiB limit; keep large data in a Volume",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// A stored value as the JSON text it was sent as.
fn parse(bytes: &[u8]) -> Result<Value> {
    String::from_utf8(bytes.to_vec())
        .map(Value::String)
        .map_err(|e| anyhow!("a stored value is corrupt: {e}"))
}

fn partition_name(partition: Option<String>) -> Result<String, ObjectError> {
    let partition = partition.unwrap_or_default();
    if partition.len() > 64 || partition.chars().any(|c| c.is_control()) {
        return Err(ObjectError::invalid(format!(
            "partition {partition:?}: use at most 64 characters, no control characters"
        )));
    }
    Ok(partition)
}

fn missing(kind: Kind, name: &str) -> ObjectError {
    ObjectError::new(
        404,
        "not_found",
        format!(
            "no {} named {name:?}; make it with {}.from_name({name:?}, create_if_missing=True) \
             or `lode {} create {name}`",
            kind.title(),
            kind.title(),
            kind.cli()
        ),
    )
}

/// Reads an object's record inside a transaction.
fn record(view: &dyn TableView, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
    view.get(&kind.record_key(name))?
        .map(|bytes| serde_json::from_slice(&bytes).map_err(|e| anyhow!("record corrupt: {e}")))
        .transpose()
}

fn save(edit: &mut dyn TableEdit, kind: Kind, name: &str, info: &ObjectInfo) -> Result<()> {
    edit.put(&kind.record_key(name), &serde_json::to_vec(info)?)
}

impl Objects {
    /// Dicts and Queues kept in `state`.
    pub fn new(state: Arc<dyn StateStore>) -> Self {
        Self {
            state,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the object if it does not exist; returns whether it was made.
    pub fn create(&self, kind: Kind, name: &str) -> Result<bool, ObjectError> {
        check_name(kind, name)?;
        let mut made = false;
        self.state.update_table(Table::Objects, &mut |edit| {
            made = record(edit, kind, name)?.is_none();
            if made {
                let info = ObjectInfo {
                    created_ms: crate::util::now_ms(),
                    ..ObjectInfo::default()
                };
                save(edit, kind, name, &info)?;
            }
            Ok(())
        })?;
        Ok(made)
    }

    /// Every object of `kind`, by name.
    pub fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>, ObjectError> {
        let tag = match kind {
            Kind::Dict => 'D',
            Kind::Queue => 'Q',
        };
        let mut found = Vec::new();
        self.state.read_table(Table::Objects, &mut |view| {
            let from = format!("{tag}{SEP}");
            let to = format!("{tag}{AFTER}");
            for (key, bytes) in view.range(&from, &to, usize::MAX)? {
                let mut info: ObjectInfo = serde_json::from_slice(&bytes)?;
                info.name = key[from.len()..].to_string();
                found.push(info);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Deletes the object and everything in it; returns whether it existed.
    pub fn delete(&self, kind: Kind, name: &str) -> Result<bool, ObjectError> {
        check_name(kind, name)?;
        let mut existed = false;
        self.state.update_table(Table::Objects, &mut |edit| {
            existed = edit.delete(&kind.record_key(name))?;
            let (from, to) = kind.entries(name);
            clear_range(edit, &from, &to)?;
            Ok(())
        })?;
        Ok(existed)
    }

    /// Runs one request on the object `name`.
    pub async fn request(
        &self,
        kind: Kind,
        name: &str,
        request: Request,
    ) -> Result<Value, ObjectError> {
        check_name(kind, name)?;
        // The object itself, from inside a function too (an ephemeral one's end).
        if request.op.get("op").and_then(Value::as_str) == Some("delete") {
            let existed = off_runtime(|| self.delete(kind, name))?;
            return Ok(serde_json::json!({ "existed": existed }));
        }
        if request.create_if_missing {
            off_runtime(|| self.create(kind, name))?;
        }
        match kind {
            Kind::Dict => {
                let op: DictOp = serde_json::from_value(request.op)
                    .map_err(|e| ObjectError::invalid(format!("a Dict request: {e}")))?;
                off_runtime(|| self.dict(name, op))
            }
            Kind::Queue => {
                let op: QueueOp = serde_json::from_value(request.op)
                    .map_err(|e| ObjectError::invalid(format!("a Queue request: {e}")))?;
                match op {
                    QueueOp::Get {
                        n,
                        partition,
                        timeout,
                    } => self.queue_get(name, n, partition, timeout).await,
                    op => {
                        // A put wakes the gets waiting on its own partition only.
                        let put = match &op {
                            QueueOp::Put { partition, .. } => {
                                Some(partition_name(partition.clone())?)
                            }
                            _ => None,
                        };
                        let answer = off_runtime(|| self.queue(name, op))?;
                        if let Some(partition) = put {
                            self.notifier(name, &partition).notify_waiters();
                        }
                        Ok(answer)
                    }
                }
            }
        }
    }

    fn dict(&self, name: &str, op: DictOp) -> Result<Value, ObjectError> {
        let (prefix, end) = Kind::Dict.entries(name);
        let entry = |key: &Value| key_text(key).map(|k| format!("{prefix}{k}"));
        let mut answer = Value::Null;
        let mut failure: Option<ObjectError> = None;
        match op {
            DictOp::Get { key } => {
                let key = entry(&key)?;
                self.state.read_table(Table::Objects, &mut |view| {
                    if record(view, Kind::Dict, name)?.is_none() {
                        failure = Some(missing(Kind::Dict, name));
                        return Ok(());
                    }
                    answer = match view.get(&key)? {
                        Some(bytes) => json!({"found": true, "value_json": parse(&bytes)?}),
                        None => json!({"found": false}),
                    };
                    Ok(())
                })?;
            }
            DictOp::Contains { key } => {
                let key = entry(&key)?;
                self.state.read_table(Table::Objects, &mut |view| {
                    if record(view, Kind::Dict, name)?.is_none() {
                        failure = Some(missing(Kind::Dict, name));
                        return Ok(());
                    }
                    answer = json!({"found": view.get(&key)?.is_some()});
                    Ok(())
                })?;
            }
            DictOp::Len {} => {
                self.state.read_table(Table::Objects, &mut |view| {
                    match record(view, Kind::Dict, name)? {
                        Some(info) => answer = json!({"len": info.len}),
                        None => failure = Some(missing(Kind::Dict, name)),
                    }
                    Ok(())
                })?;
            }
            DictOp::Items { limit } => {
                let limit = limit.unwrap_or(MAX_LISTED).min(MAX_LISTED);
                self.state.read_table(Table::Objects, &mut |view| {
                    let Some(info) = record(view, Kind::Dict, name)? else {
                        failure = Some(missing(Kind::Dict, name));
                        return Ok(());
                    };
                    let mut items = Vec::new();
                    for (key, bytes) in view.range(&prefix, &end, limit)? {
                        let key: Value = serde_json::from_str(&key[prefix.len()..])?;
                        items.push(json!([key, parse(&bytes)?]));
                    }
                    answer = json!({"items": items, "len": info.len});
                    Ok(())
                })?;
            }
            DictOp::Put {
                key,
                value_json,
                skip_if_exists,
            } => {
                let (key, value) = (entry(&key)?, value_bytes(&value_json)?);
                self.dict_edit(name, &mut failure, &mut |edit, info| {
                    let exists = edit.get(&key)?.is_some();
                    if !(exists && skip_if_exists) {
                        edit.put(&key, &value)?;
                    }
                    info.len += u64::from(!exists);
                    answer = json!({"created": !exists});
                    Ok(())
                })?;
            }
            DictOp::Update { items } => {
                let mut prepared = Vec::with_capacity(items.len());
                for (key, value) in &items {
                    prepared.push((entry(key)?, value_bytes(value)?));
                }
                self.dict_edit(name, &mut failure, &mut |edit, info| {
                    for (key, value) in &prepared {
                        info.len += u64::from(edit.get(key)?.is_none());
                        edit.put(key, value)?;
                    }
                    answer = json!({});
                    Ok(())
                })?;
            }
            DictOp::Pop { key } => {
                let key = entry(&key)?;
                self.dict_edit(name, &mut failure, &mut |edit, info| {
                    answer = match edit.get(&key)? {
                        Some(bytes) => {
                            edit.delete(&key)?;
                            info.len = info.len.saturating_sub(1);
                            json!({"found": true, "value_json": parse(&bytes)?})
                        }
                        None => json!({"found": false}),
                    };
                    Ok(())
                })?;
            }
            DictOp::Clear {} => {
                self.dict_edit(name, &mut failure, &mut |edit, info| {
                    clear_range(edit, &prefix, &end)?;
                    info.len = 0;
                    answer = json!({});
                    Ok(())
                })?;
            }
        }
        failure.map_or(Ok(answer), Err)
    }

    /// One write transaction on an existing Dict, its record updated with it.
    fn dict_edit(
        &self,
        name: &str,
        failure: &mut Option<ObjectError>,
        work: &mut dyn FnMut(&mut dyn TableEdit, &mut ObjectInfo) -> Result<()>,
    ) -> Result<(), ObjectError> {
        self.state.update_table(Table::Objects, &mut |edit| {
            let Some(mut info) = record(edit, Kind::Dict, name)? else {
                *failure = Some(missing(Kind::Dict, name));
                return Ok(());
            };
            work(edit, &mut info)?;
            save(edit, Kind::Dict, name, &info)
        })?;
        Ok(())
    }

    /// A Queue get: takes what is there, or waits up to `timeout` seconds for a put.
    async fn queue_get(
        &self,
        name: &str,
        n: usize,
        partition: Option<String>,
        timeout: f64,
    ) -> Result<Value, ObjectError> {
        let partition = partition_name(partition)?;
        if !(0.0..=86400.0).contains(&timeout) {
            return Err(ObjectError::invalid(
                "timeout is seconds from 0 to 86400 (the SDK waits longer in steps)",
            ));
        }
        let wait = Duration::from_secs_f64(timeout).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.notifier(name, &partition);
        loop {
            // Registered before looking, so a put in between still wakes this get.
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let values = off_runtime(|| self.take(name, &partition, n.clamp(1, 1000)))?;
            if !values.is_empty() || wait.is_zero() {
                return Ok(json!({"values_json": values}));
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Ok(json!({"values_json": []}));
            }
        }
    }

    /// Every Queue operation but a get, in one transaction.
    fn queue(&self, name: &str, op: QueueOp) -> Result<Value, ObjectError> {
        match op {
            QueueOp::Put {
                values_json,
                partition,
            } => {
                let partition = partition_name(partition)?;
                let mut prepared = Vec::with_capacity(values_json.len());
                for value in &values_json {
                    prepared.push(value_bytes(value)?);
                }
                let mut failure = None;
                self.state.update_table(Table::Objects, &mut |edit| {
                    let Some(mut info) = record(edit, Kind::Queue, name)? else {
                        failure = Some(missing(Kind::Queue, name));
                        return Ok(());
                    };
                    let held = info.partitions.get(&partition).copied().unwrap_or(0);
                    if held + prepared.len() as u64 > MAX_PARTITION_ITEMS {
                        failure = Some(ObjectError::new(
                            429,
                            "queue_full",
                            format!(
                                "Queue {name:?} holds {held} items in partition {partition:?}, \
                                 and at most {MAX_PARTITION_ITEMS} fit; take some out first"
                            ),
                        ));
                        return Ok(());
                    }
                    for value in &prepared {
                        let key = item_key(name, &partition, info.next_seq);
                        edit.put(&key, value)?;
                        info.next_seq += 1;
                    }
                    *info.partitions.entry(partition.clone()).or_default() += prepared.len() as u64;
                    info.len += prepared.len() as u64;
                    save(edit, Kind::Queue, name, &info)
                })?;
                if let Some(failure) = failure {
                    return Err(failure);
                }
                Ok(json!({}))
            }
            QueueOp::Get { .. } => {
                unreachable!("gets may wait, and are served by queue_get")
            }
            QueueOp::Peek { n, skip, partition } => {
                let partition = partition_name(partition)?;
                let (from, to) = partition_range(name, &partition);
                let mut answer = Ok(Value::Null);
                self.state.read_table(Table::Objects, &mut |view| {
                    if record(view, Kind::Queue, name)?.is_none() {
                        answer = Err(missing(Kind::Queue, name));
                        return Ok(());
                    }
                    let mut values = Vec::new();
                    let n = n.clamp(1, MAX_LISTED);
                    let skip = skip.min(MAX_PARTITION_ITEMS as usize);
                    for (_, bytes) in view.range(&from, &to, skip + n)?.into_iter().skip(skip) {
                        values.push(parse(&bytes)?);
                    }
                    answer = Ok(json!({"values_json": values}));
                    Ok(())
                })?;
                answer
            }
            QueueOp::Len { partition, total } => {
                let partition = partition_name(partition)?;
                let mut answer = Ok(Value::Null);
                self.state.read_table(Table::Objects, &mut |view| {
                    answer = match record(view, Kind::Queue, name)? {
                        None => Err(missing(Kind::Queue, name)),
                        Some(info) if total => Ok(json!({"len": info.len})),
                        Some(info) => Ok(
                            json!({"len": info.partitions.get(&partition).copied().unwrap_or(0)}),
                        ),
                    };
                    Ok(())
                })?;
                answer
            }
            QueueOp::Clear { partition, all } => {
                let partition = partition_name(partition)?;
                let mut failure = None;
                self.state.update_table(Table::Objects, &mut |edit| {
                    let Some(mut info) = record(edit, Kind::Queue, name)? else {
                        failure = Some(missing(Kind::Queue, name));
                        return Ok(());
                    };
                    if all {
                        let (from, to) = Kind::Queue.entries(name);
                        clear_range(edit, &from, &to)?;
                        info.partitions.clear();
                        info.len = 0;
                    } else {
                        let (from, to) = partition_range(name, &partition);
                        clear_range(edit, &from, &to)?;
                        let held = info.partitions.remove(&partition).unwrap_or(0);
                        info.len = info.len.saturating_sub(held);
                    }
                    save(edit, Kind::Queue, name, &info)
                })?;
                failure.map_or(Ok(json!({})), Err)
            }
        }
    }

    /// Takes up to `n` of the oldest items of a partition, in one transaction.
    fn take(&self, name: &str, partition: &str, n: usize) -> Result<Vec<Value>, ObjectError> {
        let (from, to) = partition_range(name, partition);
        let mut failure = None;
        let mut values = Vec::new();
        self.state.update_table(Table::Objects, &mut |edit| {
            values.clear();
            let Some(mut info) = record(edit, Kind::Queue, name)? else {
                failure = Some(missing(Kind::Queue, name));
                return Ok(());
            };
            let items = edit.range(&from, &to, n)?;
            if items.is_empty() {
                return Ok(());
            }
            for (key, bytes) in &items {
                edit.delete(key)?;
                values.push(parse(bytes)?);
            }
            let taken = items.len() as u64;
            if let Some(held) = info.partitions.get_mut(partition) {
                *held = held.saturating_sub(taken);
                if *held == 0 {
                    info.partitions.remove(partition);
                }
            }
            info.len = info.len.saturating_sub(taken);
            save(edit, Kind::Queue, name, &info)
        })?;
        failure.map_or(Ok(values), Err)
    }

    /// What wakes the gets waiting on one partition of a queue.
    fn notifier(&self, name: &str, partition: &str) -> Arc<tokio::sync::Notify> {
        let mut waiting = self.waiting.lock().unwrap();
        // Notifiers nobody holds are dropped as others are made, so the map stays small.
        if waiting.len() > 1024 {
            waiting.retain(|_, notify| Arc::strong_count(notify) > 1);
        }
        waiting
            .entry(format!("{name}{SEP}{partition}"))
            .or_default()
            .clone()
    }
}

/// Runs a store transaction (a disk write, perhaps an fsync) where it does not hold up the
/// runtime's other tasks: in place on a worker that hands its tasks to others meanwhile.
fn off_runtime<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

fn item_key(name: &str, partition: &str, seq: u64) -> String {
    format!("q{SEP}{name}{SEP}{partition}{SEP}{seq:020}")
}

fn partition_range(name: &str, partition: &str) -> (String, String) {
    (
        format!("q{SEP}{name}{SEP}{partition}{SEP}"),
        format!("q{SEP}{name}{SEP}{partition}{AFTER}"),
    )
}

fn clear_range(edit: &mut dyn TableEdit, from: &str, to: &str) -> Result<()> {
    loop {
        let batch = edit.range(from, to, 1024)?;
        if batch.is_empty() {
            return Ok(());
        }
        for (key, _) in batch {
            edit.delete(&key)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::RedbStore;

    fn objects() -> (Objects, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(RedbStore::open(dir.path()).unwrap());
        (Objects::new(state), dir)
    }

    fn request(value: Value) -> Request {
        serde_json::from_value(value).unwrap()
    }

    async fn dict(objects: &Objects, op: Value) -> Result<Value, ObjectError> {
        objects.request(Kind::Dict, "d", request(op)).await
    }

    async fn queue(objects: &Objects, op: Value) -> Result<Value, ObjectError> {
        objects.request(Kind::Queue, "q", request(op)).await
    }

    #[tokio::test]
    async fn dict_operations_keep_their_count_and_keys_of_any_json_scalar() {
        let (objects, _dir) = objects();
        let err = dict(&objects, json!({"op": "get", "key": "a"}))
            .await
            .unwrap_err();
        assert_eq!(err.kind, "not_found");
        assert!(
            err.message.contains("create_if_missing=True"),
            "{}",
            err.message
        );
        let put = json!({"op": "put", "key": "a", "value_json": "{\"x\": 1, \"a\": 0}", "create_if_missing": true});
        assert_eq!(dict(&objects, put).await.unwrap(), json!({"created": true}));
        let put = json!({"op": "put", "key": [1, "b"], "value_json": "2"});
        dict(&objects, put).await.unwrap();
        let again = json!({"op": "put", "key": "a", "value_json": "3", "skip_if_exists": true});
        assert_eq!(
            dict(&objects, again).await.unwrap(),
            json!({"created": false})
        );
        let got = dict(&objects, json!({"op": "get", "key": "a"}))
            .await
            .unwrap();
        // The value's text comes back as it was sent: its keys keep their order.
        assert_eq!(
            got,
            json!({"found": true, "value_json": "{\"x\": 1, \"a\": 0}"})
        );
        let len = dict(&objects, json!({"op": "len"})).await.unwrap();
        assert_eq!(len, json!({"len": 2}));
        let update = json!({"op": "update", "items": [["a", "5"], ["c", "6"]]});
        dict(&objects, update).await.unwrap();
        let popped = dict(&objects, json!({"op": "pop", "key": [1, "b"]}))
            .await
            .unwrap();
        assert_eq!(popped, json!({"found": true, "value_json": "2"}));
        let items = dict(&objects, json!({"op": "items"})).await.unwrap();
        assert_eq!(items, json!({"items": [["a", "5"], ["c", "6"]], "len": 2}));
        let bad = dict(&objects, json!({"op": "get", "key": {"no": 1}}))
            .await
            .unwrap_err();
        assert!(bad.message.contains("not a dict"), "{}", bad.message);
        dict(&objects, json!({"op": "clear"})).await.unwrap();
        assert_eq!(
            dict(&objects, json!({"op": "len"})).await.unwrap(),
            json!({"len": 0})
        );
        // Deleted as a request too (how a function ends its ephemeral Dict), once.
        let deleted = dict(&objects, json!({"op": "delete"})).await.unwrap();
        assert_eq!(deleted, json!({"existed": true}));
        assert!(objects.list(Kind::Dict).unwrap().is_empty());
        assert!(!objects.delete(Kind::Dict, "d").unwrap());
    }

    #[tokio::test]
    async fn queues_are_fifo_per_partition_and_a_waiting_get_is_woken_by_a_put() {
        let (objects, _dir) = objects();
        let objects = Arc::new(objects);
        objects.create(Kind::Queue, "q").unwrap();
        let put = json!({"op": "put", "values_json": ["1", "2", "3"]});
        queue(&objects, put).await.unwrap();
        let other = json!({"op": "put", "values_json": ["\"x\""], "partition": "p"});
        queue(&objects, other).await.unwrap();
        let got = queue(&objects, json!({"op": "get", "n": 2})).await.unwrap();
        assert_eq!(got, json!({"values_json": ["1", "2"]}));
        let len = queue(&objects, json!({"op": "len", "total": true}))
            .await
            .unwrap();
        assert_eq!(len, json!({"len": 2}));
        let empty = json!({"op": "get", "partition": "none"});
        assert_eq!(
            queue(&objects, empty).await.unwrap(),
            json!({"values_json": []})
        );
        // A get that waits returns the item put while it waits.
        let waiter = {
            let objects = objects.clone();
            tokio::spawn(async move {
                let get = json!({"op": "get", "timeout": 10, "partition": "later"});
                queue(&objects, get).await.unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let put = json!({"op": "put", "values_json": ["\"late\""], "partition": "later"});
        queue(&objects, put).await.unwrap();
        assert_eq!(waiter.await.unwrap(), json!({"values_json": ["\"late\""]}));
        // One that times out comes back empty.
        let get = json!({"op": "get", "timeout": 0.05, "partition": "never"});
        assert_eq!(
            queue(&objects, get).await.unwrap(),
            json!({"values_json": []})
        );
        queue(&objects, json!({"op": "clear", "all": true}))
            .await
            .unwrap();
        let len = queue(&objects, json!({"op": "len", "total": true}))
            .await
            .unwrap();
        assert_eq!(len, json!({"len": 0}));
    }
}
