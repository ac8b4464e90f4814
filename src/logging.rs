//! The process's log: stderr, filtered by `CONSENTRY_LOG`, with the embedded
//! rumqttd's noise taken out.

use std::fmt::Debug;

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::Layer;

/// What `CONSENTRY_LOG` defaults to.
pub const DEFAULT_FILTER: &str = "info";

/// The MQTT crates consentry embeds: their own lines name topics (rumqttd's
/// router logs every subscription's filter at info, rumqttc each publish
/// at debug), and consentry's logs carry no topics or user ids. They stay
/// at warn unless the filter names them.
const QUIET: [&str; 2] = ["rumqttd", "rumqttc"];

/// `spec`, or the default, with the embedded MQTT crates at warn unless it
/// names them itself.
fn filter_spec(spec: Option<&str>) -> String {
    let mut spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_FILTER)
        .to_string();
    for target in QUIET {
        // Only a directive for the crate itself counts: one that quiets a
        // module of it (`rumqttd::server=warn`) does not ask for the rest.
        let named = spec
            .split(',')
            .any(|d| d.trim().split(['=', '[']).next() == Some(target));
        if !named {
            spec.push_str(&format!(",{target}=warn"));
        }
    }
    spec
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let given = std::env::var("CONSENTRY_LOG").ok();
    let env = tracing_subscriber::EnvFilter::try_new(filter_spec(given.as_deref()))
        .unwrap_or_else(|_| filter_spec(None).into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(log_layer(env, std::io::stderr, ansi))
        .init();
}

/// The log's one layer: formatted lines to `writer`, filtered by `env`, with
/// the broker's noise out.
fn log_layer<S, W>(env: tracing_subscriber::EnvFilter, writer: W, ansi: bool) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_filter(env)
        .with_filter(BrokerNoise)
}

/// Drops what the embedded rumqttd 0.20 logs that is not news.
///
/// - Its spans: it opens an ERROR-level span per publish that Debug-formats
///   the topic byte by byte; a level filter cannot tell it from an error
///   event, and it cost the embedded router a quarter of its time.
/// - Two ERROR events that follow a client's DISCONNECT, which consentry's
///   sessions always send at their end, so every clean session end logged
///   errors: the router sees the DISCONNECT and then the closed socket as
///   two disconnections (its own comment says so) and reports the second
///   as "no-connection id N is already gone"; and the connection's task,
///   whose link the router dropped, reports "router-drop". When the router
///   drops a link for a fault it logs the fault itself (all but an unknown
///   PUBREL), and the session whose broker connection ended logs a warning.
pub struct BrokerNoise;

impl<S> Filter<S> for BrokerNoise {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        !is_broker_span(meta) && !names_a_filter(meta)
    }

    /// Decided once per call site, so that a broker span is never even
    /// created. Said only in `enabled`, the registry still made each one
    /// (the `EnvFilter` inside this filter had enabled it) and its router
    /// paid for that on every publish.
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_broker_span(meta) || names_a_filter(meta) {
            Interest::never()
        } else {
            Interest::sometimes()
        }
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        let after_disconnect: fn(&str) -> bool = match meta.target() {
            "rumqttd::router::routing" => {
                |m| m.starts_with("no-connection id ") && m.ends_with(" is already gone")
            }
            "rumqttd::server::broker" => |m| m == "router-drop",
            _ => return true,
        };
        if *meta.level() != Level::ERROR {
            return true;
        }
        let mut message = Message(None);
        event.record(&mut message);
        !message.0.is_some_and(|m| after_disconnect(&m))
    }
}

fn is_broker_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("rumqttd")
}

/// rumqttd's router warns, at WARN, when a subscriber's read cursor jumps
/// past messages evicted from its ring (an offline persistent session the
/// broker queued more for than its ring holds, say), and words it "Read
/// cursor start jumped from … on {filter}": the subscription's filter, which
/// names the user and device (`pii/alice/+/location`). consentry's logs carry
/// no topics or user ids, so the event is dropped. The same jump is still
/// logged without the filter by `rumqttd::segments` ("given index … less
/// than head …, jumping to head").
fn names_a_filter(meta: &Metadata<'_>) -> bool {
    meta.is_event()
        && meta.target() == "rumqttd::router::routing"
        && meta.fields().field("start_cursor").is_some()
}

