//! The sandbox API as `lode bench sandbox` drives it (both tiers), and the host's memory.

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::bench::support::LodeServer;

/// A sandbox API client of the bench's server.
pub(super) struct Api {
    pub(super) client: reqwest::Client,
    pub(super) server: LodeServer,
}

impl Api {
    pub(super) fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.server.api))
            .bearer_auth(&self.server.token)
            .json(body)
    }

    /// Posts and reads the whole answer (an NDJSON stream to its last line); fails on an
    /// error status or an `error` line.
    pub(super) async fn run(&self, path: &str, body: &Value) -> Result<String> {
        let response = self.post(path, body).send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() || text.contains("\"event\":\"error\"") {
            bail!("{path} answered {status}: {text}");
        }
        Ok(text)
    }

    pub(super) async fn create(&self, app: &str) -> Result<String> {
        self.create_of(app, "bench/bb").await
    }

    /// A sandbox of `image` for `app`, an hour long; its id.
    pub(super) async fn create_of(&self, app: &str, image: &str) -> Result<String> {
        let text = self
            .run(
                "/v1/sandboxes",
                &json!({"app": app, "image": image, "timeout": 3600}),
            )
            .await?;
        let info: Value = serde_json::from_str(&text)?;
        Ok(info["sandbox_id"].as_str().unwrap_or_default().to_string())
    }

    /// Creates up to `count` idle sandboxes of `image` and holds them: their ids, how long
    /// that took, and the host memory they took, settled (`MemAvailable`). Stops at the first
    /// refusal, saying why.
    pub(super) async fn hold_idle(
        &self,
        image: &str,
        count: usize,
    ) -> Result<(Vec<String>, std::time::Duration, u64)> {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let before = mem_available();
        let started = std::time::Instant::now();
        let mut alive = Vec::new();
        for _ in 0..count {
            match self.create_of("idle", image).await {
                Ok(id) => alive.push(id),
                Err(e) => {
                    println!("  stopped at {} sandboxes: {e:#}", alive.len());
                    break;
                }
            }
        }
        let took = started.elapsed();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        Ok((alive, took, before.saturating_sub(mem_available())))
    }

    pub(super) async fn exec_true(&self, id: &str) -> Result<()> {
        let text = self
            .run(
                &format!("/v1/sandboxes/{id}/exec"),
                &json!({"argv": ["true"]}),
            )
            .await?;
        if !text.contains("\"code\":0") {
            bail!("true failed in {id}: {text}");
        }
        Ok(())
    }

    pub(super) async fn terminate(&self, id: &str) {
        let _ = self
            .client
            .delete(format!("{}/v1/sandboxes/{id}", self.server.api))
            .bearer_auth(&self.server.token)
            .send()
            .await;
    }
}

/// Memory the host has available, in bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
