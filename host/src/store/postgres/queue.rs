//! The spawned-call queue in PostgreSQL, shared by every host: a spawned input is a row of
//! `lode_spawned` until it finishes. A host takes ready rows with `FOR UPDATE SKIP LOCKED`
//! (so two hosts never take one row) and holds each under a lease it renews while the call
//! runs; a row whose lease ran out (its host died) is ready again, and every take is counted,
//! so the taker can tell a rerun from a first run and hold it to the function's `Retries`.
//! The lease clock is the database's, so hosts' clocks may differ.
//!
//! While the row is there, the call reads as running (on the host that holds its lease, if
//! any). Its record (`GET /v1/calls/{id}`) is written to the `calls` table when it ends, in the
//! same transaction that deletes the row, and only by the host that still holds the lease, so
//! a host whose lease was lost cannot overwrite what another run wrote; a cancel likewise
//! deletes the row and writes the record at once.
//!
//! Many hosts push and finish at once, so requests are batched: a worker thread takes every
//! request waiting, runs each kind as one statement in one transaction, and answers them all
//! (one commit, one flush, for a whole batch). Pushes and cancels (what API callers wait on)
//! have a worker of their own, apart from the takes, renewals and finishes of running calls.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use postgres::Client;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Connection, listen, without_password};

/// Where a push says that inputs are ready.
pub const SPAWNED_CHANNEL: &str = "lode_spawned";

/// Requests answered per batch at most.
const MAX_BATCH: usize = 1024;

/// A spawned input as the queue keeps it: what any host needs to run it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpawnedInput {
    /// The app called.
    pub app: String,
    /// Its function called.
    pub function: String,
    /// `wasm` or `python`.
    pub engine: String,
    /// The call's body (`args`, `kwargs`, options).
    pub body: Value,
    /// The app whose code spawned it; `None`: the operator, through the API.
    pub caller: Option<String>,
    /// Runs allowed after the first, from the function's `Retries`.
    pub max_retries: u32,
    /// When it was spawned, milliseconds since the epoch.
    pub created_ms: u64,
}

/// An input a host took.
#[derive(Debug)]
pub struct Taken {
    /// The spawned call's id.
    pub call_id: String,
    /// What to run.
    pub input: SpawnedInput,
    /// Times it was taken, this time included: more than one means a host that held it
    /// before stopped renewing its lease.
    pub takes: u32,
    /// The host that held it last, for a rerun.
    pub previous_host: Option<String>,
}

type Answer<T> = Box<dyn FnOnce(Result<T>) + Send>;

/// Makes the record of a call cancelled while queued or running.
type MakeCancelled = Box<dyn Fn(&str, &SpawnedInput) -> Vec<u8> + Send>;

enum Op {
    Push {
        id: String,
        input: Vec<u8>,
        answer: Answer<()>,
    },
    Finish {
        id: String,
        host: String,
        record: Vec<u8>,
        answer: Answer<bool>,
    },
    Take {
        host: String,
        max: i64,
        lease: Duration,
        answer: Answer<Vec<Taken>>,
    },
    Renew {
        host: String,
        ids: Vec<String>,
        lease: Duration,
        answer: Answer<Vec<String>>,
    },
    Cancel {
        id: String,
        cancelled: MakeCancelled,
        answer: Answer<Found>,
    },
    Lookup {
        id: String,
        answer: Answer<Found>,
    },
}

/// A call as the queue and the `calls` table have it.
#[derive(Debug)]
pub enum Found {
    /// Still queued or running: its input, and the host that holds its lease.
    Queued(SpawnedInput, Option<String>),
    /// Ended: its record.
    Ended(Vec<u8>),
    /// Neither.
    Unknown,
}

/// The queue of spawned inputs in a PostgreSQL database.
pub struct PgQueue {
    shown: String,
    config: postgres::Config,
    /// Pushes and cancels.
    front: Sender<Op>,
    /// Takes, renewals, finishes.
    back: Sender<Op>,
}

