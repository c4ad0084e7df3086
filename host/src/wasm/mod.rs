//! The Wasm engine: compiled components, guest state, and the two worlds it runs
//! (`wasi:http` requests and `lode:function` calls). It reaches the rest of Lode only through
//! [`crate::function::Dispatch`].

pub mod bindings;
pub mod command;
pub mod engine;
pub mod function;
pub mod function_cache;
pub mod gpu;
pub mod guest;
pub mod http;
pub mod outbound;
pub mod preinit;
pub mod reuse;
pub mod store;
pub mod trap;

use std::time::Duration;

/// Server-wide bounds and defaults for Wasm functions and public requests, from `lode serve`
/// flags.
#[derive(Debug, Clone)]
pub struct WasmBounds {
    /// Memory per instance when the manifest names none, in bytes.
    pub default_memory: u64,
    /// The most memory a manifest may ask for, in bytes.
    pub max_memory: u64,
    /// Request timeout when the manifest names none.
    pub default_timeout: Duration,
    /// Largest request body the public listener accepts, in bytes.
    pub max_body: u64,
}
