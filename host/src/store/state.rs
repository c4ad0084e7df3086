//! The embedded state store: which apps are deployed, at which version, plus secrets and
//! schedule marks.
//!
//! [`StateStore`] is the seam for scale-out ([`crate::store::postgres::PgStore`], whose tests
//! hold both to one behaviour); [`RedbStore`] is the embedded default under
//! `<data-dir>/state/`. redb commits are durable (fsync) before they return.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::proto::manifest::Manifest;

/// A deployed app as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppRecord {
    /// The manifest as accepted.
    pub manifest: Manifest,
    /// Increases by one with each deploy that changes the app.
    pub version: u64,
    /// Milliseconds since the Unix epoch.
    pub deployed_at_ms: u64,
}

/// Durable record of deployments.
pub trait StateStore: Send + Sync + 'static {
    /// Records `record`, replacing any earlier version of the app.
    fn put_app(&self, record: &AppRecord) -> Result<()>;
    /// Every recorded app.
    fn list_apps(&self) -> Result<Vec<AppRecord>>;
    /// Forgets an app; returns whether it existed.
    fn delete_app(&self, app: &str) -> Result<bool>;
    /// Stores `value` under `key` in `table`, durably.
    fn put_entry(&self, table: Table, key: &str, value: &[u8]) -> Result<()>;
    /// The value under `key` in `table`.
    fn get_entry(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>>;
    /// Every key and value in `table`, by key.
    fn list_entries(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>>;
    /// Removes `key` from `table`; returns whether it was there.
    fn delete_entry(&self, table: Table, key: &str) -> Result<bool>;
    /// Stores `entries` in `table` in one commit, then drops keys below `drop_below` and, the
    /// smallest first, whatever is over `keep` entries. A commit that is not `durable` reaches
    /// the disk with the next durable one (of any table): a crash may lose it.
    fn append_entries(
        &self,
        table: Table,
        entries: &[(String, Vec<u8>)],
        drop_below: &str,
        keep: u64,
        durable: bool,
    ) -> Result<()>;
    /// Values in `table` from the largest key down, those `accept` takes, at most `limit`.
    fn newest_entries(
        &self,
        table: Table,
        limit: usize,
        accept: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>>;
    /// Calls `changed` whenever another host may have changed the apps (deployed or removed
    /// one), and again after the store reconnects. A store no other host writes to never
    /// calls it.
    fn watch_apps(&self, changed: Arc<dyn Fn() + Send + Sync>) {
        let _ = changed;
    }
    /// Runs `work` on a consistent snapshot of `table`.
    fn read_table(
        &self,
        table: Table,
        work: &mut dyn FnMut(&dyn TableView) -> Result<()>,
    ) -> Result<()>;
    /// Runs `work` in one transaction on `table`: what it changes commits together, durably,
    /// or (when it fails) not at all.
    fn update_table(
        &self,
        table: Table,
        work: &mut dyn FnMut(&mut dyn TableEdit) -> Result<()>,
    ) -> Result<()>;
}

/// Reads inside one transaction on a table.
pub trait TableView {
    /// The value under `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Keys in `from..to` with their values, in order, at most `limit`.
    fn range(&self, from: &str, to: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>>;
    /// How many keys are in `from..to`.
    fn count(&self, from: &str, to: &str) -> Result<u64>;
}

/// Reads and writes inside one transaction on a table.
pub trait TableEdit: TableView {
    /// Stores `value` under `key`.
    fn put(&mut self, key: &str, value: &[u8]) -> Result<()>;
    /// Removes `key`; returns whether it was there.
    fn delete(&mut self, key: &str) -> Result<bool>;
}

/// A redb table, read-only or open for writing, seen through [`TableView`].
struct RedbTable<T>(T);

impl<T: ReadableTable<&'static str, &'static [u8]>> TableView for RedbTable<T> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(key)?.map(|v| v.value().to_vec()))
    }

    fn range(&self, from: &str, to: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        let mut found = Vec::new();
        for entry in self.0.range(from..to)?.take(limit) {
            let (key, value) = entry?;
            found.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(found)
    }

    fn count(&self, from: &str, to: &str) -> Result<u64> {
        let mut count = 0;
        for entry in self.0.range(from..to)? {
            entry?;
            count += 1;
        }
        Ok(count)
    }
}

impl TableEdit for RedbTable<redb::Table<'_, &'static str, &'static [u8]>> {
    fn put(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.0.insert(key, value)?;
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<bool> {
        Ok(self.0.remove(key)?.is_some())
    }
}

/// The keyed tables beside the apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Secrets, encrypted (see [`crate::store::secrets`]).
    Secrets,
    /// When each scheduled function last fired.
    Schedules,
    /// Spawned calls' records.
    Calls,
    /// Every call's summary, keyed so that keys sort by time.
    History,
    /// Sandboxes' records: running, and ended within a day.
    Sandboxes,
    /// Dicts and Queues: their records and entries (see [`crate::store::objects`]).
    Objects,
    /// The hosts sharing this state, each as its last heartbeat left it.
    Hosts,
    /// Named volumes' committed versions, where hosts share them (see
    /// [`crate::store::volume_sync`]).
    Volumes,
}

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");
const CALLS: TableDefinition<&str, &[u8]> = TableDefinition::new("calls");
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");
const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match table {
        Table::Secrets => SECRETS,
        Table::Schedules => SCHEDULES,
        Table::Calls => CALLS,
        Table::History => HISTORY,
        Table::Sandboxes => SANDBOXES,
        Table::Objects => OBJECTS,
        Table::Hosts => HOSTS,
        Table::Volumes => VOLUMES,
    }
}

