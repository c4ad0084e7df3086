//! How a guest's run stopped short, named in one place for every path that runs Wasm: HTTP
//! requests, calls by name and pre-initialization each turn a [`Stop`] into their own answer.

use wasmtime::Trap;

/// Why a run ended with an error instead of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its deadline passed: the epoch callback interrupted it.
    Timeout,
    /// It used up its `[limits] fuel`.
    OutOfFuel,
    /// It recursed past its wasm stack.
    StackOverflow,
    /// The store's limiter refused a memory growth past the function's limit.
    OutOfMemory,
    /// Every instance slot of the pool was busy (`lode serve --instances`).
    Overloaded,
    /// Any other trap or host error.
    Trap,
}

/// Names what stopped a run.
pub fn classify(error: &wasmtime::Error) -> Stop {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Stop::Timeout,
        Some(Trap::OutOfFuel) => Stop::OutOfFuel,
        Some(Trap::StackOverflow) => Stop::StackOverflow,
        _ if error.is::<wasmtime::PoolConcurrencyLimitError>() => Stop::Overloaded,
        // The limiter refuses the growth and traps (`trap_on_grow_failure`), with wasmtime's
        // "forcing trap when growing memory to N bytes".
        _ if format!("{error:?}").contains("growing memory") => Stop::OutOfMemory,
        _ => Stop::Trap,
    }
}

/// The error with its causes and backtrace, as the logs show it.
pub fn describe(error: wasmtime::Error) -> String {
    format!("{:#}", anyhow::Error::from(error))
}
