//! What the server keeps: app records and tables, sealed secrets, named volumes, Dicts and
//! Queues.

pub mod objects;
pub mod secrets;
pub mod state;
pub mod volumes;