/// Sends `op` (made with an answer that fills a channel) to `to` and waits for the answer.
fn ask<T: Send + 'static>(to: &Sender<Op>, op: impl FnOnce(Answer<T>) -> Op) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    to.send(op(Box::new(move |result| {
        let _ = tx.send(result);
    })))
    .map_err(|_| anyhow!("the PostgreSQL queue stopped"))?;
    rx.recv()
        .map_err(|_| anyhow!("the PostgreSQL queue stopped"))?
}

/// As [`ask`], for async callers.
async fn ask_async<T: Send + 'static>(
    to: &Sender<Op>,
    op: impl FnOnce(Answer<T>) -> Op,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    to.send(op(Box::new(move |result| {
        let _ = tx.send(result);
    })))
    .map_err(|_| anyhow!("the PostgreSQL queue stopped"))?;
    rx.await
        .map_err(|_| anyhow!("the PostgreSQL queue stopped"))?
}

impl PgQueue {
    /// The queue in the database at `url` (whose schema [`super::PgStore::open`] made).
    pub fn open(url: &str) -> Result<Self> {
        let shown = without_password(url);
        let config: postgres::Config = url
            .parse()
            .with_context(|| format!("{shown} is not a PostgreSQL URL"))?;
        let mut workers = Vec::new();
        for name in ["front", "back"] {
            let (sender, receiver) = std::sync::mpsc::channel::<Op>();
            let connection = Connection {
                config: config.clone(),
                client: None,
            };
            let shown = shown.clone();
            std::thread::Builder::new()
                .name(format!("lode-queue-{name}"))
                .spawn(move || serve(connection, receiver, &shown))
                .context("starting the PostgreSQL queue")?;
            workers.push(sender);
        }
        let back = workers.pop().expect("two workers");
        let front = workers.pop().expect("two workers");
        Ok(Self {
            shown,
            config,
            front,
            back,
        })
    }

    /// Queues an input; returns once it is committed.
    pub async fn push(&self, id: &str, input: &SpawnedInput) -> Result<()> {
        let input = serde_json::to_vec(input)?;
        ask_async(&self.front, |answer| Op::Push {
            id: id.to_string(),
            input,
            answer,
        })
        .await
        .with_context(|| format!("queueing a spawned call in {}", self.shown))
    }

    /// Takes up to `max` ready inputs for `host`, each leased for `lease`.
    pub async fn take(&self, host: &str, max: usize, lease: Duration) -> Result<Vec<Taken>> {
        ask_async(&self.back, |answer| Op::Take {
            host: host.to_string(),
            max: max as i64,
            lease,
            answer,
        })
        .await
    }

    /// Extends `host`'s leases on `ids`; returns the ids it still holds (a call cancelled
    /// meanwhile, or one whose lease ran out and another host took, is not among them).
    pub async fn renew(
        &self,
        host: &str,
        ids: Vec<String>,
        lease: Duration,
    ) -> Result<Vec<String>> {
        ask_async(&self.back, |answer| Op::Renew {
            host: host.to_string(),
            ids,
            lease,
            answer,
        })
        .await
    }

    /// Stores a finished call's record and takes its input off the queue, if `host` still
    /// holds its lease; says whether it did.
    pub async fn finish(&self, id: &str, host: &str, record: Vec<u8>) -> Result<bool> {
        ask_async(&self.back, |answer| Op::Finish {
            id: id.to_string(),
            host: host.to_string(),
            record,
            answer,
        })
        .await
    }

    /// Takes a queued or running input off the queue and writes its record, made by
    /// `cancelled`, in one transaction. What there was: the input, now cancelled, or the
    /// record of a call that already ended.
    pub fn cancel(
        &self,
        id: &str,
        cancelled: impl Fn(&str, &SpawnedInput) -> Vec<u8> + Send + 'static,
    ) -> Result<Found> {
        ask(&self.front, |answer| Op::Cancel {
            id: id.to_string(),
            cancelled: Box::new(cancelled),
            answer,
        })
        .with_context(|| format!("cancelling a spawned call in {}", self.shown))
    }

