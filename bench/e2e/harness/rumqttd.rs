//! The bare-rumqttd baseline: the same rumqttd version as consentry embeds,
//! configured exactly as `src/broker.rs` configures it, in a process of its
//! own so its CPU time and peak RSS can be read apart from everything else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The values `consentry::config` defaults to and `config/consentry.toml`
/// ships with; `src/broker.rs` derives the rumqttd settings from them.
const MAX_PACKET_SIZE: usize = 262_144;
const MAX_CONNECTIONS: usize = 100_000;
const MAX_INFLIGHT: usize = 100;

/// Runs rumqttd on `127.0.0.1:v4` (MQTT 3.1.1) and `127.0.0.1:v5` until the
/// process is killed. `auth_file` holds `user:password` lines: rumqttd's own
/// plain-text authentication stands in for the per-client logins the other
/// two systems check.
pub fn serve(v4: u16, v5: u16, auth_file: &Path) -> ! {
    let text = std::fs::read_to_string(auth_file).expect("read the rumqttd auth file");
    let auth: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    // Copied from src/broker.rs `start_embedded`; keep the two in step.
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PACKET_SIZE + 1024,
        max_inflight_count: MAX_INFLIGHT,
        auth: Some(auth),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, port: u16| ServerSettings {
        name: name.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server("v4", v4))])),
        v5: Some(HashMap::from([("1".to_string(), server("v5", v5))])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    match broker.start() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("rumqttd stopped: {e}");
            std::process::exit(1)
        }
    }
}
