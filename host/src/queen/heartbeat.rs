//! Heartbeats to the queen: `POST {queen}/v1/worker-heartbeat` with
//! `{"worker": WorkerInfo, "timestamp": RFC 3339}` every interval and at once on each change
//! of the worker's info (status above all).
//!
//! The heartbeat runs on its own task with a per-beat timeout, so a queen that is down or slow
//! never delays serving. Failures are logged when they start, then at growing intervals
//! (1st, 2nd, 4th, 8th… consecutive failure), and once when the queen answers again.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::status::{WorkerInfo, WorkerStatus};

#[derive(Serialize)]
struct Heartbeat<'a> {
    worker: &'a WorkerInfo,
    timestamp: String,
}

/// The queen's answer.
#[derive(Debug, Deserialize)]
struct QueenReply {
    status: String,
    #[serde(default)]
    message: Option<String>,
}

pub struct Heartbeats {
    client: reqwest::Client,
    endpoint: String,
    interval: Duration,
    consecutive_failures: u32,
}

impl Heartbeats {
    pub fn new(queen_url: &str, interval: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(interval.min(Duration::from_secs(5)))
            .build()?;
        Ok(Self {
            client,
            endpoint: format!("{}/v1/worker-heartbeat", queen_url.trim_end_matches('/')),
            interval,
            consecutive_failures: 0,
        })
    }

    /// Beats until the worker reports `stopped`, which it sends as its final beat.
    pub async fn run(mut self, mut info: watch::Receiver<WorkerInfo>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = info.changed() => if changed.is_err() { return },
            }
            let current = info.borrow_and_update().clone();
            self.beat(&current).await;
            if current.status == WorkerStatus::Stopped {
                return;
            }
            // A change resets the cadence: the next periodic beat is a full interval away.
            ticker.reset();
        }
    }

    async fn beat(&mut self, worker: &WorkerInfo) {
        let beat = Heartbeat {
            worker,
            timestamp: crate::clock::now_rfc3339(),
        };
        let outcome = async {
            let response = self.client.post(&self.endpoint).json(&beat).send().await?;
            let status = response.status();
            if !status.is_success() {
                anyhow::bail!("queen answered HTTP {status}");
            }
            let reply: QueenReply = response.json().await?;
            if reply.status != "ok" {
                anyhow::bail!(
                    "queen answered {}: {}",
                    reply.status,
                    reply.message.unwrap_or_default()
                );
            }
            anyhow::Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                if self.consecutive_failures > 0 {
                    tracing::info!(
                        failures = self.consecutive_failures,
                        "heartbeats reach the queen again"
                    );
                }
                self.consecutive_failures = 0;
                tracing::debug!(status = ?worker.status, "heartbeat sent");
            }
            Err(error) => {
                self.consecutive_failures += 1;
                if self.consecutive_failures.is_power_of_two() {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        failures = self.consecutive_failures,
                        "heartbeat failed: {error:#}"
                    );
                }
            }
        }
    }
}
