//! What the server keeps: app records and tables, sealed secrets, named volumes.

pub mod secrets;
pub mod state;
pub mod volumes;
