//! The hosts that share one state: each writes a heartbeat record every interval (what it
//! runs, its load), and any of them lists them all. A host whose heartbeat is older than
//! three intervals is shown as not alive; one that stops cleanly takes its record away.

use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Result;

use crate::control::Control;
use crate::proto::hosts::{HostList, HostRecord, HostStatus};
use crate::store::state::Table;

/// This host, as the others see it.
pub struct ThisHost {
    /// Its id.
    pub id: String,
    /// Where its API is reached.
    pub api_url: String,
    started_at_ms: u64,
    /// How often it beats.
    pub interval: Duration,
    /// Whether other hosts share its state (else it keeps no record and stamps no calls).
    pub shared: bool,
    /// Set once it left: held while a beat writes, so no beat lands after the record went.
    left: std::sync::Mutex<bool>,
    /// The other hosts as the last beat listed them, for calls that go to a warm host.
    peers: arc_swap::ArcSwap<Vec<HostStatus>>,
    /// What hosts sharing the state present to each other's peer routes (derived from the
    /// secrets key they share); `None` on a host of its own.
    pub peer_token: Option<String>,
}

/// The one-minute load average.
fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl ThisHost {
    /// A host named `id` whose API is at `api_url`, beating every `interval` where its
    /// state is `shared`.
    pub fn new(
        id: String,
        api_url: String,
        interval: Duration,
        peer_token: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            api_url,
            started_at_ms: crate::util::now_ms(),
            interval,
            shared: peer_token.is_some(),
            left: std::sync::Mutex::new(false),
            peers: Default::default(),
            peer_token,
        })
    }

    /// The other hosts as the last beat listed them.
    pub fn peers(&self) -> Arc<Vec<HostStatus>> {
        self.peers.load_full()
    }

    /// Every host as calls are routed now: this one from its own figures, the others as the
    /// last beat read them (read now, before the first beat).
    pub fn routed(&self, control: &Control) -> Result<HostList> {
        let peers = self.peers();
        let others = if peers.is_empty() {
            self.others(control)?
        } else {
            peers.to_vec()
        };
        Ok(self.with_this(control, others))
    }

    /// What this host says of itself now.
    pub fn record(&self, control: &Control) -> HostRecord {
        let (mut containers, mut warm) = (0, Vec::new());
        for pool in control.functions.pools.pools() {
            let serving = pool.containers() as u64;
            containers += serving;
            if serving > 0 && !pool.is_closed() {
                warm.push(pool.target());
            }
        }
        warm.sort();
        warm.dedup();
        let gpus = &control.functions.pools.gpus;
        HostRecord {
            id: self.id.clone(),
            api_url: self.api_url.clone(),
            started_at_ms: self.started_at_ms,
            heartbeat_ms: crate::util::now_ms(),
            containers,
            wasm_instances: crate::wasm::guest::live_instances(),
            gpus_in_use: gpus.in_use() as u64,
            gpus: gpus.count() as u64,
            load: load(),
            warm,
        }
    }

    /// Every host with a record, this one first (from its own figures), then by id.
    pub fn list(&self, control: &Control) -> Result<HostList> {
        Ok(self.with_this(control, self.others(control)?))
    }

    /// This host, from its own figures, then `others`.
    fn with_this(&self, control: &Control, others: Vec<HostStatus>) -> HostList {
        let mut hosts = vec![HostStatus {
            record: self.record(control),
            alive: true,
            this_host: true,
        }];
        hosts.extend(others);
        HostList { hosts }
    }

    /// The other hosts' records in the state, by id.
    fn others(&self, control: &Control) -> Result<Vec<HostStatus>> {
        let now = crate::util::now_ms();
        let stale = 3 * self.interval.as_millis() as u64;
        let mut hosts = Vec::new();
        for (id, bytes) in control.state.list_entries(Table::Hosts)? {
            if id == self.id {
                continue;
            }
            let Ok(record) = serde_json::from_slice::<HostRecord>(&bytes) else {
                tracing::warn!(host = %id, "a host record does not parse; skipped");
                continue;
            };
            hosts.push(HostStatus {
                alive: now.saturating_sub(record.heartbeat_ms) <= stale,
                this_host: false,
                record,
            });
        }
        Ok(hosts)
    }

    /// Refuses to start as a host whose id a live host uses: two hosts with one id would
    /// overwrite each other's record, and each would fail the other's calls as its own.
    /// Checked before anything of the state is touched.
    pub fn check_id(&self, state: &dyn crate::store::state::StateStore) -> Result<()> {
        if let Some(bytes) = state.get_entry(Table::Hosts, &self.id)?
            && let Ok(record) = serde_json::from_slice::<HostRecord>(&bytes)
        {
            let age = crate::util::now_ms().saturating_sub(record.heartbeat_ms);
            if age <= 3 * self.interval.as_millis() as u64 && record.api_url != self.api_url {
                anyhow::bail!(
                    "host id {:?} is in use by a live host at {} (its heartbeat is {age} ms \
                     old); give this one another --host-id",
                    self.id,
                    record.api_url
                );
            }
        }
        Ok(())
    }

    /// Writes this host's record now, unless it left.
    pub fn beat(&self, control: &Control) -> Result<()> {
        let record = serde_json::to_vec(&self.record(control))?;
        let left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        if *left {
            return Ok(());
        }
        control.state.put_entry(Table::Hosts, &self.id, &record)
    }

    /// Takes this host's record away (a clean stop); no beat writes it again.
    pub fn leave(&self, control: &Control) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        *left = true;
        if let Err(e) = control.state.delete_entry(Table::Hosts, &self.id) {
            tracing::warn!(error = %e, "could not remove this host's record");
        }
    }
}

/// Beats until the control plane is dropped. A missed beat is logged, not fatal: the host
/// keeps serving while the state is away. Every few beats it also marks lost the running
/// calls of hosts that went silent.
pub async fn run(control: Weak<Control>) {
    for n in 0u64.. {
        let Some(strong) = control.upgrade() else {
            return;
        };
        let host = strong.host.clone();
        let beat = tokio::task::spawn_blocking(move || {
            host.beat(&strong)?;
            let hosts = host.others(&strong)?;
            if n % 5 == 4 {
                let alive: std::collections::HashSet<String> = hosts
                    .iter()
                    .filter(|h| h.alive)
                    .map(|h| h.record.id.clone())
                    .collect();
                strong.calls.fail_orphans(&|id| alive.contains(id));
            }
            host.peers.store(Arc::new(hosts));
            anyhow::Ok(())
        })
        .await;
        if let Ok(Err(e)) = beat {
            tracing::warn!(error = %e, "the heartbeat could not be written");
        }
        let interval = match control.upgrade() {
            Some(control) => control.host.interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
    }
}
