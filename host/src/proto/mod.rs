//! Wire types and the data model, shared by the CLI and the server: what one writes, the
//! other reads through the same Rust types.

pub mod apps;
pub mod calls;
pub mod client_file;
pub mod containers;
pub mod deploy;
pub mod host_pattern;
pub mod hosts;
pub mod log;
pub mod manifest;
pub mod objects;
pub mod sandboxes;
pub mod schedule;
pub mod stats;
