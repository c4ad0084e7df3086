//! Image builds and one-shot containers as the API takes and streams them
//! (`POST /v1/images/build`, `POST /v1/containers`), read back by `lode image build` and
//! `lode container run`.

use lode_native_runner::builder::BuildEvent;
use lode_native_runner::image_spec::ImageSpec;
use serde::{Deserialize, Serialize};

/// `POST /v1/images/build`: `{"spec": <image.json>, "tag": "name"?}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// The image, with local parts already uploaded by the client.
    pub spec: ImageSpec,
    /// A tag to point at the result.
    #[serde(default)]
    pub tag: Option<String>,
}

/// What a build streams: the builder's events, then how it ended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BuildLine {
    /// A step started or was cached, a line of output, or a step's result.
    Event(BuildEvent),
    /// The last line.
    End(BuildEnd),
}

/// How a build ended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEnd {
    /// The image.
    Done {
        /// Its index digest.
        digest: String,
        /// Seconds the build took.
        seconds: f64,
    },
    /// The build failed.
    Error {
        /// What failed and what to do.
        message: String,
    },
}

/// `POST /v1/containers`: run a command in a new container of an image.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRequest {
    /// Image digest or tag.
    pub image: String,
    /// The command; empty runs the image's own.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Extra environment, on top of the image's.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Memory limit, MiB.
    #[serde(default)]
    pub memory: Option<u64>,
    /// CPU limit, cores.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Process limit.
    #[serde(default)]
    pub pids: Option<u64>,
    /// Wall-clock limit, seconds.
    #[serde(default)]
    pub timeout: Option<f64>,
    /// `none` (default) or `outbound`.
    #[serde(default)]
    pub network: Option<String>,
    /// With `outbound`: CIDRs, addresses or host names reachable besides the internet (the
    /// host and private ranges are refused otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
    /// Host paths to bind.
    #[serde(default)]
    pub volumes: Vec<VolumeRequest>,
    /// Working directory; defaults to the image's.
    #[serde(default)]
    pub workdir: Option<String>,
}

/// One bind mount of a container request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    /// Absolute host path.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// What a container streams back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ContainerLine {
    /// The container is running.
    Started {
        /// Its id.
        id: String,
        /// The image digest.
        image: String,
    },
    /// Bytes the command wrote to stdout (base64).
    Stdout {
        /// Base64 of the bytes.
        data: String,
    },
    /// Bytes the command wrote to stderr (base64).
    Stderr {
        /// Base64 of the bytes.
        data: String,
    },
    /// How it ended.
    Exit {
        /// The exit code (128 + signal when killed).
        code: i32,
        /// The limit or timeout that stopped it, named.
        killed_by: Option<String>,
        /// Milliseconds from start to exit.
        duration_ms: u64,
    },
    /// It could not run.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}
