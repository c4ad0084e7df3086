//! A process's output on its way to its caller: each write an exec line at once, within the
//! process's own budget and what the server holds for callers that have not taken it yet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::proto::sandboxes::ExecLine;

/// A process's stdout or stderr, in either tier: every write becomes an exec line at once, until the
/// process's output budget (shared by both streams) is spent; what comes after is counted
/// and dropped.
#[derive(Clone)]
pub(super) struct ExecOutput {
    tx: mpsc::UnboundedSender<ExecLine>,
    stderr: bool,
    budget: Arc<OutputBudget>,
}

/// The bytes of output one process may send, and those it sent past that.
pub(super) struct OutputBudget {
    left: AtomicU64,
    pub(super) dropped: AtomicU64,
    /// Output of every process of the server sent but not yet taken by its caller.
    queued: Arc<AtomicU64>,
}

/// The most output the server holds for callers that have not taken it yet, across every
/// process: past it, output is dropped (and counted) rather than held.
pub(super) const MAX_QUEUED_OUTPUT: u64 = 512 << 20;

impl OutputBudget {
    pub(super) fn new(bytes: u64, queued: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicU64::new(bytes),
            dropped: AtomicU64::new(0),
            queued,
        })
    }

    /// How much of `n` bytes may go out (queued until the caller takes them); the rest is
    /// counted as dropped.
    pub(super) fn take(&self, n: usize) -> usize {
        let n = n as u64;
        let granted = if self.queued.load(Ordering::Relaxed) + n > MAX_QUEUED_OUTPUT {
            0
        } else {
            self.left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    Some(left.saturating_sub(n))
                })
                .map_or(0, |left| left.min(n))
        };
        self.queued.fetch_add(granted, Ordering::Relaxed);
        self.dropped.fetch_add(n - granted, Ordering::Relaxed);
        granted as usize
    }

    /// `n` queued bytes that no caller will take.
    fn unqueue(&self, n: usize) {
        self.queued.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

impl ExecOutput {
    pub(super) fn new(
        tx: mpsc::UnboundedSender<ExecLine>,
        stderr: bool,
        budget: Arc<OutputBudget>,
    ) -> Self {
        Self { tx, stderr, budget }
    }

    fn send(&self, bytes: &[u8]) {
        use base64::Engine as _;
        let n = self.budget.take(bytes.len());
        if n == 0 {
            return;
        }
        let data = base64::engine::general_purpose::STANDARD.encode(&bytes[..n]);
        let sent = self.tx.send(if self.stderr {
            ExecLine::Stderr { data }
        } else {
            ExecLine::Stdout { data }
        });
        if sent.is_err() {
            self.budget.unqueue(n);
        }
    }
}

impl crate::wasm::store::OutputSink for ExecOutput {
    fn write(&mut self, bytes: &[u8]) {
        self.send(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_sends_up_to_its_budget_and_the_server_holds_up_to_its_cap() {
        let queued = Arc::new(AtomicU64::new(0));
        let budget = OutputBudget::new(10, queued.clone());
        assert_eq!(budget.take(6), 6);
        assert_eq!(budget.take(6), 4);
        assert_eq!(budget.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(queued.load(Ordering::Relaxed), 10);
        // Once the server holds its most, output is dropped until callers take some.
        let other = OutputBudget::new(1 << 30, queued.clone());
        queued.store(MAX_QUEUED_OUTPUT - 3, Ordering::Relaxed);
        assert_eq!(other.take(5), 0);
        assert_eq!(other.dropped.load(Ordering::Relaxed), 5);
        other.unqueue(100);
        assert_eq!(other.take(5), 5);
    }
}
