//! Python calls across hosts: a call from outside for a function with no warm container here
//! goes to a host whose heartbeat says it has warm containers for it, rather than waiting for
//! a cold start; where no host has, it runs here. A call this host's queue has no room for
//! goes to a warm host, else to the least loaded, and is refused (429, with when to retry)
//! only where that host has no room either.
//!
//! Hosts reach each other's APIs with a token every host derives from the secrets key they
//! share (`POST /v1/peer/...`, which runs the call where it lands and never forwards it
//! again), so no host needs another's API token. A forwarded call whose host dies before it
//! answers fails with an error that names the host; it is not run again, as it may have run.

use std::time::Duration;

use lode_native_runner::agent::{ErrorInfo, Outcome};
use serde_json::Value;

use crate::control::Control;
use crate::function::CallError;
use crate::proto::calls::CallAnswer;
use crate::proto::hosts::HostStatus;

/// Whether a call may go to another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// It came from outside, to this host: another host's warm container may serve it.
    Allowed,
    /// It runs here: another host sent it, or this host took it from the spawned queue.
    Never,
}

/// How a call reaches its engine.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// Runs of the input already spent (a spawned call another host ran before it died),
    /// which count against the function's `Retries`.
    pub attempts: u32,
    /// Whether it may go to another host.
    pub forward: Forward,
}

impl Delivery {
    /// A call from outside, to this host.
    pub const FROM_OUTSIDE: Self = Self {
        attempts: 0,
        forward: Forward::Allowed,
    };
}

/// The path of the peer route for a call of `app/function`.
pub fn peer_path(app: &str, function: &str) -> String {
    format!("/v1/peer/apps/{app}/functions/{function}/call")
}

impl Control {
    /// A live host other than this one, the least loaded: one with warm containers for
    /// `target` (`app/function`), or any where `any_host`.
    pub(crate) fn peer_for(&self, target: &str, any_host: bool) -> Option<HostStatus> {
        let peers = self.host.peers();
        peers
            .iter()
            .filter(|h| h.alive)
            .filter(|h| any_host || h.record.warm.iter().any(|w| w == target))
            .min_by(|a, b| a.record.load.total_cmp(&b.record.load))
            .cloned()
    }

    /// Runs the call on `peer`; `timeout` bounds the wait for its answer. `None` when the
    /// peer could not be reached at all, so nothing ran there and the call may run here.
    pub(crate) async fn forward(
        &self,
        peer: &HostStatus,
        app: &str,
        function: &str,
        body: &Value,
        timeout: Duration,
    ) -> Option<Result<Outcome, CallError>> {
        let token = self.host.peer_token.as_deref()?;
        let url = format!("{}{}", peer.record.api_url, peer_path(app, function));
        let host = &peer.record.id;
        let lost = |e: reqwest::Error| {
            CallError::new(
                502,
                "host_lost",
                format!(
                    "host {host} stopped answering while it ran this call of {app}/{function} \
                     (it went there for its warm container); the call may have run; call it \
                     again: {e}"
                ),
            )
        };
        let sent = self
            .peer_client()
            .post(&url)
            .bearer_auth(token)
            .json(body)
            .timeout(timeout)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_connect() => {
                tracing::info!(host = %host, error = %e, "a warm host could not be reached; the call runs here");
                return None;
            }
            Err(e) => return Some(Err(lost(e))),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => return Some(Err(lost(e))),
        };
        let bad = || {
            CallError::new(
                502,
                "bad_gateway",
                format!(
                    "host {host} answered a forwarded call of {app}/{function} with {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                ),
            )
        };
        if status.is_success() {
            let Ok(answer) = serde_json::from_slice::<CallAnswer>(&bytes) else {
                return Some(Err(bad()));
            };
            return Some(match answer {
                CallAnswer::Value { result } => Ok(Outcome::value(result)),
                CallAnswer::Pickled { result_pickled } => Ok(Outcome {
                    result: None,
                    result_pickled: Some(result_pickled),
                    error: None,
                }),
                CallAnswer::Failed { error } => Ok(Outcome::failed(error)),
            });
        }
        #[derive(serde::Deserialize)]
        struct Failed {
            error: ErrorInfo,
        }
        let Ok(failed) = serde_json::from_slice::<Failed>(&bytes) else {
            return Some(Err(bad()));
        };
        Some(Err(CallError {
            status: status.as_u16(),
            error: failed.error,
            retry_after,
        }))
    }

    /// The call run on another host, if one is alive and answers: one with warm containers
    /// for `pool`'s function, or (`full`: this host's queue for it is full) the least loaded.
    pub(crate) async fn forward_to_peer(
        &self,
        pool: &crate::native::pool::Pool,
        app: &str,
        function: &str,
        body: &Value,
        full: bool,
    ) -> Option<Result<Outcome, CallError>> {
        let target = pool.target();
        let peer = self
            .peer_for(&target, false)
            .or_else(|| full.then(|| self.peer_for(&target, true)).flatten())?;
        // The function's own timeout, and time for a queue there.
        let timeout = pool.timeout() + Duration::from_secs(60);
        self.forward(&peer, app, function, body, timeout).await
    }

    fn peer_client(&self) -> &reqwest::Client {
        self.peer_http.get_or_init(reqwest::Client::new)
    }
}
