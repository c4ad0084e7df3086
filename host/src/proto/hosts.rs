//! The hosts of a Lode that shares its state, as `GET /v1/hosts` answers and `lode hosts`
//! prints them.

use serde::{Deserialize, Serialize};

/// What a host says of itself at each heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its id (`lode serve --host-id`, the machine's name by default).
    pub id: String,
    /// Where other hosts and clients reach its API (`--advertise`).
    pub api_url: String,
    /// When it started, in ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Its last heartbeat, in ms since the Unix epoch.
    pub heartbeat_ms: u64,
    /// Function containers serving.
    pub containers: u64,
    /// Wasm instances running now.
    pub wasm_instances: u64,
    /// GPUs in use, and how many it has.
    pub gpus_in_use: u64,
    /// GPUs it has.
    pub gpus: u64,
    /// The machine's one-minute load average.
    pub load: f64,
    /// `app/function` of the Python functions with a container serving here.
    #[serde(default)]
    pub warm: Vec<String>,
}

/// A host as listed: its record, and whether its heartbeat is recent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// What it last said.
    #[serde(flatten)]
    pub record: HostRecord,
    /// Whether it beat within three heartbeat intervals.
    pub alive: bool,
    /// Whether it is the host that answered.
    pub this_host: bool,
}

/// `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostList {
    /// Every host that has a record, this one first.
    pub hosts: Vec<HostStatus>,
}
