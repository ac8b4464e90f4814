//! The open-file limit: raised at start so 20k idle devices fit, and the
//! number of idle devices that fit when it cannot be raised.
//!
//! Children spawned afterwards — the three systems under test — inherit the
//! harness's soft and hard limit.

use serde::Serialize;

use super::systems::SystemKind;

/// Descriptors kept aside for everything but device connections (listeners,
/// logs, the ledger's files, pipes, the providers, the metrics endpoint).
/// consentry holds 32 once started (12 of them sockets) and the brokers
/// fewer; the rest is margin for what opens during a run.
const RESERVE: u64 = 300;

/// What the harness found and did about `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Serialize)]
pub struct FdLimit {
    pub soft_before: u64,
    pub hard_before: u64,
    pub soft: u64,
    pub hard: u64,
    /// `/proc/sys/fs/nr_open`: the most any process may be given.
    pub nr_open: u64,
    /// Local ports for connect() (`ip_local_port_range`), one per device
    /// connection to the same listener.
    pub local_ports: u64,
    /// The hard limit could be raised to `nr_open`.
    pub raised: bool,
    pub note: String,
}

fn read_nofile() -> Option<(u64, u64)> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok()
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn local_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
            let (lo, hi) = (it.next()??, it.next()??);
            Some(hi.saturating_sub(lo) + 1)
        })
        .unwrap_or(28_232)
}

/// Sets this process's open-file limit; the error text when it failed.
fn set_nofile(soft: u64, hard: u64) -> Result<(), String> {
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).map_err(|e| e.to_string())
}

/// Raises this process's soft and hard open-file limit to `nr_open`; when
/// the hard limit cannot be raised (no CAP_SYS_RESOURCE, even as root in a
/// container), at least the soft limit to the hard one.
pub fn raise() -> FdLimit {
    let (soft_before, hard_before) = read_nofile().unwrap_or((1024, 1024));
    let nr_open = read_u64("/proc/sys/fs/nr_open").unwrap_or(hard_before);
    let mut note = String::new();
    let mut raised = hard_before >= nr_open;
    if !raised {
        match set_nofile(nr_open, nr_open) {
            Ok(()) => raised = true,
            Err(e) => {
                note = format!(
                    "could not raise the hard open-file limit {hard_before} to nr_open {nr_open} ({e}); \
                     running within {hard_before}"
                );
            }
        }
    }
    if let Some((soft, hard)) = read_nofile() {
        if soft < hard {
            if let Err(e) = set_nofile(hard, hard) {
                note.push_str(&format!(
                    "{}could not raise the soft limit {soft} to {hard} ({e})",
                    if note.is_empty() { "" } else { "; " }
                ));
            }
        }
    }
    let (soft, hard) = read_nofile().unwrap_or((soft_before, hard_before));
    FdLimit {
        soft_before,
        hard_before,
        soft,
        hard,
        nr_open,
        local_ports: local_ports(),
        raised: raised && hard >= nr_open,
        note,
    }
}

/// Descriptors one device costs a system: while it is connected and idle,
/// and once it has published (the harness itself: one client socket).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FdCost {
    pub idle: f64,
    pub active: f64,
    /// Measured (`probe_fd_costs` in mod.rs), or assumed.
    pub measured: bool,
}

/// The cost assumed when it is not measured: consentry with its embedded
/// broker at its worst, three per device (the client's socket, its upstream
/// connection and rumqttd's end of it); the brokers one.
pub fn assumed_cost(kind: SystemKind) -> FdCost {
    let n = match kind {
        SystemKind::Consentry => 3.0,
        SystemKind::Rumqttd | SystemKind::Mosquitto => 1.0,
    };
    FdCost {
        idle: n,
        active: n,
        measured: false,
    }
}

/// Whether `n` idle devices surely fit, whatever a system's cost (up to the
/// assumed worst): then nothing needs measuring.
pub fn surely_fits(limit: &FdLimit, n: u64) -> bool {
    n.saturating_mul(3) <= limit.soft.min(limit.hard).saturating_sub(RESERVE)
        && n <= limit.local_ports.saturating_sub(RESERVE)
}

/// The most idle devices that every system (at its `costs`) and the harness
/// (one socket per device) can hold under `limit`, when at most `active` of
/// them publish during the trickle; rounded down to a hundred.
pub fn idle_fit(limit: &FdLimit, costs: &[(SystemKind, FdCost)], active: u64) -> u64 {
    let budget = limit.soft.min(limit.hard).saturating_sub(RESERVE) as f64;
    // Each device needs a local port towards one listener (consentry's
    // upstream connections go to another listener: ports are not shared).
    let mut n = budget.min(limit.local_ports.saturating_sub(RESERVE) as f64);
    for (_, c) in costs {
        let (idle, extra) = (c.idle.max(0.5), (c.active - c.idle).max(0.0));
        // n·idle + min(n, active)·extra ≤ budget
        let fit = if (active as f64) * c.active.max(idle) <= budget {
            (budget - active as f64 * extra) / idle
        } else {
            budget / c.active.max(idle)
        };
        n = n.min(fit.max(0.0));
    }
    let n = n as u64;
    if n >= 100 {
        n / 100 * 100
    } else {
        n
    }
}