struct Message(Option<String>);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_mqtt_crates_stay_at_warn_unless_named() {
        assert_eq!(filter_spec(None), "info,rumqttd=warn,rumqttc=warn");
        // README's own example, and a bare level, leave them quiet.
        assert_eq!(
            filter_spec(Some("info,consentry=debug")),
            "info,consentry=debug,rumqttd=warn,rumqttc=warn"
        );
        assert_eq!(
            filter_spec(Some("debug")),
            "debug,rumqttd=warn,rumqttc=warn"
        );
        // Naming one is asking for its lines.
        assert_eq!(
            filter_spec(Some("info,rumqttd=debug")),
            "info,rumqttd=debug,rumqttc=warn"
        );
        assert_eq!(filter_spec(Some("  ")), filter_spec(None));
        // Quieting one module of it is not asking for the rest.
        assert_eq!(
            filter_spec(Some("debug,rumqttd::server=warn")),
            "debug,rumqttd::server=warn,rumqttd=warn,rumqttc=warn"
        );
        for spec in [None, Some("debug"), Some("info,consentry=debug")] {
            tracing_subscriber::EnvFilter::try_new(filter_spec(spec)).expect("parses");
        }
    }

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn broker_noise_is_dropped_and_nothing_else() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry().with(log_layer(
            tracing_subscriber::EnvFilter::new("trace"),
            move || writer.clone(),
            false,
        ));
        tracing::subscriber::with_default(subscriber, || {
            // As rumqttd's router words them.
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
            let _span = tracing::error_span!(target: "rumqttd::server::broker", "incoming_publish")
                .entered();
            tracing::error!(target: "rumqttd::router::routing", "Failed to append to commitlog");
            tracing::error!(target: "rumqttd::server::broker", error = "Recv(Disconnected)", "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = "Io", "disconnected");
            tracing::warn!(target: "rumqttd::router::routing", "no-connection id 8 is already gone");
            tracing::error!(target: "consentry::session", "no-connection id 9 is already gone");
        });
        let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains("id 7"), "{log}");
        assert!(!log.contains("incoming_publish"), "{log}");
        assert!(!log.contains("router-drop"), "{log}");
        assert!(log.contains("disconnected"), "{log}");
        assert!(log.contains("Failed to append to commitlog"), "{log}");
        assert!(log.contains("id 8 is already gone"), "{log}");
        assert!(log.contains("id 9 is already gone"), "{log}");
    }

    #[test]
    fn the_broker_never_logs_a_subscription_filter() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry().with(log_layer(
            tracing_subscriber::EnvFilter::new(filter_spec(None)),
            move || writer.clone(),
            false,
        ));
        tracing::subscriber::with_default(subscriber, || {
            // As rumqttd 0.20's router and commitlog word a cursor jump
            // (router/routing.rs, segments/mod.rs).
            tracing::warn!(target: "rumqttd::segments", "given index {} less than head {}, jumping to head", 0, 101072);
            let error =
                "Read cursor start jumped from (0, 0) to (8, 101072) on pii/alice/+/location";
            tracing::warn!(
                target: "rumqttd::router::routing",
                request_cursor = ?(0, 0),
                start_cursor = ?(8, 101072),
                error
            );
        });
        let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains("alice"), "{log}");
        assert!(!log.contains("pii/"), "{log}");
        assert!(log.contains("jumping to head"), "{log}");
    }

    #[test]
    fn broker_spans_are_never_created() {
        // rumqttd's router opens a span per publish. Filtered out of the
        // log is not enough: the registry would still allocate, enter, exit
        // and close each one.
        let subscriber = tracing_subscriber::registry().with(log_layer(
            tracing_subscriber::EnvFilter::new(DEFAULT_FILTER),
            std::io::sink,
            false,
        ));
        tracing::subscriber::with_default(subscriber, || {
            let broker = tracing::error_span!(target: "rumqttd::router::routing", "publish");
            assert!(broker.is_disabled());
            let ours = tracing::info_span!(target: "consentry::session", "session");
            assert!(!ours.is_disabled());
        });
    }
}

/// Lets one line of a kind through per period, counting the rest, for
/// events that come in floods (accept failures out of file descriptors, a
/// flood of wrong passwords): each is still counted in a metric, and the log
/// says how many lines it left out.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    left_out: u64,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Self {
        Throttle {
            every,
            last: None,
            left_out: 0,
        }
    }

    /// `Some(lines left out since the last one)` when a line may be logged
    /// at `now`.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::Throttle;
    use std::time::{Duration, Instant};

    #[test]
    fn one_line_a_period_and_the_count_of_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(t.allow(start), Some(0));
        for s in 1..60 {
            assert_eq!(t.allow(start + Duration::from_secs(s)), None);
        }
        assert_eq!(t.allow(start + Duration::from_secs(60)), Some(59));
        assert_eq!(t.allow(start + Duration::from_secs(61)), None);
    }
}
