//! consentry's own MQTT client on the broker, for notices to providers
//! (`consentry/notices/{provider}`), e.g. that a user disputes a record of a
//! delivery to them. It connects to the broker directly, not through the
//! gateway: the notice namespace is closed to every client's PUBLISH.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

use crate::act::NOTICE_PREFIX;
use crate::broker::Upstream;
use crate::codec::Version;

/// Messages the client holds for the broker.
const QUEUE: usize = 256;

/// How long a message may wait for room in that queue before it is
/// dropped: long enough for a burst to drain while the broker is up,
/// short enough that an unreachable broker does not pile up waiting tasks.
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The notice client's id at the broker: its own to each process, so that
/// several consentry instances in front of one broker do not take each
/// other's connection over every time one reconnects. A clean session:
/// nothing waits at the broker under the id.
/// How often the notice client tries the broker again while it is down.
const RETRY: Duration = Duration::from_secs(1);
/// How often a broker that stays down is logged again.
const WARN_AGAIN: Duration = Duration::from_secs(60);

fn client_id() -> String {
    format!("consentry-notifier-{:016x}", rand::random::<u64>())
}

#[derive(Clone)]
pub struct Notifier {
    client: AsyncClient,
}

impl Notifier {
    /// Connects (and keeps reconnecting) in the background.
    pub fn start(upstream: &Upstream) -> anyhow::Result<Notifier> {
        let addr = upstream.addr(Version::V4);
        let (host, port) = crate::config::split_host_port(addr)
            .ok_or_else(|| anyhow::anyhow!("upstream address {addr:?} has no port"))?;
        let mut opts = MqttOptions::new(client_id(), host, port.parse()?);
        opts.set_keep_alive(std::time::Duration::from_secs(30));
        if let Some(u) = &upstream.username {
            opts.set_credentials(u.clone(), upstream.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &upstream.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
            ));
        }
        let (client, mut events) = AsyncClient::new(opts, QUEUE);
        tokio::spawn(async move {
            // It retries every second while the broker is down; the log says
            // so once, then once a minute, and again when it is back.
            let mut down_since: Option<Instant> = None;
            let mut warned = Instant::now();
            loop {
                match events.poll().await {
                    Ok(_) => {
                        if let Some(since) = down_since.take() {
                            tracing::info!(
                                down_secs = since.elapsed().as_secs(),
                                "notice client reconnected"
                            );
                        }
                    }
                    Err(e) => {
                        let now = Instant::now();
                        if down_since.is_none() || now - warned >= WARN_AGAIN {
                            tracing::warn!(error = %e, "notice client disconnected; retrying every second");
                            warned = now;
                        } else {
                            tracing::debug!(error = %e, "notice client still disconnected");
                        }
                        down_since.get_or_insert(now);
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        });
        Ok(Notifier { client })
    }

    /// Clears the retained message on each of `topics` (an empty retained
    /// PUBLISH, MQTT 5 3.3.1.3), so that what a removed device left there
    /// is not delivered again should its id come back.
    pub fn clear_retained(&self, topics: Vec<String>) {
        self.send(topics.into_iter().map(|t| (t, true, Vec::new())).collect());
    }

    /// Queues a notice at QoS 1; a provider with a persistent session gets
    /// it when it is next connected.
    pub fn notify(&self, provider: &str, notice: &Value) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(notice)?;
        self.send(vec![(format!("{NOTICE_PREFIX}{provider}"), false, payload)]);
        Ok(())
    }

    /// Hands `messages` (topic, retain, payload) to the client in order, in
    /// a task of their own: the API request that made them does not wait.
    /// A burst larger than the queue waits for room while the broker takes
    /// messages; what finds no room within [`ROOM_WAIT`] is dropped, counted
    /// one by one, and logged.
    fn send(&self, messages: Vec<(String, bool, Vec<u8>)>) {
        let client = self.client.clone();
        tokio::spawn(async move {
            let total = messages.len();
            for (i, (topic, retain, payload)) in messages.into_iter().enumerate() {
                let queued = client.publish(topic, QoS::AtLeastOnce, retain, payload);
                if !matches!(tokio::time::timeout(ROOM_WAIT, queued).await, Ok(Ok(()))) {
                    let dropped = total - i;
                    metrics::counter!(crate::metrics::NOTICES_DROPPED).increment(dropped as u64);
                    tracing::warn!(
                        dropped,
                        "notices dropped: the broker took none for {ROOM_WAIT:?}"
                    );
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_notice_client_has_an_id_of_its_own() {
        let (a, b) = (super::client_id(), super::client_id());
        assert!(a.starts_with("consentry-notifier-"), "{a}");
        assert_ne!(a, b);
    }
}
