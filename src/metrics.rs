//! Prometheus metrics. Labels are closed sets — role, result, reason, and the
//! provider id (registered by the operator, so bounded) — never a user id,
//! device id or topic.
//!
//! Every metric is described and registered when the endpoint starts, so a
//! scrape finds each of them (counters at 0) before anything happened:
//! `rate()` has a first sample and `absent()` means the metric is gone.

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
pub const ACT_VERSION: &str = "consentry_act_version";
pub const LEDGER_APPENDS: &str = "consentry_ledger_appends_total";
pub const LEDGER_APPEND_FAILURES: &str = "consentry_ledger_append_failures_total";
pub const LEDGER_HEALTHY: &str = "consentry_ledger_healthy";
pub const LEDGER_PURGE_FAILURES: &str = "consentry_ledger_purge_failures_total";
pub const LEDGER_FSYNC_SECONDS: &str = "consentry_ledger_fsync_seconds";
pub const LEDGER_BATCH_SIZE: &str = "consentry_ledger_batch_size";
pub const LEDGER_CLOCK_BEHIND: &str = "consentry_ledger_clock_behind_seconds";
pub const LEDGER_CLOCK_JUMPED: &str = "consentry_ledger_clock_jumped_seconds";
pub const PASSWORD_CHECKS: &str = "consentry_password_checks_total";
pub const NOTICES_DROPPED: &str = "consentry_notices_dropped_total";
pub const ACCEPT_FAILURES: &str = "consentry_accept_failures_total";

/// Every metric consentry exports.
pub const ALL: &[&str] = &[
    PUBLISHES,
    SUBSCRIPTIONS,
    DELIVERIES,
    CONNECTIONS,
    CONNECTED,
    PROTOCOL_ERRORS,
    DECISION_SECONDS,
    LATENCY_SECONDS,
    VIEWS_SHARED,
    BROKER_CONNECTIONS,
    HOLDS,
    SLOW_CONSUMERS,
    ACT_VERSION,
    LEDGER_APPENDS,
    LEDGER_APPEND_FAILURES,
    LEDGER_HEALTHY,
    LEDGER_PURGE_FAILURES,
    LEDGER_FSYNC_SECONDS,
    LEDGER_BATCH_SIZE,
    LEDGER_CLOCK_BEHIND,
    LEDGER_CLOCK_JUMPED,
    PASSWORD_CHECKS,
    NOTICES_DROPPED,
    ACCEPT_FAILURES,
];

/// The listeners, the `listener` label of [`ACCEPT_FAILURES`].
pub const LISTENERS: [&str; 4] = ["mqtt", "mqtts", "api", "metrics"];

/// Roles of connected clients, the `role` label.
const ROLES: [&str; 3] = ["device", "provider", "anonymous"];

/// A `consentry_deliveries_total` series. A delivery to a provider carries
/// the provider's id; a delivery to a device or an anonymous client (of an
/// ACL topic: they never receive personal data) carries only its role, so
/// that no provider id is ever confused with a role.
pub fn delivery_counter(
    who: &crate::act::Principal,
    result: &'static str,
    reason: &'static str,
) -> metrics::Counter {
    match who {
        crate::act::Principal::Provider { id } => metrics::counter!(
            DELIVERIES,
            "role" => "provider",
            "provider" => id.clone(),
            "result" => result,
            "reason" => reason
        ),
        other => metrics::counter!(
            DELIVERIES,
            "role" => other.role(),
            "result" => result,
            "reason" => reason
        ),
    }
}

/// One ACT decision in this many is timed for [`DECISION_SECONDS`]: timing
/// takes two clock reads, which cost more than the decision they time, and
/// a regular sample of decisions has the same distribution.
pub const DECISION_SAMPLE_EVERY: u32 = 16;

