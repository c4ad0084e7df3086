//! Apps as the API lists them, and where a server's listeners are (`GET /v1/info`).

use serde::{Deserialize, Serialize};

/// The base URLs of a server's public listeners, for what it prints and tells clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Urls {
    /// Public HTTP, e.g. `http://127.0.0.1:8080`.
    pub http: String,
    /// The embedded registry, e.g. `http://127.0.0.1:7071`.
    pub registry: String,
}
