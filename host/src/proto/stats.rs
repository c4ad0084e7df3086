//! An app's pools as `GET /v1/apps/{app}/stats` answers and `lode stats` prints them.

use serde::{Deserialize, Serialize};

/// A pool's figures, for `lode stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    /// The function.
    pub function: String,
    /// Containers serving.
    pub containers: usize,
    /// Containers starting.
    pub starting: u32,
    /// Inputs running now.
    pub running: usize,
    /// Inputs waiting.
    pub queued: usize,
    /// Containers started since deploy.
    pub cold_starts: u64,
    /// Inputs finished.
    pub inputs: u64,
    /// Inputs that failed.
    pub failures: u64,
    /// Inputs retried after a container died.
    pub retries: u64,
    /// Limits as deployed.
    pub min_containers: u32,
    /// Most containers.
    pub max_containers: u32,
    /// GPUs its containers hold now.
    #[serde(default)]
    pub gpus: usize,
}

/// `GET /v1/apps/{app}/stats`: every Python function's pool of the live version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStats {
    /// The app.
    pub app: String,
    /// Its live version.
    pub version: u64,
    /// One per Python function, by name.
    pub functions: Vec<PoolStats>,
}
