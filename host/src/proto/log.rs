//! Log lines as the API streams them and `lode logs` prints them.

use serde::{Deserialize, Serialize};

/// Where a line came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Guest standard output.
    Stdout,
    /// Guest standard error.
    Stderr,
    /// Lode itself: deploys, traps, timeouts.
    System,
}

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// App name.
    pub app: String,
    /// Request or call id, when the line belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Source stream.
    pub stream: Stream,
    /// The text, without its newline.
    pub line: String,
}
