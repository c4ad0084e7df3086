//! The state store on a real PostgreSQL (Debian's, started by the test in a temporary
//! directory), held to the same behaviour as the embedded redb store: records and tables,
//! trimming, snapshots, transactions that commit together or not at all, no lost updates under
//! concurrent read-modify-writes, the schema migrated once, and a database that goes away
//! and comes back.

use std::sync::Arc;

use lode::proto::manifest::Manifest;
use lode::store::local::LocalPostgres;
use lode::store::postgres::{MIGRATIONS, PgStore, PgTagStore};
use lode::store::state::{AppRecord, RedbStore, StateStore, Table};

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

fn batch(keys: &[&str]) -> Vec<(String, Vec<u8>)> {
    keys.iter()
        .map(|k| (k.to_string(), k.as_bytes().to_vec()))
        .collect()
}

/// What every state store does, checked on `store` (empty to begin with).
fn behaves_as_a_state_store(store: &dyn StateStore) {
    store.put_app(&record("b", 1)).unwrap();
    store.put_app(&record("a", 1)).unwrap();
    store.put_app(&record("a", 2)).unwrap();
    assert_eq!(
        store.list_apps().unwrap(),
        vec![record("a", 2), record("b", 1)]
    );
    assert!(store.delete_app("b").unwrap());
    assert!(!store.delete_app("b").unwrap());

    store.put_entry(Table::Secrets, "api", b"sealed").unwrap();
    store.put_entry(Table::Schedules, "api", b"1").unwrap();
    store.put_entry(Table::Schedules, "api", b"2").unwrap();
    assert_eq!(
        store.get_entry(Table::Secrets, "api").unwrap(),
        Some(b"sealed".to_vec())
    );
    assert_eq!(
        store.list_entries(Table::Schedules).unwrap(),
        vec![("api".to_string(), b"2".to_vec())]
    );
    assert!(store.delete_entry(Table::Schedules, "api").unwrap());
    assert!(!store.delete_entry(Table::Schedules, "api").unwrap());
    assert_eq!(store.get_entry(Table::Schedules, "api").unwrap(), None);

    // Keys compare byte by byte: upper case before lower, "10" before "9".
    store
        .append_entries(Table::History, &batch(&["b", "B", "9", "10"]), "", 10, true)
        .unwrap();
    let keys: Vec<String> = store
        .list_entries(Table::History)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["10", "9", "B", "b"]);
    for (key, _) in store.list_entries(Table::History).unwrap() {
        store.delete_entry(Table::History, &key).unwrap();
    }
    store
        .append_entries(Table::History, &batch(&["01", "02", "03"]), "02", 10, false)
        .unwrap();
    store
        .append_entries(Table::History, &batch(&["04", "05", "06"]), "00", 4, true)
        .unwrap();
    let all = store
        .newest_entries(Table::History, 10, &mut |_| true)
        .unwrap();
    assert_eq!(all, [b"06", b"05", b"04", b"03"]);
    let odd = store
        .newest_entries(Table::History, 1, &mut |v| v[1] % 2 == 1)
        .unwrap();
    assert_eq!(odd, [b"05"]);
    // Past one page of rows.
    let many: Vec<(String, Vec<u8>)> = (0..700)
        .map(|i| (format!("m{i:04}"), vec![(i % 7) as u8]))
        .collect();
    store
        .append_entries(Table::Calls, &many, "", 10_000, true)
        .unwrap();
    let sevens = store
        .newest_entries(Table::Calls, 1000, &mut |v| v[0] == 0)
        .unwrap();
    assert_eq!(sevens.len(), 100);

    // A transaction commits together, or not at all.
    store
        .update_table(Table::Objects, &mut |edit| {
            edit.put("k1", b"one")?;
            edit.put("k2", b"two")?;
            assert_eq!(edit.get("k1")?, Some(b"one".to_vec()));
            Ok(())
        })
        .unwrap();
    let failed = store.update_table(Table::Objects, &mut |edit| {
        edit.put("k3", b"three")?;
        assert!(edit.delete("k1")?);
        anyhow::bail!("the caller changed its mind")
    });
    assert!(failed.unwrap_err().to_string().contains("changed its mind"));
    store
        .read_table(Table::Objects, &mut |view| {
            assert_eq!(view.get("k1")?, Some(b"one".to_vec()));
            assert_eq!(view.get("k3")?, None);
            assert_eq!(view.count("k", "l")?, 2);
            assert_eq!(
                view.range("k", "l", 1)?,
                vec![("k1".to_string(), b"one".to_vec())]
            );
            Ok(())
        })
        .unwrap();
}

