//! Sandboxes as the API takes and answers them (`/v1/sandboxes`), read back by
//! `lode sandbox` and the Python SDK.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proto::containers::VolumeRequest;

/// A sandbox's lifetime when the request names none, in seconds (Modal's default).
pub const DEFAULT_TIMEOUT_SECS: f64 = 300.0;

/// `POST /v1/sandboxes`: a sandbox of `image` for `app`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRequest {
    /// The app it belongs to (a DNS label); listing filters by it.
    pub app: String,
    /// Image digest or tag.
    pub image: String,
    /// CPU limit, cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory limit, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Process limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Seconds until the sandbox ends, whatever it does ([`DEFAULT_TIMEOUT_SECS`] when
    /// absent, capped by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Seconds without an exec or a file call after which it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<f64>,
    /// `none` (the default) or `outbound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// With `outbound`: ranges reachable besides the internet (Modal's `cidr_allowlist`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
    /// Labels to list it by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Environment every process in it starts with, on top of the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Working directory of its processes; defaults to the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Host directories to bind, within the server's `--allow-volume` roots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeRequest>,
    /// Lode volumes (`lode volume`, `lode.Volume`) to mount, as functions mount them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_volumes: Vec<crate::proto::manifest::VolumeMount>,
    /// Secrets whose variables every process in it gets, over `env`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// TCP ports inside it to open to the outside (Modal's `encrypted_ports` and
    /// `unencrypted_ports`), each through a tunnel of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A port of a sandbox opened to the outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    /// The port inside the sandbox.
    pub port: u16,
    /// Where to connect from outside: the host of Lode's public HTTP listener...
    pub host: String,
    /// ...and the port Lode listens on for this tunnel.
    pub host_port: u16,
}

/// Which engine runs a sandbox's processes; its image decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// A container of a Linux image.
    #[default]
    Container,
    /// WASI commands of a Wasm runtime image.
    Wasm,
}

/// Where a sandbox is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    /// It takes processes and file calls.
    Running,
    /// It ended; [`SandboxInfo::ended_by`] says why.
    Ended,
}

/// A sandbox as `GET /v1/sandboxes/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id (`sb-...`).
    pub sandbox_id: String,
    /// The app it belongs to.
    pub app: String,
    /// The image it runs, as asked for.
    pub image: String,
    /// The image's digest.
    pub image_digest: String,
    /// The engine its processes run on.
    #[serde(default)]
    pub tier: Tier,
    /// Its labels.
    pub tags: BTreeMap<String, String>,
    /// Where it is.
    pub status: SandboxStatus,
    /// Why it ended: `terminated`, `timeout`, `idle_timeout`, `restart`, or the limit or
    /// failure that stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// When it ended, in milliseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Its lifetime, in seconds.
    pub timeout: f64,
    /// Its idle timeout, in seconds, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<f64>,
    /// Its open ports, while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnels: Vec<Tunnel>,
    /// The app whose function made it from inside a container; only that app's containers
    /// reach it (besides the API token's holder). Absent when made through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by_app: Option<String>,
    /// The host it runs on, where hosts share the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    /// Newest first.
    pub sandboxes: Vec<SandboxInfo>,
}

/// `POST /v1/sandboxes/{id}/exec`: a process in the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments; a bare name is looked up in the sandbox's `PATH`.
    pub argv: Vec<String>,
    /// Environment on top of the sandbox's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Working directory; defaults to the sandbox's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Seconds until the process is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Whether its stdin stays open for `POST .../processes/{id}/stdin`; otherwise it is
    /// empty.
    #[serde(default)]
    pub stdin: bool,
    /// Container tier: give it a terminal (stdin, stdout and stderr all on one pty; its
    /// output comes back as stdout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// The terminal's rows (24 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// The terminal's columns (80 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Wasm tier: the fuel the command may burn (a count of Wasm work, the same on every
    /// run); none by default, when its timeout alone bounds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

/// What an exec streams, one per NDJSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecLine {
    /// The process runs.
    Started {
        /// Its id, for its stdin.
        process_id: String,
    },
    /// Bytes it wrote to stdout (base64).
    Stdout {
        /// Base64 of the bytes.
        data: String,
    },
    /// Bytes it wrote to stderr (base64).
    Stderr {
        /// Base64 of the bytes.
        data: String,
    },
    /// How it ended.
    Exit {
        /// The exit code (128 + signal when killed).
        code: i32,
        /// What stopped it, named (its timeout, the sandbox's end), if not itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        killed_by: Option<String>,
        /// Bytes of output dropped past the server's limit per process (`lode serve
        /// --sandbox-max-output`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output_dropped: Option<u64>,
        /// Milliseconds from the exec call to the process's end, measured in the server.
        #[serde(default)]
        elapsed_ms: f64,
    },
    /// It could not run.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

/// One entry of `GET /v1/sandboxes/{id}/files?op=ls`, or the answer to `op=stat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name (for `stat`, the last component of the path).
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// `GET /v1/sandboxes/{id}/files?op=ls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileList {
    /// By name.
    pub entries: Vec<FileEntry>,
}

/// `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A tag to point at the new image too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The answer to a snapshot: the new image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotAnswer {
    /// Its digest; a new sandbox can start from it.
    pub image: String,
    /// The tag pointed at it, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/resize`: a process's terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}
