//! Opening a cache a previous run left: its index read back, and what a crash left behind
//! (records without an extent, extents without a record, bytes no record covers) removed.

use super::*;

impl ChunkCache {
    /// Reads the index, drops records whose extent is gone, removes extent files nothing
    /// points at, and punches out bytes no record covers (a chunk written when the process
    /// died, before its record was committed).
    pub(super) fn load(db: &Database, db_path: &Path, extents_dir: &Path) -> Result<State> {
        let mut state = State::default();
        let mut found = Vec::new();
        let mut extent_rows = Vec::new();
        {
            let txn = db
                .begin_read()
                .map_err(|e| index_error(db_path)(e.into()))?;
            match txn.open_table(EXTENTS) {
                Ok(table) => {
                    for row in table.iter().map_err(|e| index_error(db_path)(e.into()))? {
                        let (id, value) = row.map_err(|e| index_error(db_path)(e.into()))?;
                        let (key, size) = value.value();
                        extent_rows.push((id.value(), key.to_vec(), size));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(index_error(db_path)(e.into())),
            }
            match txn.open_table(CHUNKS) {
                Ok(table) => {
                    for row in table.iter().map_err(|e| index_error(db_path)(e.into()))? {
                        let (at, value) = row.map_err(|e| index_error(db_path)(e.into()))?;
                        let (extent, offset) = at.value();
                        let (digest, len, seq) = value.value();
                        found.push((seq, At { extent, offset }, Digest::from_hash(digest), len));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(index_error(db_path)(e.into())),
            }
        }
        let mut stale_extents = Vec::new();
        for (id, key, size) in extent_rows {
            let path = extents_dir.join(id.to_string());
            let file = if key.is_empty() {
                None
            } else {
                Some(FileLayout {
                    key: Digest::from_slice(&key).map_err(|e| Error::Io {
                        op: "read chunk cache index",
                        path: db_path.to_path_buf(),
                        source: std::io::Error::other(e),
                    })?,
                    size,
                })
            };
            let Ok(meta) = fs::metadata(&path) else {
                stale_extents.push(id);
                continue;
            };
            if let Some(layout) = &file
                && meta.len() != layout.size
            {
                let _ = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(layout.size));
            }
            state.next_extent = state.next_extent.max(id + 1);
            state.add_extent(id, file);
        }
        found.sort_by_key(|(seq, ..)| *seq);
        let mut stale_chunks = Vec::new();
        for (seq, at, digest, len) in found {
            let Some(extent) = state.extents.get_mut(&at.extent) else {
                stale_chunks.push(at);
                continue;
            };
            extent.live += u64::from(len);
            state.seq = state.seq.max(seq);
            state.clock += 1;
            state.used += u64::from(len);
            state.by_digest.entry(digest.clone()).or_default().push(at);
            let last_use = state.clock;
            state.units.insert(
                at,
                Unit {
                    digest,
                    len,
                    last_use,
                },
            );
        }
        // Extents left with no chunk (all evicted, or never written) take no more: they go.
        let empty: Vec<ExtentId> = state
            .extents
            .iter()
            .filter(|(_, extent)| extent.live == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            if let Some(extent) = state.extents.remove(&id)
                && let Some(layout) = extent.file
            {
                state.files.remove(&layout.key);
            }
            stale_extents.push(id);
        }
        if !stale_chunks.is_empty() || !stale_extents.is_empty() {
            remove_records(db, &stale_chunks, &stale_extents).map_err(index_error(db_path))?;
        }
        // Extent files without a record, and the uncovered bytes of those with one.
        if let Ok(listing) = fs::read_dir(extents_dir) {
            for file in listing.flatten() {
                let known = file
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<ExtentId>().ok())
                    .filter(|id| state.extents.contains_key(id));
                if known.is_none() {
                    let _ = fs::remove_file(file.path());
                }
            }
        }
        let mut covered: HashMap<ExtentId, Vec<(u64, u64)>> = HashMap::new();
        for (at, unit) in &state.units {
            covered
                .entry(at.extent)
                .or_default()
                .push((at.offset, at.offset + u64::from(unit.len)));
        }
        for (id, extent) in &state.extents {
            let path = extents_dir.join(id.to_string());
            let Ok(file) = fs::OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            let mut ranges = covered.remove(id).unwrap_or_default();
            ranges.sort_unstable();
            let end = match &extent.file {
                Some(layout) => layout.size,
                None => {
                    // A packed extent takes no more chunks after a restart; trim its tail.
                    let end = ranges.last().map_or(0, |r| r.1);
                    let _ = file.set_len(end);
                    end
                }
            };
            let mut at = 0;
            for (from, to) in ranges.into_iter().chain([(end, end)]) {
                if from > at {
                    punch_hole(&file, at, from - at);
                }
                at = at.max(to);
            }
        }
        Ok(state)
    }
}
