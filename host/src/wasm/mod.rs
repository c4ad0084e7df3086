//! The Wasm engine: compiled components, guest state, and the two worlds it runs
//! (`wasi:http` requests and `lode:function` calls). It reaches the rest of Lode only through
//! [`crate::function::Dispatch`].

pub mod engine;
pub mod function;
pub mod http;
pub mod outbound;
pub mod preinit;
