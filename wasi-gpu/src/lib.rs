//! The `lode:gpu` WIT interface (`wit/gpu.wit`) and its host side: devices, host-owned
//! buffers counted against a quota, and a small tensor op set (matmul, elementwise,
//! softmax, layernorm, sum), behind one [`backend::Backend`] trait. The CPU backend is always
//! built and gives the same results as the GPU one (the conformance suite holds them to
//! it); the CUDA backend (feature `cuda`) loads the driver at run time, so everything builds
//! and tests without a GPU.
//!
//! It also reports the GPUs a host has ([`inventory`]), for the router and the native pool.
#![deny(missing_docs)]

pub mod backend;
pub mod context;
pub mod host;
pub mod inventory;
pub mod tensor;

pub use backend::{Backend, Device};
pub use context::{Buffer, Gpu};
pub use tensor::{DType, ErrorCode, GpuError, Layout, Op};
