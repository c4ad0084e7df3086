//! [`StateStore`] in PostgreSQL (`lode serve --state postgres://...`), so several hosts share
//! one state: apps, secrets (still sealed by Lode's key), schedules, calls, history,
//! sandboxes, Dicts and Queues.
//!
//! The schema is versioned; [`MIGRATIONS`] run at open, under an advisory lock, each in its own
//! transaction, so hosts starting together migrate once. Every table of [`Table`] is rows of
//! `lode_entries` with that table's name, keys compared byte by byte (`COLLATE "C"`, as redb
//! compares them). Writes to one table take that table's advisory lock for their transaction,
//! so a read-modify-write (`update_table`) never loses a concurrent write, as with redb's one
//! writer.
//!
//! The trait is synchronous and is called from async threads, where a blocking PostgreSQL
//! client may not start its own runtime; so each connection lives on a worker thread of its
//! own, and a call sends it a job and waits. A transaction that runs the caller's code
//! (`update_table`, `read_table`) holds its worker and answers the code's reads and writes one
//! by one. A broken connection is dropped and made again at the next job, so a PostgreSQL
//! that was down is used again as soon as it is back.

use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls, Transaction};

use crate::store::state::{AppRecord, StateStore, Table, TableEdit, TableView};

pub mod queue;

