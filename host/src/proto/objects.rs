//! Dicts' and Queues' records as the API lists them (`/v1/dicts`, `/v1/queues`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A Dict's or Queue's record, as listed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ObjectInfo {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// When it was created, in milliseconds since the epoch.
    pub created_ms: u64,
    /// Entries (a Dict) or items in all partitions (a Queue).
    pub len: u64,
    /// A Queue's next sequence number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub next_seq: u64,
    /// A Queue's items per partition (`""` is the default one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
