//! The `lode` host: API, router, Wasm engine, public HTTP listener and CLI.
//!
//! This crate composes the lower crates and never reimplements them: blobs live in
//! `lode-registry`, trees and mounts in `lode-fs`, containers in `lode-native-runner`, GPUs in
//! `lode-wasi-gpu`. What it owns is the request path (route, instantiate, run, answer), the
//! deploy path (validate, compile once, record, swap atomically), and the `lode` command line.
//!
//! `lode serve` wires [`server::Server`] to the [`api`] router and the [`proxy`] listener;
//! the CLI talks to it through [`cli::ApiClient`].
#![deny(missing_docs)]

pub mod api;
pub mod bench;
pub mod bench_build;
pub mod bench_calls;
pub mod bench_cas;
pub mod bench_container;
pub mod bench_fs;
pub mod bench_python;
pub mod call_history;
pub mod calls;
pub mod cli;
pub mod client_config;
pub mod container_cmd;
pub mod deploy;
pub mod engine;
pub mod fs_cmd;
pub mod fsutil;
pub mod functions_api;
pub mod image;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod native;
pub mod outbound;
pub mod pool;
pub mod preinit;
pub mod proxy;
pub mod python_cli;
pub mod schedule;
pub mod sdk;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod state;
pub mod volumes;
pub mod wasm_calls;
