//! The `lode:gpu` WIT interface and its host implementation.
//!
//! This crate will own the WIT package `lode:gpu` (devices, buffers, copies, a small op set)
//! and its backends behind one trait: CUDA through `cudarc` with dynamic loading, and a CPU
//! backend that gives the same results. It also reports the GPUs a host has, for the native
//! pool (device nodes, driver libraries, `CUDA_VISIBLE_DEVICES`).
//!
//! It must build and test without a GPU present. Here now: the host's GPU [`inventory`], which
//! the router checks a function's `gpu` request against.
#![deny(missing_docs)]

pub mod inventory;