/// The schema, one step per version; a step never changes once released.
pub const MIGRATIONS: &[&str] = &[
    // 1: apps, and every keyed table.
    r#"
    CREATE TABLE lode_apps (
        app text COLLATE "C" PRIMARY KEY,
        record bytea NOT NULL
    );
    CREATE TABLE lode_entries (
        tbl text NOT NULL,
        key text COLLATE "C" NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (tbl, key)
    );
    "#,
    // 2: the registry's tags, shared by hosts whose blobs are in S3.
    r#"
    CREATE TABLE lode_tags (
        name text COLLATE "C" PRIMARY KEY,
        digest text NOT NULL
    );
    "#,
    // 3: the spawned-call queue ([`queue`]).
    r#"
    CREATE TABLE lode_spawned (
        call_id text COLLATE "C" PRIMARY KEY,
        input bytea NOT NULL,
        takes integer NOT NULL DEFAULT 0,
        lease_host text,
        lease_until timestamptz,
        queued_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE INDEX lode_spawned_queued_at ON lode_spawned (queued_at);
    "#,
];

/// Connections open at once.
const WORKERS: usize = 4;
/// Rows read per round trip while the caller's filter picks the newest entries.
const PAGE: i64 = 256;
/// The advisory lock taken while migrating.
const MIGRATION_LOCK: i64 = 0x10de_0001;
/// Where a host says it changed an app.
const APPS_CHANNEL: &str = "lode_apps";
/// The advisory lock a tag update holds.
const TAGS_LOCK: i64 = 0x10de_0002;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// One worker's connection, made again when it breaks.
struct Connection {
    config: postgres::Config,
    client: Option<Client>,
}

impl Connection {
    /// Runs `work` on the client; where a connection kept from before turns out to have
    /// broken (the server restarted since), connects again and runs it once more. What the
    /// jobs run is idempotent (upserts, deletes, reads) or one transaction, so a statement
    /// cut off with its connection is safe to run again.
    fn run<T>(&mut self, work: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        let kept = self.client.as_ref().is_some_and(|c| !c.is_closed());
        match self.client().and_then(&work) {
            Err(e) if kept && connection_closed(&e) => {
                self.client = None;
                self.client().and_then(work)
            }
            answer => answer,
        }
    }

    fn client(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(self.config.connect(NoTls)?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Drops the client if its connection broke, so the next job connects again.
    fn forget_if_closed(&mut self) {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
    }
}

/// Whether `e` says the connection to the server is gone.
fn connection_closed(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<postgres::Error>())
        .any(postgres::Error::is_closed)
}

/// [`StateStore`] in a PostgreSQL database.
pub struct PgStore {
    /// The URL without its password, for messages.
    shown: String,
    config: postgres::Config,
    jobs: Sender<Job>,
}

/// The URL with any password taken out.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

fn lock_key(table: Table) -> i64 {
    0x10de_1000 + table as i64
}

fn table_name(table: Table) -> &'static str {
    match table {
        Table::Secrets => "secrets",
        Table::Schedules => "schedules",
        Table::Calls => "calls",
        Table::History => "history",
        Table::Sandboxes => "sandboxes",
        Table::Objects => "objects",
        Table::Hosts => "hosts",
        Table::Volumes => "volumes",
    }
}

/// Takes `table`'s write lock until the transaction ends.
fn lock(txn: &mut Transaction<'_>, table: Table) -> Result<()> {
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(table)])?;
    Ok(())
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`, or with
    /// `?host=/run/postgresql` for a socket) and brings the schema up to date.
    pub fn open(url: &str) -> Result<Self> {
        let shown = without_password(url);
        let config: postgres::Config = url
            .parse()
            .with_context(|| format!("{shown} is not a PostgreSQL URL"))?;
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..WORKERS {
            let (receiver, config) = (receiver.clone(), config.clone());
            std::thread::Builder::new()
                .name(format!("lode-postgres-{i}"))
                .spawn(move || {
                    let mut connection = Connection {
                        config,
                        client: None,
                    };
                    loop {
                        let job = receiver.lock().unwrap().recv();
                        let Ok(job) = job else { return };
                        job(&mut connection);
                        connection.forget_if_closed();
                    }
                })
                .context("starting a PostgreSQL worker")?;
        }
        let store = Self {
            shown,
            config,
            jobs: sender,
        };
        store.run(migrate)?;
        Ok(store)
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<usize> {
        self.run(|client| {
            let row = client.query_one("SELECT max(version) FROM lode_schema", &[])?;
            Ok(row.get::<_, Option<i32>>(0).unwrap_or(0) as usize)
        })
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| anyhow!("the PostgreSQL workers stopped"))
    }

    /// Runs `work` on a connection and waits for it; the error names the database.
    fn run<T: Send + 'static>(
        &self,
        work: impl Fn(&mut Client) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(Box::new(move |connection| {
            let _ = tx.send(connection.run(work));
        }))?;
        rx.recv()
            .map_err(|_| anyhow!("a PostgreSQL worker stopped"))?
            .with_context(|| format!("PostgreSQL state at {}", self.shown))
    }

    /// Runs `work` in a transaction that holds `table`'s write lock.
    fn write<T: Send + 'static>(
        &self,
        table: Table,
        work: impl Fn(&mut Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run(move |client| {
            let mut txn = client.transaction()?;
            lock(&mut txn, table)?;
            let value = work(&mut txn)?;
            txn.commit()?;
            Ok(value)
        })
    }

    /// Runs `work` against a transaction on `table` held by a worker: a snapshot to read
    /// (`edit` false), or the table's write lock, committed if `work` succeeds (`edit` true).
    fn transact(
        &self,
        table: Table,
        edit: bool,
        work: &mut dyn FnMut(&mut PgTable) -> Result<()>,
    ) -> Result<()> {
        let (ops, requests) = std::sync::mpsc::channel::<Request>();
        let (replies, answers) = std::sync::mpsc::sync_channel::<Result<Reply>>(1);
        self.submit(Box::new(move |connection| {
            serve_transaction(connection, table, edit, requests, replies)
        }))?;
        let mut view = PgTable { ops, answers };
        let shown = || format!("PostgreSQL state at {}", self.shown);
        view.answer().with_context(shown)?;
        match work(&mut view) {
            Ok(()) if edit => view.ask(Request::Commit).map(|_| ()).with_context(shown),
            Ok(()) => Ok(()),
            // Dropping the requests ends the transaction uncommitted.
            Err(e) => Err(e),
        }
    }
}

/// Listens on `channel` for good, calling `changed` for each notification and after each
/// (re)connection, when what was missed meanwhile is unknown.
fn listen(
    config: postgres::Config,
    shown: &str,
    channel: &str,
    changed: &(dyn Fn() + Send + Sync),
) {
    loop {
        let listening = config.connect(NoTls).and_then(|mut client| {
            client.batch_execute(&format!("LISTEN {channel}"))?;
            Ok(client)
        });
        let mut client = match listening {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "PostgreSQL state at {shown}: cannot listen yet");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        changed();
        while !client.is_closed() {
            {
                let mut notifications = client.notifications();
                let mut waiting = notifications.timeout_iter(std::time::Duration::from_secs(5));
                while let Ok(Some(_)) = waiting.next() {
                    changed();
                }
            }
            // A quiet spell: check the connection is still there.
            if client.batch_execute("").is_err() {
                break;
            }
        }
    }
}

fn migrate(client: &mut Client) -> Result<()> {
    let mut txn = client.transaction()?;
    // Before anything else: hosts starting together would race even on IF NOT EXISTS.
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    txn.batch_execute("CREATE TABLE IF NOT EXISTS lode_schema (version integer PRIMARY KEY)")?;
    let at: i32 = txn
        .query_one("SELECT coalesce(max(version), 0) FROM lode_schema", &[])?
        .get(0);
    if at as usize > MIGRATIONS.len() {
        bail!(
            "the database's schema is at version {at}, newer than this lode knows ({}); run a \
             newer lode",
            MIGRATIONS.len()
        );
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(at as usize) {
        let version = i as i32 + 1;
        txn.batch_execute(step)
            .with_context(|| format!("schema migration {version}"))?;
        txn.execute("INSERT INTO lode_schema (version) VALUES ($1)", &[&version])?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    txn.commit()?;
    Ok(())
}

/// A read or write of a transaction the caller's code runs.
enum Request {
    Get(String),
    Range(String, String, usize),
    Count(String, String),
    Put(String, Vec<u8>),
    Delete(String),
    Commit,
}

enum Reply {
    Ready,
    Value(Option<Vec<u8>>),
    Entries(Vec<(String, Vec<u8>)>),
    Count(u64),
    Deleted(bool),
}

/// Holds a transaction on `table` and answers `requests` in it until they end (rolled back)
/// or a commit.
fn serve_transaction(
    connection: &mut Connection,
    table: Table,
    edit: bool,
    requests: Receiver<Request>,
    replies: SyncSender<Result<Reply>>,
) {
    // A kept connection that broke is found here and made again, before the transaction
    // (which cannot be run twice once the caller's code is in it).
    let began = connection
        .run(|client| Ok(client.batch_execute("")?))
        .and_then(|()| connection.client())
        .and_then(|client| {
            let mut txn = if edit {
                client.transaction()?
            } else {
                client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?
            };
            if edit {
                lock(&mut txn, table)?;
            }
            Ok(txn)
        });
    let mut txn = match began {
        Ok(txn) => txn,
        Err(e) => {
            let _ = replies.send(Err(e));
            return;
        }
    };
    if replies.send(Ok(Reply::Ready)).is_err() {
        return;
    }
    let name = table_name(table);
    while let Ok(request) = requests.recv() {
        let answer = match request {
            Request::Commit => {
                let _ = replies.send(txn.commit().map(|()| Reply::Ready).map_err(Into::into));
                return;
            }
            Request::Get(key) => txn
                .query_opt(
                    "SELECT value FROM lode_entries WHERE tbl = $1 AND key = $2",
                    &[&name, &key],
                )
                .map(|row| Reply::Value(row.map(|r| r.get(0)))),
            Request::Range(from, to, limit) => txn
                .query(
                    "SELECT key, value FROM lode_entries WHERE tbl = $1 AND key >= $2 AND \
                     key < $3 ORDER BY key LIMIT $4",
                    &[&name, &from, &to, &(limit.min(i64::MAX as usize) as i64)],
                )
                .map(|rows| Reply::Entries(rows.iter().map(|r| (r.get(0), r.get(1))).collect())),
            Request::Count(from, to) => txn
                .query_one(
                    "SELECT count(*) FROM lode_entries WHERE tbl = $1 AND key >= $2 AND key < $3",
                    &[&name, &from, &to],
                )
                .map(|row| Reply::Count(row.get::<_, i64>(0) as u64)),
            Request::Put(key, value) => txn
                .execute(
                    "INSERT INTO lode_entries (tbl, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&name, &key, &value],
                )
                .map(|_| Reply::Ready),
            Request::Delete(key) => txn
                .execute(
                    "DELETE FROM lode_entries WHERE tbl = $1 AND key = $2",
                    &[&name, &key],
                )
                .map(|n| Reply::Deleted(n > 0)),
        };
        let failed = answer.is_err();
        if replies.send(answer.map_err(Into::into)).is_err() || failed {
            // The caller is gone, or the transaction is aborted: roll back.
            return;
        }
    }
}

/// The caller's side of a transaction a worker holds.
pub struct PgTable {
    ops: Sender<Request>,
    answers: Receiver<Result<Reply>>,
}

impl PgTable {
    fn answer(&self) -> Result<Reply> {
        self.answers
            .recv()
            .map_err(|_| anyhow!("the PostgreSQL transaction ended"))?
    }

    fn ask(&self, request: Request) -> Result<Reply> {
        self.ops
            .send(request)
            .map_err(|_| anyhow!("the PostgreSQL transaction ended"))?;
        self.answer()
    }
}

fn unexpected() -> anyhow::Error {
    anyhow!("the PostgreSQL worker answered out of turn")
}

impl TableView for PgTable {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.ask(Request::Get(key.to_string()))? {
            Reply::Value(value) => Ok(value),
            _ => Err(unexpected()),
        }
    }

    fn range(&self, from: &str, to: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        match self.ask(Request::Range(from.to_string(), to.to_string(), limit))? {
            Reply::Entries(entries) => Ok(entries),
            _ => Err(unexpected()),
        }
    }

    fn count(&self, from: &str, to: &str) -> Result<u64> {
        match self.ask(Request::Count(from.to_string(), to.to_string()))? {
            Reply::Count(count) => Ok(count),
            _ => Err(unexpected()),
        }
    }
}

impl TableEdit for PgTable {
    fn put(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.ask(Request::Put(key.to_string(), value.to_vec()))
            .map(|_| ())
    }

    fn delete(&mut self, key: &str) -> Result<bool> {
        match self.ask(Request::Delete(key.to_string()))? {
            Reply::Deleted(existed) => Ok(existed),
            _ => Err(unexpected()),
        }
    }
}

impl StateStore for PgStore {
    fn put_app(&self, record: &AppRecord) -> Result<()> {
        let (app, bytes) = (record.manifest.app.clone(), serde_json::to_vec(record)?);
        self.run(move |client| {
            let mut txn = client.transaction()?;
            txn.execute(
                "INSERT INTO lode_apps (app, record) VALUES ($1, $2) \
                 ON CONFLICT (app) DO UPDATE SET record = EXCLUDED.record",
                &[&app, &bytes],
            )?;
            // Delivered to the other hosts' listeners when (and only if) this commits.
            txn.execute("SELECT pg_notify($1, $2)", &[&APPS_CHANNEL, &app])?;
            txn.commit()?;
            Ok(())
        })
    }

    fn list_apps(&self) -> Result<Vec<AppRecord>> {
        let rows = self.run(|client| {
            let rows = client.query("SELECT app, record FROM lode_apps ORDER BY app", &[])?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                .collect::<Vec<_>>())
        })?;
        rows.into_iter()
            .map(|(app, bytes)| {
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("state record for app {app:?} is corrupt"))
            })
            .collect()
    }

    fn delete_app(&self, app: &str) -> Result<bool> {
        let app = app.to_string();
        self.run(move |client| {
            Ok(client.execute("DELETE FROM lode_apps WHERE app = $1", &[&app])? > 0)
        })
    }

    fn put_entry(&self, table: Table, key: &str, value: &[u8]) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(table, move |txn| {
            txn.execute(
                "INSERT INTO lode_entries (tbl, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
                &[&table_name(table), &key, &value],
            )?;
            Ok(())
        })
    }

    fn get_entry(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.run(move |client| {
            Ok(client
                .query_opt(
                    "SELECT value FROM lode_entries WHERE tbl = $1 AND key = $2",
                    &[&table_name(table), &key],
                )?
                .map(|row| row.get(0)))
        })
    }

    fn list_entries(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>> {
        self.run(move |client| {
            let rows = client.query(
                "SELECT key, value FROM lode_entries WHERE tbl = $1 ORDER BY key",
                &[&table_name(table)],
            )?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn delete_entry(&self, table: Table, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.write(table, move |txn| {
            let deleted = txn.execute(
                "DELETE FROM lode_entries WHERE tbl = $1 AND key = $2",
                &[&table_name(table), &key],
            )?;
            Ok(deleted > 0)
        })
    }

    fn append_entries(
        &self,
        table: Table,
        entries: &[(String, Vec<u8>)],
        drop_below: &str,
        keep: u64,
        durable: bool,
    ) -> Result<()> {
        let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
        let values: Vec<Vec<u8>> = entries.iter().map(|(_, v)| v.clone()).collect();
        let drop_below = drop_below.to_string();
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.write(table, move |txn| {
            let name = table_name(table);
            if !durable {
                // A crash may lose this commit, as the trait allows; it waits for no flush.
                txn.batch_execute("SET LOCAL synchronous_commit TO OFF")?;
            }
            txn.execute(
                "INSERT INTO lode_entries (tbl, key, value) \
                 SELECT $1, k, v FROM unnest($2::text[], $3::bytea[]) AS t(k, v) \
                 ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &keys, &values],
            )?;
            txn.execute(
                "DELETE FROM lode_entries WHERE tbl = $1 AND key < $2",
                &[&name, &drop_below],
            )?;
            txn.execute(
                "DELETE FROM lode_entries WHERE tbl = $1 AND key IN (SELECT key FROM \
                 lode_entries WHERE tbl = $1 ORDER BY key LIMIT greatest((SELECT count(*) FROM \
                 lode_entries WHERE tbl = $1) - $2, 0))",
                &[&name, &keep],
            )?;
            Ok(())
        })
    }

    fn newest_entries(
        &self,
        table: Table,
        limit: usize,
        accept: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>> {
        let mut found = Vec::new();
        let mut below: Option<String> = None;
        while found.len() < limit {
            let after = below.clone();
            let page: Vec<(String, Vec<u8>)> = self.run(move |client| {
                let rows = match &after {
                    Some(key) => client.query(
                        "SELECT key, value FROM lode_entries WHERE tbl = $1 AND key < $2 \
                         ORDER BY key DESC LIMIT $3",
                        &[&table_name(table), key, &PAGE],
                    )?,
                    None => client.query(
                        "SELECT key, value FROM lode_entries WHERE tbl = $1 ORDER BY key DESC \
                         LIMIT $2",
                        &[&table_name(table), &PAGE],
                    )?,
                };
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })?;
            let Some((last, _)) = page.last() else { break };
            below = Some(last.clone());
            let full = page.len() as i64 == PAGE;
            for (_, value) in page {
                if found.len() >= limit {
                    break;
                }
                if accept(&value) {
                    found.push(value);
                }
            }
            if !full {
                break;
            }
        }
        Ok(found)
    }

    fn watch_apps(&self, changed: Arc<dyn Fn() + Send + Sync>) {
        let (config, shown) = (self.config.clone(), self.shown.clone());
        let spawned = std::thread::Builder::new()
            .name("lode-postgres-listen".into())
            .spawn(move || listen(config, &shown, APPS_CHANNEL, changed.as_ref()));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not listen for deploys on other hosts; polling");
        }
    }

    fn read_table(
        &self,
        table: Table,
        work: &mut dyn FnMut(&dyn TableView) -> Result<()>,
    ) -> Result<()> {
        self.transact(table, false, &mut |view| work(view))
    }

    fn update_table(
        &self,
        table: Table,
        work: &mut dyn FnMut(&mut dyn TableEdit) -> Result<()>,
    ) -> Result<()> {
        self.transact(table, true, &mut |edit| work(edit))
    }
}

/// The registry's tags in PostgreSQL, for hosts that share blobs: a compare-and-swap holds
/// a lock for its transaction, so two hosts moving one tag cannot both win.
pub struct PgTagStore {
    store: Arc<PgStore>,
}

impl PgTagStore {
    /// Tags in `store`'s database.
    pub fn new(store: Arc<PgStore>) -> Self {
        Self { store }
    }
}

/// A registry error as it was, or the database's failure as the registry names one.
fn tag_result<T>(result: Result<T>) -> lode_registry::Result<T> {
    result.map_err(|e| match e.downcast::<lode_registry::Error>() {
        Ok(inner) => inner,
        Err(e) => lode_registry::Error::Unavailable {
            location: "tags".into(),
            message: format!("{e:#}"),
        },
    })
}

fn parse_digest(text: String) -> Result<lode_registry::Digest> {
    Ok(text.parse()?)
}

/// Where `name` points, read after taking the tags' lock for the rest of `txn`.
fn locked_tag(txn: &mut Transaction<'_>, name: &str) -> Result<Option<lode_registry::Digest>> {
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&TAGS_LOCK])?;
    txn.query_opt("SELECT digest FROM lode_tags WHERE name = $1", &[&name])?
        .map(|row| parse_digest(row.get(0)))
        .transpose()
}

impl lode_registry::TagStore for PgTagStore {
    fn get(&self, name: &str) -> lode_registry::Result<lode_registry::Digest> {
        lode_registry::validate_tag_name(name)?;
        let name = name.to_string();
        tag_result(self.store.run(move |client| {
            let row = client.query_opt("SELECT digest FROM lode_tags WHERE name = $1", &[&name])?;
            match row {
                Some(row) => parse_digest(row.get(0)),
                None => Err(lode_registry::Error::TagNotFound(name.clone()).into()),
            }
        }))
    }

    fn set(
        &self,
        name: &str,
        digest: &lode_registry::Digest,
        condition: &lode_registry::TagUpdate,
    ) -> lode_registry::Result<Option<lode_registry::Digest>> {
        lode_registry::validate_tag_name(name)?;
        let (name, digest, condition) = (name.to_string(), digest.to_string(), condition.clone());
        tag_result(self.store.run(move |client| {
            let mut txn = client.transaction()?;
            let current = locked_tag(&mut txn, &name)?;
            lode_registry::check_update(&name, &current, &condition)?;
            txn.execute(
                "INSERT INTO lode_tags (name, digest) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET digest = EXCLUDED.digest",
                &[&name, &digest],
            )?;
            txn.commit()?;
            Ok(current)
        }))
    }

    fn delete(
        &self,
        name: &str,
        condition: &lode_registry::TagUpdate,
    ) -> lode_registry::Result<()> {
        lode_registry::validate_tag_name(name)?;
        let (name, condition) = (name.to_string(), condition.clone());
        tag_result(self.store.run(move |client| {
            let mut txn = client.transaction()?;
            let current = locked_tag(&mut txn, &name)?;
            if current.is_none() {
                return Err(lode_registry::Error::TagNotFound(name.clone()).into());
            }
            lode_registry::check_update(&name, &current, &condition)?;
            txn.execute("DELETE FROM lode_tags WHERE name = $1", &[&name])?;
            txn.commit()?;
            Ok(())
        }))
    }

    fn list(&self, prefix: &str) -> lode_registry::Result<Vec<(String, lode_registry::Digest)>> {
        let prefix = prefix.to_string();
        tag_result(self.store.run(move |client| {
            let rows = client.query(
                "SELECT name, digest FROM lode_tags WHERE left(name, length($1)) = $1 \
                 ORDER BY name",
                &[&prefix],
            )?;
            rows.iter()
                .map(|row| Ok((row.get(0), parse_digest(row.get(1))?)))
                .collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            without_password("postgres://lode:hunter2@db:5432/lode"),
            "postgres://lode:***@db:5432/lode"
        );
        assert_eq!(
            without_password("postgres://lode@db/lode"),
            "postgres://lode@db/lode"
        );
    }

    #[test]
    fn every_table_has_its_own_name_and_lock() {
        let tables = [
            Table::Secrets,
            Table::Schedules,
            Table::Calls,
            Table::History,
            Table::Sandboxes,
            Table::Objects,
            Table::Hosts,
            Table::Volumes,
        ];
        let names: std::collections::BTreeSet<_> = tables.iter().map(|t| table_name(*t)).collect();
        let locks: std::collections::BTreeSet<_> = tables.iter().map(|t| lock_key(*t)).collect();
        assert_eq!((names.len(), locks.len()), (tables.len(), tables.len()));
        assert!(!locks.contains(&MIGRATION_LOCK));
    }
}
