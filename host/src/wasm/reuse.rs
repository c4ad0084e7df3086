//! Instances kept between requests, for `wasi:http` functions whose authors declared them
//! safe to reuse (`instance_reuse = N`). A kept instance skips instantiation and the page
//! faults of a fresh memory image, at the price of isolation between requests: whatever one
//! request leaves in the instance's memory (globals, caches, a buffer that held the last
//! body) the next one can see. Requests of other apps and functions never share an instance.
//!
//! An instance goes back to the pool only after a request that finished cleanly, left no
//! response, body or outgoing request open, and was not its `N`th; a trap, a timeout, fuel
//! running out, a body over the limit, or holding more than [`MAX_RESOURCES`] host resources
//! discards it, as does idling past [`IDLE_TTL`] ([`InstancePool::sweep_idle`] checks every
//! few seconds).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;

use crate::wasm::guest::GuestState;
use crate::wasm::store::{RunOutput, WasmGuest};

/// How long an idle instance is kept; older ones are dropped at the next take or return.
pub const IDLE_TTL: Duration = Duration::from_secs(60);

/// Host resources a kept instance may hold between requests: request handles a
/// garbage-collected guest has not dropped yet, its stdout stream. More is a leak.
pub const MAX_RESOURCES: usize = 256;

/// An instance that serves a request: a fresh store to instantiate in, or a kept instance.
pub struct GuestInstance {
    /// Its store, holding the instance (once made) and its memory.
    pub store: Store<GuestState>,
    /// Its `wasi:http` export; `None` until instantiated.
    pub proxy: Option<Proxy>,
    /// Where its stdout and stderr go.
    output: RunOutput,
    /// Requests it has served.
    served: u32,
    idle_since: Instant,
}

impl GuestInstance {
    /// A store no instance has run in yet, logging through `output`.
    pub fn fresh(store: Store<GuestState>, output: RunOutput) -> Self {
        Self {
            store,
            proxy: None,
            output,
            served: 0,
            idle_since: Instant::now(),
        }
    }
}

/// Why an instance was not kept after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// It served its `instance_reuse` requests.
    Served,
    /// The request left a response, a body or an outgoing request open.
    LeftOpen,
    /// It holds more than [`MAX_RESOURCES`] host resources.
    Leaking(usize),
    /// The pool already holds as many idle instances as it keeps.
    Full,
}

/// One function's idle instances.
pub struct InstancePool {
    /// Requests one instance serves before it is dropped.
    limit: u32,
    /// Idle instances kept at most: more would hold pool slots others need.
    max_idle: usize,
    /// Shared with the sweeper, which holds it weakly.
    idle: Arc<Mutex<Vec<GuestInstance>>>,
}

impl InstancePool {
    /// A pool whose instances serve `limit` requests each, keeping at most `max_idle`.
    pub fn new(limit: u32, max_idle: usize) -> Self {
        Self {
            limit,
            max_idle,
            idle: Arc::default(),
        }
    }

    /// Drops instances idle past [`IDLE_TTL`], checking every tenth of it while the pool
    /// lives, so a function with no traffic lets go of their memory.
    pub fn sweep_idle(&self) {
        let idle = Arc::downgrade(&self.idle);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TTL / 10);
            loop {
                tick.tick().await;
                let Some(idle) = idle.upgrade() else {
                    return;
                };
                let expired: Vec<GuestInstance> = {
                    let mut idle = idle.lock().unwrap();
                    let (expired, kept) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|kept| kept.idle_since.elapsed() >= IDLE_TTL);
                    *idle = kept;
                    expired
                };
                // Stores are dropped outside the lock: resetting their memory takes a while.
                drop(expired);
            }
        });
    }

    /// The most recently used idle instance (its pages are likeliest still in cache),
    /// armed with a new run's deadline and fuel and logging under `request_id`.
    pub fn take(
        &self,
        guest: &WasmGuest,
        request_id: Arc<str>,
        deadline: Instant,
    ) -> Option<GuestInstance> {
        let mut kept = {
            let mut idle = self.idle.lock().unwrap();
            idle.retain(|kept| kept.idle_since.elapsed() < IDLE_TTL);
            idle.pop()?
        };
        guest.engine.arm(&mut kept.store, deadline, guest.fuel);
        kept.output.retarget(request_id);
        Some(kept)
    }

    /// Puts `instance` back after a request that finished cleanly, unless a rule says to
    /// drop it (the error says which).
    pub fn give_back(&self, mut instance: GuestInstance) -> Result<(), Discard> {
        instance.served += 1;
        if instance.served >= self.limit {
            return Err(Discard::Served);
        }
        let (resources, open) = instance.store.data_mut().settle_after_request();
        if open {
            return Err(Discard::LeftOpen);
        }
        if resources > MAX_RESOURCES {
            return Err(Discard::Leaking(resources));
        }
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|kept| kept.idle_since.elapsed() < IDLE_TTL);
        if idle.len() >= self.max_idle {
            return Err(Discard::Full);
        }
        instance.idle_since = Instant::now();
        idle.push(instance);
        Ok(())
    }
}
