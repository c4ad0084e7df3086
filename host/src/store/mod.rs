//! What the server keeps: app records and tables, sealed secrets, named volumes, Dicts and
//! Queues.

pub mod local;
pub mod objects;
pub mod postgres;
pub mod secrets;
pub mod state;
pub mod volume_sync;
pub mod volumes;
