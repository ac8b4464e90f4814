//! Prometheus metrics. Labels are closed sets — role, result, reason, and the
//! provider id (registered by the operator, so bounded) — never a user id,
//! device id or topic.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const PUBLISHES: &str = "consentry_publishes_total";
pub const SUBSCRIPTIONS: &str = "consentry_subscriptions_total";
pub const DELIVERIES: &str = "consentry_deliveries_total";
pub const CONNECTIONS: &str = "consentry_connections_total";
pub const CONNECTED: &str = "consentry_connected_clients";
pub const PROTOCOL_ERRORS: &str = "consentry_protocol_errors_total";
pub const DECISION_SECONDS: &str = "consentry_decision_seconds";
pub const LATENCY_SECONDS: &str = "consentry_gateway_latency_seconds";
pub const VIEWS_SHARED: &str = "consentry_masked_views_shared_total";
pub const BROKER_CONNECTIONS: &str = "consentry_broker_connections";
pub const HOLDS: &str = "consentry_publisher_holds_total";
pub const SLOW_CONSUMERS: &str = "consentry_slow_consumers_disconnected_total";

/// Handles for the metrics recorded once per message, registered once:
/// looking a labelled metric up in the registry on every message costs
/// more than the ACT decision it measures.
pub struct Hot {
    pub ingress_decision: metrics::Histogram,
    pub deliver_decision: metrics::Histogram,
    pub forwarded: metrics::Counter,
    pub latency: metrics::Histogram,
    pub views_shared: metrics::Counter,
}

impl Hot {
    /// Call after the recorder is installed; before, the handles are no-ops.
    pub fn register() -> Self {
        Hot {
            ingress_decision: metrics::histogram!(DECISION_SECONDS, "stage" => "ingress"),
            deliver_decision: metrics::histogram!(DECISION_SECONDS, "stage" => "deliver"),
            forwarded: metrics::counter!(PUBLISHES, "result" => "forwarded", "reason" => "allowed"),
            latency: metrics::histogram!(LATENCY_SECONDS),
            views_shared: metrics::counter!(VIEWS_SHARED),
        }
    }
}

/// Serves `/metrics` on `addr`. Must be called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(DECISION_SECONDS.into()),
            &[
                1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 5e-5, 1e-4, 1e-3,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(LATENCY_SECONDS.into()),
            &[
                1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("consentry_ledger_fsync_seconds".into()),
            &[1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("consentry_ledger_batch_size".into()),
            &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
        )?
        .install()?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        PUBLISHES,
        "PUBLISH packets from clients, by result and reason"
    );
    describe_counter!(SUBSCRIPTIONS, "Subscription filters, by result and reason");
    describe_counter!(
        DELIVERIES,
        "Messages towards clients, by provider, result (delivered, masked, dropped) and reason"
    );
    describe_counter!(CONNECTIONS, "CONNECT attempts, by role and result");
    describe_gauge!(CONNECTED, "Sessions currently open, by role");
    describe_counter!(
        PROTOCOL_ERRORS,
        "Sessions ended for a protocol error, by kind"
    );
    describe_histogram!(
        DECISION_SECONDS,
        Unit::Seconds,
        "ACT decision time, by stage"
    );
    describe_histogram!(
        LATENCY_SECONDS,
        Unit::Seconds,
        "Time from reading a message off the broker to writing it to the client"
    );
    describe_gauge!("consentry_act_version", "Version of the ACT in force");
    describe_counter!(
        VIEWS_SHARED,
        "Masked deliveries served from a view another subscriber's delivery already computed"
    );
    describe_gauge!(
        BROKER_CONNECTIONS,
        "Connections sessions hold to the broker (idle clean sessions hold none)"
    );
    describe_counter!(
        HOLDS,
        "Times a publisher was held because a subscriber its messages go to was too far behind"
    );
    describe_counter!(
        SLOW_CONSUMERS,
        "Subscribers disconnected for being too far behind and reading nothing"
    );
}
