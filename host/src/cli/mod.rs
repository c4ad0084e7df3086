//! The `lode` commands that talk to a server, one file per area.

pub mod apps;
pub mod calls;
pub mod client;
pub mod container;
pub mod deploy;
pub mod fs;
pub mod image;
pub mod python;
pub mod secrets;
pub mod volumes;

pub use client::{ApiClient, ndjson_lines};
