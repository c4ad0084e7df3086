//! Cranelift's results per function, kept across deploys and restarts (wasmtime's
//! incremental compilation cache), and the count of functions compiled that deploys show
//! their progress from.
//!
//! A component built by componentize-py or componentize-js is tens of thousands of functions
//! of an interpreter that does not change when the app's own code does, so a redeploy after
//! an edit compiles only what changed. Entries are keyed by Cranelift over the function's
//! code, the target and the compiler's settings and version, so a hit is the same machine
//! code a compile would make. They live in `<cache-dir>/compiled/functions.redb`, which
//! must be writable only by Lode, like the compiled components beside it.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};

const FUNCTIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("functions");

/// Past this size the cache starts over, so it stays bounded.
const MAX_BYTES: u64 = 2 << 30;

/// The cache, shared by every compile on one engine.
#[derive(Debug)]
pub struct FunctionCache {
    /// `None` when the file could not be opened: compiles still work, uncached.
    db: Option<Database>,
    /// Results of compiles in progress, written in one transaction when they end.
    pending: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Functions looked up so far (one per function compiled or reused), for progress.
    looked_up: AtomicU64,
    /// Lookups that found the function compiled already.
    hits: AtomicU64,
}

impl FunctionCache {
    /// Opens (or creates) the cache at `path`; a file that cannot be read is logged and
    /// replaced. One held open elsewhere (another server on the same cache dir) is left
    /// alone, and compiles here run uncached.
    pub fn open(path: &Path) -> Self {
        let db = Database::create(path)
            .or_else(|e| {
                if matches!(e, redb::DatabaseError::DatabaseAlreadyOpen) {
                    return Err(e);
                }
                tracing::warn!(path = %path.display(), error = %e, "function cache unusable; starting it over");
                let _ = std::fs::remove_file(path);
                Database::create(path)
            })
            .map_err(|e| {
                tracing::warn!(path = %path.display(), error = %e, "no function cache; compiles run uncached");
            })
            .ok();
        Self {
            db,
            pending: Mutex::new(Vec::new()),
            looked_up: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// Functions looked up since the engine started; a compile's progress is how far this
    /// moved since it began.
    pub fn looked_up(&self) -> u64 {
        self.looked_up.load(Ordering::Relaxed)
    }

    /// Lookups that found the function already compiled.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Writes what the compiles since the last flush produced, in one transaction; clears
    /// the cache first if it passed its bound.
    pub fn flush(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let Some(db) = &self.db else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        let written = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(FUNCTIONS)?;
                let stored = table.stats()?.stored_bytes();
                if stored > MAX_BYTES {
                    table.retain(|_, _| false)?;
                }
                for (key, value) in &pending {
                    table.insert(key.as_slice(), value.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not keep compiled functions; the next compile redoes them");
        }
    }

    /// Entries kept now.
    pub fn entries(&self) -> u64 {
        let Some(db) = &self.db else {
            return 0;
        };
        db.begin_read()
            .ok()
            .and_then(|txn| txn.open_table(FUNCTIONS).ok())
            .and_then(|table| table.len().ok())
            .unwrap_or(0)
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.looked_up.fetch_add(1, Ordering::Relaxed);
        let txn = self.db.as_ref()?.begin_read().ok()?;
        let table = txn.open_table(FUNCTIONS).ok()?;
        let value = table.get(key).ok()??;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(Cow::Owned(value.value().to_vec()))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        self.pending.lock().unwrap().push((key.to_vec(), value));
        true
    }
}

/// The functions `bytes` defines across all its core modules: what a compile of it looks up.
pub fn count_functions(bytes: &[u8]) -> u64 {
    let mut count = 0;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let Ok(wasmparser::Payload::CodeSectionStart { count: n, .. }) = payload {
            count += u64::from(n);
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn module(third: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                (func (export "one") (result i32) i32.const 1)
                (func (export "two") (param i32) (result i32) local.get 0 i32.const 2 i32.mul)
                (func (export "three") (result i32) {third}))"#
        ))
        .unwrap()
    }

    fn compile(cache: &Arc<FunctionCache>, bytes: &[u8]) {
        let mut config = wasmtime::Config::new();
        config
            .enable_incremental_compilation(cache.clone())
            .unwrap();
        let engine = wasmtime::Engine::new(&config).unwrap();
        engine.precompile_module(bytes).unwrap();
        cache.flush();
    }

    /// A second compile, in a new engine as after a restart, of a module with one function
    /// changed compiles only that function; the others come from the file.
    #[test]
    fn a_changed_module_compiles_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("functions.redb");
        let first = module("i32.const 3");
        assert_eq!(count_functions(&first), 3);
        let cache = Arc::new(FunctionCache::open(&path));
        compile(&cache, &first);
        // The functions and their trampolines.
        let (looked_up, kept) = (cache.looked_up(), cache.entries());
        assert!(kept >= 3 && looked_up >= kept, "{looked_up} {kept}");
        drop(cache);

        let cache = Arc::new(FunctionCache::open(&path));
        compile(&cache, &module("i32.const 4"));
        // Every kept entry but the changed function's is reused. (Wasmtime does not always
        // keep every trampoline it compiles, so one more may be kept this time.)
        assert_eq!(cache.looked_up(), looked_up);
        assert!(cache.hits() >= kept - 1, "{} hits of {kept}", cache.hits());
        assert!(
            cache.hits() < looked_up,
            "the changed function was not compiled"
        );
        let after = cache.entries();
        assert!(
            after > kept && after <= kept + 2,
            "{after} entries after {kept}"
        );
        // A second opener while this one holds the file compiles uncached and leaves the
        // file as it is.
        let other = Arc::new(FunctionCache::open(&path));
        compile(&other, &first);
        assert_eq!((other.entries(), cache.entries()), (0, after));
        drop(other);
        // A file that is not a cache is replaced, and compiles still work.
        drop(cache);
        std::fs::write(&path, b"not a database").unwrap();
        let cache = Arc::new(FunctionCache::open(&path));
        compile(&cache, &first);
        assert_eq!(cache.entries(), kept);
    }
}