/// [`StateStore`] in a redb file.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens or creates the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join("lode.redb");
        let db = Database::create(&path).with_context(|| {
            format!(
                "opening state store {} (is another `lode serve` using this data dir?)",
                path.display()
            )
        })?;
        let txn = db.begin_write()?;
        for table in [
            APPS, SECRETS, SCHEDULES, CALLS, HISTORY, SANDBOXES, OBJECTS, HOSTS, VOLUMES,
        ] {
            txn.open_table(table)?;
        }
        txn.commit()?;
        Ok(Self { db })
    }
}

impl StateStore for RedbStore {
    fn put_app(&self, record: &AppRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record)?;
        let txn = self.db.begin_write()?;
        txn.open_table(APPS)?
            .insert(record.manifest.app.as_str(), bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn list_apps(&self) -> Result<Vec<AppRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(APPS)?;
        let mut apps = Vec::new();
        for entry in table.iter()? {
            let (name, bytes) = entry?;
            let record: AppRecord = serde_json::from_slice(bytes.value())
                .with_context(|| format!("state record for app {:?} is corrupt", name.value()))?;
            apps.push(record);
        }
        Ok(apps)
    }

    fn delete_app(&self, app: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(APPS)?.remove(app)?.is_some();
        txn.commit()?;
        Ok(existed)
    }

    fn put_entry(&self, table: Table, key: &str, value: &[u8]) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(definition(table))?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    fn get_entry(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(definition(table))?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list_entries(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(definition(table))?;
        let mut entries = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            entries.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(entries)
    }

    fn delete_entry(&self, table: Table, key: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(definition(table))?.remove(key)?.is_some();
        txn.commit()?;
        Ok(existed)
    }

    fn append_entries(
        &self,
        table: Table,
        entries: &[(String, Vec<u8>)],
        drop_below: &str,
        keep: u64,
        durable: bool,
    ) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut table = txn.open_table(definition(table))?;
            for (key, value) in entries {
                table.insert(key.as_str(), value.as_slice())?;
            }
            table.retain_in(..drop_below, |_, _| false)?;
            let mut over = table.len()?.saturating_sub(keep);
            while over > 0 && table.pop_first()?.is_some() {
                over -= 1;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn newest_entries(
        &self,
        table: Table,
        limit: usize,
        accept: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(definition(table))?;
        let mut found = Vec::new();
        for entry in table.iter()?.rev() {
            if found.len() >= limit {
                break;
            }
            let (_, value) = entry?;
            if accept(value.value()) {
                found.push(value.value().to_vec());
            }
        }
        Ok(found)
    }

    fn read_table(
        &self,
        table: Table,
        work: &mut dyn FnMut(&dyn TableView) -> Result<()>,
    ) -> Result<()> {
        let txn = self.db.begin_read()?;
        work(&RedbTable(txn.open_table(definition(table))?))
    }

    fn update_table(
        &self,
        table: Table,
        work: &mut dyn FnMut(&mut dyn TableEdit) -> Result<()>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = RedbTable(txn.open_table(definition(table))?);
            // Dropping the transaction uncommitted throws its changes away.
            work(&mut table)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::manifest::Manifest;

    fn record(app: &str, version: u64) -> AppRecord {
        AppRecord {
            manifest: Manifest {
                version: 1,
                app: app.into(),
                config: Default::default(),
                limits: Default::default(),
                allow_callers: Vec::new(),
                run_of: None,
                functions: vec![],
            },
            version,
            deployed_at_ms: 1,
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store.put_app(&record("a", 1)).unwrap();
            store.put_app(&record("b", 1)).unwrap();
            store.put_app(&record("a", 2)).unwrap();
            assert!(store.delete_app("b").unwrap());
            assert!(!store.delete_app("b").unwrap());
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.list_apps().unwrap(), vec![record("a", 2)]);
    }

    #[test]
    fn entries_survive_reopening_per_table() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store.put_entry(Table::Secrets, "api", b"sealed").unwrap();
            store.put_entry(Table::Schedules, "api", b"123").unwrap();
            store.put_entry(Table::Schedules, "gone", b"1").unwrap();
            assert!(store.delete_entry(Table::Schedules, "gone").unwrap());
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get_entry(Table::Secrets, "api").unwrap(),
            Some(b"sealed".to_vec())
        );
        assert_eq!(
            store.list_entries(Table::Schedules).unwrap(),
            vec![("api".to_string(), b"123".to_vec())]
        );
    }
}