    /// Where call `id` is: queued or running, ended, or unknown (read in one snapshot, so a
    /// call that ends meanwhile is seen one way or the other).
    pub async fn lookup(&self, id: &str) -> Result<Found> {
        ask_async(&self.front, |answer| Op::Lookup {
            id: id.to_string(),
            answer,
        })
        .await
        .with_context(|| format!("reading a spawned call in {}", self.shown))
    }

    /// Calls `ready` whenever some host pushes, and after each (re)connection of the
    /// listener.
    pub fn watch(&self, ready: std::sync::Arc<dyn Fn() + Send + Sync>) {
        let (config, shown) = (self.config.clone(), self.shown.clone());
        let spawned = std::thread::Builder::new()
            .name("lode-queue-listen".into())
            .spawn(move || listen(config, &shown, SPAWNED_CHANNEL, ready.as_ref()));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not listen for spawned calls; polling");
        }
    }
}

/// Answers requests from `ops` in batches until the queue is dropped.
fn serve(mut connection: Connection, ops: Receiver<Op>, shown: &str) {
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut pushes = Vec::new();
        let mut finishes = Vec::new();
        for op in batch {
            match op {
                Op::Push { id, input, answer } => pushes.push((id, input, answer)),
                Op::Finish {
                    id,
                    host,
                    record,
                    answer,
                } => finishes.push((id, host, record, answer)),
                Op::Take {
                    host,
                    max,
                    lease,
                    answer,
                } => answer(named(shown, connection.run(|c| take(c, &host, max, lease)))),
                Op::Renew {
                    host,
                    ids,
                    lease,
                    answer,
                } => answer(named(
                    shown,
                    connection.run(|c| renew(c, &host, &ids, lease)),
                )),
                Op::Cancel {
                    id,
                    cancelled,
                    answer,
                } => answer(named(shown, connection.run(|c| cancel(c, &id, &cancelled)))),
                Op::Lookup { id, answer } => {
                    answer(named(shown, connection.run(|c| lookup(c, &id))))
                }
            }
        }
        if !pushes.is_empty() {
            let pushed = connection.run(|client| push_all(client, &pushes));
            let pushed = named(shown, pushed).map_err(|e| format!("{e:#}"));
            for (_, _, answer) in pushes {
                answer(pushed.clone().map_err(|e| anyhow!(e)));
            }
        }
        if !finishes.is_empty() {
            let done = connection.run(|client| finish_all(client, &finishes));
            let done = named(shown, done).map_err(|e| format!("{e:#}"));
            for (id, _, _, answer) in finishes {
                answer(
                    done.clone()
                        .map(|done| done.contains(&id))
                        .map_err(|e| anyhow!(e)),
                );
            }
        }
        connection.forget_if_closed();
    }
}

fn named<T>(shown: &str, result: Result<T>) -> Result<T> {
    result.with_context(|| format!("the spawned-call queue in PostgreSQL at {shown}"))
}

type Pushed = (String, Vec<u8>, Answer<()>);
type Finished = (String, String, Vec<u8>, Answer<bool>);

fn push_all(client: &mut Client, pushes: &[Pushed]) -> Result<()> {
    let ids: Vec<&str> = pushes.iter().map(|p| p.0.as_str()).collect();
    let inputs: Vec<&[u8]> = pushes.iter().map(|p| p.1.as_slice()).collect();
    let mut txn = client.transaction()?;
    // Idempotent, as a batch cut off with its connection runs again.
    txn.execute(
        "INSERT INTO lode_spawned (call_id, input) \
         SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT DO NOTHING",
        &[&ids, &inputs],
    )?;
    txn.execute("SELECT pg_notify($1, '')", &[&SPAWNED_CHANNEL])?;
    txn.commit()?;
    Ok(())
}