/// Threads adding one to a counter in read-modify-write transactions, `each` times apiece;
/// the count at the end.
fn count_concurrently(store: Arc<dyn StateStore>, threads: usize, each: usize) -> u64 {
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..each {
                    store
                        .update_table(Table::Objects, &mut |edit| {
                            let now = edit
                                .get("counter")?
                                .map(|v| String::from_utf8(v).unwrap().parse::<u64>().unwrap())
                                .unwrap_or(0);
                            edit.put("counter", (now + 1).to_string().as_bytes())
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let value = store.get_entry(Table::Objects, "counter").unwrap().unwrap();
    String::from_utf8(value).unwrap().parse().unwrap()
}

#[test]
fn postgres_behaves_as_the_embedded_store_does() {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path()).unwrap();
    behaves_as_a_state_store(&redb);

    let pg_dir = tempfile::tempdir().unwrap();
    let postgres = LocalPostgres::start(pg_dir.path()).unwrap();
    let store = PgStore::open(&postgres.url()).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    behaves_as_a_state_store(&store);
    // A second open (another host) finds the schema current and the data there.
    let again = PgStore::open(&postgres.url()).unwrap();
    assert_eq!(again.list_apps().unwrap(), vec![record("a", 2)]);
    assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len());
}

#[test]
fn concurrent_read_modify_writes_lose_nothing_across_two_connections_pools() {
    let pg_dir = tempfile::tempdir().unwrap();
    let postgres = LocalPostgres::start(pg_dir.path()).unwrap();
    // Two stores stand for two hosts: their transactions still serialize per table.
    let one: Arc<dyn StateStore> = Arc::new(PgStore::open(&postgres.url()).unwrap());
    let two: Arc<dyn StateStore> = Arc::new(PgStore::open(&postgres.url()).unwrap());
    let other = std::thread::spawn(move || count_concurrently(two, 4, 25));
    count_concurrently(one.clone(), 4, 25);
    other.join().unwrap();
    let value = one.get_entry(Table::Objects, "counter").unwrap().unwrap();
    assert_eq!(value, b"200");
}

#[test]
fn a_database_that_goes_away_fails_writes_by_name_and_works_again_when_back() {
    let pg_dir = tempfile::tempdir().unwrap();
    let mut postgres = LocalPostgres::start(pg_dir.path()).unwrap();
    let store = PgStore::open(&postgres.url()).unwrap();
    store.put_entry(Table::Secrets, "kept", b"1").unwrap();

    postgres.stop_now().unwrap();
    let err = store.put_entry(Table::Secrets, "lost", b"2").unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("PostgreSQL state at postgres://lode@127.0.0.1"),
        "{message}"
    );
    let err = store
        .update_table(Table::Secrets, &mut |edit| edit.put("half", b"3"))
        .unwrap_err();
    assert!(format!("{err:#}").contains("PostgreSQL state"), "{err:#}");

    postgres.resume().unwrap();
    store.put_entry(Table::Secrets, "after", b"4").unwrap();
    let keys: Vec<String> = store
        .list_entries(Table::Secrets)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["after", "kept"]);
}

#[test]
fn registry_tags_in_postgres_move_only_by_compare_and_swap() {
    use lode_registry::{Digest, Error, TagStore, TagUpdate};
    let pg_dir = tempfile::tempdir().unwrap();
    let postgres = LocalPostgres::start(pg_dir.path()).unwrap();
    // Two hosts' views of the same tags.
    let one = PgTagStore::new(Arc::new(PgStore::open(&postgres.url()).unwrap()));
    let two = PgTagStore::new(Arc::new(PgStore::open(&postgres.url()).unwrap()));
    let (x, y) = (Digest::of(b"x"), Digest::of(b"y"));

    assert!(matches!(one.get("img/app"), Err(Error::TagNotFound(_))));
    assert_eq!(one.set("img/app", &x, &TagUpdate::IfAbsent).unwrap(), None);
    match two.set("img/app", &y, &TagUpdate::IfAbsent) {
        Err(Error::TagConflict { actual, .. }) => assert_eq!(actual, Some(x.clone())),
        other => panic!("the second IfAbsent must lose: {other:?}"),
    }
    assert_eq!(
        two.set("img/app", &y, &TagUpdate::IfEquals(x.clone()))
            .unwrap(),
        Some(x.clone())
    );
    assert!(matches!(
        one.set("img/app", &x, &TagUpdate::IfEquals(x.clone())),
        Err(Error::TagConflict { .. })
    ));
    assert_eq!(one.get("img/app").unwrap(), y);
    one.set("img/other", &x, &TagUpdate::Always).unwrap();
    one.set("profile/p", &x, &TagUpdate::Always).unwrap();
    let listed: Vec<String> = two
        .list("img/")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(listed, ["img/app", "img/other"]);
    assert!(matches!(
        one.set("../escape", &x, &TagUpdate::Always),
        Err(Error::InvalidTag { .. })
    ));
    assert!(matches!(
        two.delete("img/app", &TagUpdate::IfEquals(x.clone())),
        Err(Error::TagConflict { .. })
    ));
    two.delete("img/app", &TagUpdate::IfEquals(y)).unwrap();
    assert!(matches!(
        one.delete("img/app", &TagUpdate::Always),
        Err(Error::TagNotFound(_))
    ));
}
