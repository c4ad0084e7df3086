//! What the API lists: apps, secrets (names only) and volumes, and where a server's
//! listeners are (`GET /v1/info`).

use serde::{Deserialize, Serialize};

use crate::proto::manifest::{Manifest, Runtime};

/// The base URLs of a server's public listeners, for what it prints and tells clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Urls {
    /// Public HTTP, e.g. `http://127.0.0.1:8080`.
    pub http: String,
    /// The embedded registry, e.g. `http://127.0.0.1:7071`.
    pub registry: String,
}

/// One function of an app as `lode ls` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSummary {
    /// Its name.
    pub name: String,
    /// The engine that runs it.
    pub runtime: Runtime,
    /// Its component's digest, for a Wasm function.
    pub component: Option<String>,
    /// Its web path, if it serves HTTP.
    pub web: Option<String>,
}

/// A live app: `GET /v1/apps` lists them, `GET /v1/apps/{app}` adds the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSummary {
    /// Its name.
    pub app: String,
    /// The live version.
    pub version: u64,
    /// Milliseconds since the epoch.
    pub deployed_at_ms: u64,
    /// Its functions.
    pub functions: Vec<FunctionSummary>,
    /// Public URLs of its web functions.
    pub urls: Vec<String>,
    /// The whole manifest, for one app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
}

/// `GET /v1/apps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppList {
    /// Every live app, by name.
    pub apps: Vec<AppSummary>,
}

/// `GET /v1/secrets`: names and keys, never values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretList {
    /// Every secret.
    pub secrets: Vec<SecretInfo>,
}

/// A secret as `lode secret ls` shows it: names, never values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecretInfo {
    /// The secret's name.
    pub name: String,
    /// Its variable names.
    pub keys: Vec<String>,
    /// Milliseconds since the epoch.
    pub updated_ms: u64,
}

/// `GET /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeList {
    /// Every volume's name.
    pub volumes: Vec<String>,
}
