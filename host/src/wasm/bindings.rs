//! The `lode:function` world's bindings, made by `bindgen!` from `host/wit/lode-function`:
//! the engine links them, calls by name run through them.

/// The bindings `bindgen!` makes from the WIT (documented there).
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        path: "wit/lode-function",
        world: "function",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use generated::lode;
pub use generated::{Function, FunctionPre};
