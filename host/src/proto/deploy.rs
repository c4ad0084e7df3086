//! What a deploy streams to the CLI, one event per NDJSON line.

use serde::{Deserialize, Serialize};

/// Progress of a deploy, streamed to the CLI as NDJSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DeployEvent {
    /// Compilation of a function's component started.
    Compiling {
        /// Function name.
        function: String,
        /// Component size.
        bytes: u64,
    },
    /// Still compiling or pre-initializing, sent every half second.
    Progress {
        /// Function name.
        function: String,
        /// Time since that step started.
        elapsed_ms: u64,
        /// While compiling: the component's functions compiled (or found in the function
        /// cache) so far.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compiled: Option<u64>,
        /// While compiling: the functions it defines.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        functions: Option<u64>,
    },
    /// A function's `pre_init` step started: its init runs now, unless an earlier deploy's
    /// snapshot of the same component is found.
    PreInitializing {
        /// Function name.
        function: String,
    },
    /// A function's init ran and its instance was snapshotted.
    PreInitialized {
        /// Function name.
        function: String,
        /// The snapshot's size.
        bytes: u64,
        /// Time taken (0 when an earlier deploy's snapshot was reused).
        ms: u64,
    },
    /// A component is ready.
    Compiled {
        /// Function name.
        function: String,
        /// Whether it came from the compiled cache.
        cached: bool,
        /// Time taken.
        ms: u64,
    },
    /// The same manifest is already live; nothing changed.
    Unchanged {
        /// App name.
        app: String,
        /// Live version.
        version: u64,
        /// Public URLs.
        urls: Vec<String>,
    },
    /// The new version is live.
    Deployed {
        /// App name.
        app: String,
        /// New version.
        version: u64,
        /// Public URLs.
        urls: Vec<String>,
    },
    /// A line of a Python function's image build.
    Image {
        /// Function name.
        function: String,
        /// What the builder said.
        line: String,
    },
    /// The deploy failed; the old version (if any) still serves.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}