/// Whether the decision about to be made is one of those timed; counted per
/// thread, so that no two cores share the count. The first on a thread is.
pub fn time_this_decision() -> bool {
    thread_local!(static DECISIONS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
    DECISIONS.with(|n| {
        let before = n.get();
        n.set(before.wrapping_add(1));
        before % DECISION_SAMPLE_EVERY == 0
    })
}

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

/// The `/metrics` endpoint; it stops serving when dropped.
pub struct Endpoint {
    pub addr: SocketAddr,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// How often histograms are folded into what `/metrics` renders.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the recorder and serves `/metrics` on `addr`. Must be called
/// inside a tokio runtime.
///
/// The exporter's own HTTP listener is not used: out of file descriptors it
/// retried `accept` in a loop, logging each failure, and it has no bound on
/// connections or on how long a request may take. `/metrics` is served the
/// way the API is (`server::serve_http`), with its bounds.
pub async fn install(addr: SocketAddr) -> anyhow::Result<Endpoint> {
    let handle = PrometheusBuilder::new()
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
            Matcher::Full(LEDGER_FSYNC_SECONDS.into()),
            &[1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full(LEDGER_BATCH_SIZE.into()),
            &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
        )?
        .install_recorder()?;
    describe();
    register();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = handle.render();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    let listener =
        crate::api::bounded::Bounded::new(crate::accept::Tcp::new(listener, "metrics"), "metrics");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(crate::server::serve_http(listener, app, stopped));
    Ok(Endpoint { addr, _stop: stop })
}

/// Registers a series of every metric, so that each is exported from the
/// start. Labelled metrics get the series of the normal path (and every
/// role); the others appear as they happen. Per-provider delivery series
/// are registered by [`register_providers`].
fn register() {
    use metrics::{counter, gauge, histogram};
    counter!(PUBLISHES, "result" => "forwarded", "reason" => "allowed").increment(0);
    counter!(SUBSCRIPTIONS, "result" => "accepted", "reason" => "allowed").increment(0);
    for role in ROLES {
        counter!(CONNECTIONS, "role" => role, "result" => "accepted").increment(0);
        gauge!(CONNECTED, "role" => role).increment(0.0);
    }
    counter!(PROTOCOL_ERRORS, "kind" => "malformed").increment(0);
    let _ = histogram!(DECISION_SECONDS, "stage" => "ingress");
    let _ = histogram!(DECISION_SECONDS, "stage" => "deliver");
    let _ = histogram!(LATENCY_SECONDS);
    counter!(VIEWS_SHARED).increment(0);
    gauge!(BROKER_CONNECTIONS).increment(0.0);
    counter!(HOLDS).increment(0);
    counter!(SLOW_CONSUMERS).increment(0);
    gauge!(ACT_VERSION).increment(0.0);
    counter!(LEDGER_APPENDS).increment(0);
    counter!(LEDGER_APPEND_FAILURES).increment(0);
    gauge!(LEDGER_HEALTHY).increment(0.0);
    counter!(LEDGER_PURGE_FAILURES).increment(0);
    let _ = histogram!(LEDGER_FSYNC_SECONDS);
    let _ = histogram!(LEDGER_BATCH_SIZE);
    gauge!(LEDGER_CLOCK_BEHIND).increment(0.0);
    gauge!(LEDGER_CLOCK_JUMPED).increment(0.0);
    for result in ["run", "busy"] {
        counter!(PASSWORD_CHECKS, "result" => result).increment(0);
    }
    counter!(NOTICES_DROPPED).increment(0);
    for listener in LISTENERS {
        counter!(ACCEPT_FAILURES, "listener" => listener).increment(0);
    }
}

/// Registers the delivery series of each provider known at start (a
/// provider registered later gets its series with its first session).
pub fn register_providers<'a>(providers: impl IntoIterator<Item = &'a str>) {
    for id in providers {
        let p = crate::act::Principal::Provider { id: id.to_string() };
        for (result, reason) in [("delivered", "consent"), ("masked", "consent")] {
            delivery_counter(&p, result, reason).increment(0);
        }
    }
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
        "Messages towards clients, by the recipient's role, provider id (providers only), \
         result (delivered, masked, dropped) and reason"
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
        "ACT decision time, by stage; one decision in 16 is timed"
    );
    describe_histogram!(
        LATENCY_SECONDS,
        Unit::Seconds,
        "Time from reading a message off the broker to writing it to the client"
    );
    describe_gauge!(ACT_VERSION, "Version of the ACT in force");
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
    describe_counter!(LEDGER_APPENDS, "Records appended to the share ledger");
    describe_gauge!(
        LEDGER_HEALTHY,
        "1 while the share ledger takes records; 0 after a write failed, until restart \
         (personal data is not delivered meanwhile)"
    );
    describe_counter!(
        LEDGER_PURGE_FAILURES,
        "Times deleting share records past retention failed; tried again a minute later \
         (records are kept longer meanwhile; deliveries go on)"
    );
    describe_counter!(
        LEDGER_APPEND_FAILURES,
        "Times the share ledger failed to append (deliveries stop until it recovers)"
    );
    describe_gauge!(
        LEDGER_CLOCK_JUMPED,
        Unit::Seconds,
        "How far the wall clock has run ahead of the time that passed since the share ledger \
         opened (0 when it has not): retention goes by the time that passed meanwhile, so a \
         clock stepped forward deletes nothing early; a restart takes the clock as it is"
    );
    describe_histogram!(
        LEDGER_FSYNC_SECONDS,
        Unit::Seconds,
        "Time of each share ledger fsync; every delivery of personal data waits for one"
    );
    describe_gauge!(
        LEDGER_CLOCK_BEHIND,
        Unit::Seconds,
        "How far the wall clock is behind the latest time the share ledger has written (0 when \
         it is not): records are stamped no earlier than that time meanwhile, so they are kept \
         past retention by as much"
    );
    describe_histogram!(
        LEDGER_BATCH_SIZE,
        Unit::Count,
        "Records made durable by one ledger fsync (group commit)"
    );
    describe_counter!(
        NOTICES_DROPPED,
        "consentry's own messages to the broker (dispute notices, clearing a removed \
         device's retained messages) dropped, each counted: none found room in the notice \
         client's queue for 30 s, as when the broker is unreachable"
    );
    describe_counter!(
        ACCEPT_FAILURES,
        "Connections a listener failed to accept, by listener (mqtt, mqtts, api, metrics): \
         most often the process is out of file descriptors"
    );
    describe_counter!(
        PASSWORD_CHECKS,
        "argon2 password hashes and checks (MQTT CONNECT and API), by result: run, or busy \
         (refused at once because too many were waiting)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_decision_on_a_thread_and_then_one_in_sixteen_are_timed() {
        // A thread of its own: the count is per thread.
        let timed = std::thread::spawn(|| {
            (0..3 * DECISION_SAMPLE_EVERY)
                .filter(|_| time_this_decision())
                .collect::<Vec<u32>>()
        })
        .join()
        .expect("the counting thread");
        assert_eq!(timed, vec![0, 16, 32]);
    }
}
