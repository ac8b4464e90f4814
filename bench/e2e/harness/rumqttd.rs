//! The bare-rumqttd baseline: the same rumqttd version as consentry embeds,
//! configured exactly as `src/broker.rs` configures it, in a process of its
//! own so its CPU time and peak RSS can be read apart from everything else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

/// Runs rumqttd on `127.0.0.1:v4` (MQTT 3.1.1) and `127.0.0.1:v5` until the
/// process is killed, configured by consentry's own `broker::rumqttd_config`
/// from the shipped defaults. `auth_file` holds `user:password` lines:
/// rumqttd's own plain-text authentication stands in for the per-client
/// logins the other two systems check.
pub fn serve(v4: u16, v5: u16, auth_file: &Path) -> ! {
    let text = std::fs::read_to_string(auth_file).expect("read the rumqttd auth file");
    let auth: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    let defaults: consentry::config::Config =
        toml::from_str(include_str!("../../../config/consentry.toml"))
            .expect("shipped config parses");
    let config = consentry::broker::rumqttd_config(
        &defaults,
        SocketAddr::from(([127, 0, 0, 1], v4)),
        SocketAddr::from(([127, 0, 0, 1], v5)),
        auth,
    );
    let mut broker = rumqttd::Broker::new(config);
    match broker.start() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("rumqttd stopped: {e}");
            std::process::exit(1)
        }
    }
}
