//! The `lode` host: API, router, Wasm engine, public HTTP listener and CLI.
//!
//! This crate composes the lower crates and never reimplements them: blobs live in
//! `lode-registry`, trees and mounts in `lode-fs`, containers in `lode-native-runner`, GPUs in
//! `lode-wasi-gpu`. What it owns is the request path (route, instantiate, run, answer), the
//! deploy path (validate, compile once, record, swap atomically), and the `lode` command line.
//!
//! The folders are layers, each importing only those below it (`tests/layers.rs` checks):
//!
//! ```text
//! bench                      lode bench: needs the real binary
//! cli                        one file per command area
//! serve                      composition root: builds Control, starts the listeners
//! api                        the JSON API, behind the token
//! control | sandboxes        apps, deploys, the call router (impl Dispatch), schedules |
//!                            sandboxes for untrusted code
//! wasm | native              the two engines; neither imports the other or control
//! function                   what both engines share: CallTree, CallError, Dispatch
//! store | telemetry          state, secrets, volumes | metrics, logs
//! proto                      wire types shared by CLI and server
//! util | sdk                 small helpers | the embedded Python SDK
//! ```
#![deny(missing_docs)]

pub mod api;
pub mod bench;
pub mod cli;
pub mod control;
pub mod function;
pub mod native;
pub mod proto;
pub mod sandboxes;
pub mod sdk;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod util;
pub mod wasm;