fn take(client: &mut Client, host: &str, max: i64, lease: Duration) -> Result<Vec<Taken>> {
    let rows = client.query(
        "WITH ready AS ( \
           SELECT call_id, lease_host FROM lode_spawned \
           WHERE lease_until IS NULL OR lease_until < clock_timestamp() \
           ORDER BY queued_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
         taken AS ( \
           UPDATE lode_spawned s SET lease_host = $1, takes = s.takes + 1, \
             lease_until = clock_timestamp() + make_interval(secs => $3) \
           FROM ready WHERE s.call_id = ready.call_id \
           RETURNING s.call_id, s.input, s.takes, ready.lease_host AS previous) \
         SELECT call_id, input, takes, previous FROM taken",
        &[&host, &max, &lease.as_secs_f64()],
    )?;
    let mut taken = Vec::with_capacity(rows.len());
    for row in rows {
        let call_id: String = row.get(0);
        let input = parse_input(&call_id, row.get(1))?;
        taken.push(Taken {
            call_id,
            input,
            takes: row.get::<_, i32>(2) as u32,
            previous_host: row.get(3),
        });
    }
    Ok(taken)
}

fn renew(client: &mut Client, host: &str, ids: &[String], lease: Duration) -> Result<Vec<String>> {
    let rows = client.query(
        "UPDATE lode_spawned SET lease_until = clock_timestamp() + make_interval(secs => $3) \
         WHERE lease_host = $1 AND call_id = ANY($2) RETURNING call_id",
        &[&host, &ids, &lease.as_secs_f64()],
    )?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

fn finish_all(client: &mut Client, finishes: &[Finished]) -> Result<HashSet<String>> {
    let ids: Vec<&str> = finishes.iter().map(|f| f.0.as_str()).collect();
    let hosts: Vec<&str> = finishes.iter().map(|f| f.1.as_str()).collect();
    let records: Vec<&[u8]> = finishes.iter().map(|f| f.2.as_slice()).collect();
    let rows = client.query(
        "WITH done AS ( \
           DELETE FROM lode_spawned s USING unnest($1::text[], $2::text[]) AS t(k, h) \
           WHERE s.call_id = t.k AND s.lease_host = t.h RETURNING s.call_id) \
         INSERT INTO lode_entries (tbl, key, value) \
         SELECT 'calls', k, v FROM unnest($1::text[], $3::bytea[]) AS t(k, v) \
         WHERE k IN (SELECT call_id FROM done) \
         ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value RETURNING key",
        &[&ids, &hosts, &records],
    )?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

fn cancel(
    client: &mut Client,
    id: &str,
    cancelled: &(dyn Fn(&str, &SpawnedInput) -> Vec<u8> + Send),
) -> Result<Found> {
    let mut txn = client.transaction()?;
    let removed = txn.query_opt(
        "DELETE FROM lode_spawned WHERE call_id = $1 RETURNING input, lease_host",
        &[&id],
    )?;
    let Some(row) = removed else {
        return ended(&mut txn, id);
    };
    let input = parse_input(id, row.get(0))?;
    let record = cancelled(id, &input);
    txn.execute(
        "INSERT INTO lode_entries (tbl, key, value) VALUES ('calls', $1, $2) \
         ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
        &[&id, &record],
    )?;
    txn.commit()?;
    Ok(Found::Ended(record))
}

/// The ended call's record, if any.
fn ended(txn: &mut postgres::Transaction<'_>, id: &str) -> Result<Found> {
    let row = txn.query_opt(
        "SELECT value FROM lode_entries WHERE tbl = 'calls' AND key = $1",
        &[&id],
    )?;
    Ok(row.map_or(Found::Unknown, |row| Found::Ended(row.get(0))))
}

fn lookup(client: &mut Client, id: &str) -> Result<Found> {
    // One transaction, one snapshot: an end committed meanwhile shows in both or neither.
    let mut txn = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    if let Some(row) = txn.query_opt(
        "SELECT input, lease_host FROM lode_spawned WHERE call_id = $1",
        &[&id],
    )? {
        return Ok(Found::Queued(parse_input(id, row.get(0))?, row.get(1)));
    }
    ended(&mut txn, id)
}

fn parse_input(id: &str, bytes: Vec<u8>) -> Result<SpawnedInput> {
    serde_json::from_slice(&bytes)
        .with_context(|| format!("the queued input of call {id} is corrupt"))
}
