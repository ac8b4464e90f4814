//! End-to-end benchmark of consentry against bare rumqttd and Mosquitto.
//!
//! Shared by the `e2e` bench binary (`bench/e2e/main.rs`) and the smoke
//! test (`tests/bench_smoke.rs`), which includes this module by path: the
//! smoke test runs the very code a full run does, on a tiny load.

pub mod limits;
pub mod load;
pub mod report;
pub mod rumqttd;
pub mod systems;
pub mod tcp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde::Serialize;

use load::{Fleet, Pace, PacedReceiver, Receivers};
use systems::{
    cpu_by_thread, cpu_seconds, memory_kib, open_fds, reset_peak, Credentials, Fsyncs,
    RumqttdCommand, System, SystemKind, KINDS,
};

/// Whether the load's clients set TCP_NODELAY in fixed-rate runs. With it
/// off (rumqttc's default) a device's small publishes wait in its kernel for
/// the broker's ACK (Nagle), so how soon the broker's kernel ACKs, which
/// follows how promptly it reads, decides how many messages a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientNodelay {
    Off,
    On,
    /// Off everywhere, and allow_all a second time with it on.
    Both,
}

impl ClientNodelay {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "--client-nodelay takes off, on or both, not {other:?}"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Both => "both",
        }
    }

    fn variants(self, scenario: Scenario) -> &'static [bool] {
        match self {
            Self::Off => &[false],
            Self::On => &[true],
            Self::Both if scenario == Scenario::AllowAll => &[false, true],
            Self::Both => &[false],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Every publish is collected and shared as it is.
    AllowAll,
    /// Every other publish is of a kind the user does not let be collected.
    RefusedHalf,
    /// Every delivery is masked (one numeric field generalized).
    Masked,
    /// Every publish goes to three providers.
    Fanout3,
    /// QoS 1 publishers faster than a paced subscriber: memory and loss of
    /// acknowledged messages.
    Overload,
    /// Many connected devices, few messages.
    Idle,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::AllowAll,
        Scenario::RefusedHalf,
        Scenario::Masked,
        Scenario::Fanout3,
        Scenario::Overload,
        Scenario::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::AllowAll => "allow_all",
            Scenario::RefusedHalf => "refused_half",
            Scenario::Masked => "masked",
            Scenario::Fanout3 => "fanout3",
            Scenario::Overload => "overload",
            Scenario::Idle => "idle",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    fn providers(self) -> usize {
        if self == Scenario::Fanout3 {
            3
        } else {
            1
        }
    }

    /// The kind the providers subscribe to (index into `KINDS`). The same
    /// filter on every system, so bare rumqttd also delivers only what
    /// consentry would let through.
    fn delivered_kind(self) -> usize {
        if self == Scenario::Masked {
            1
        } else {
            0
        }
    }

    fn kind_of(self) -> fn(usize, u64) -> usize {
        match self {
            Scenario::Masked => |_, _| 1,
            // `location` is never collected: refused at ingress.
            Scenario::RefusedHalf => |i, k| if (i as u64 + k) & 1 == 0 { 0 } else { 2 },
            _ => |_, _| 0,
        }
    }

    /// Deliveries one publish makes, on average, when all goes well.
    fn deliveries_per_publish(self) -> f64 {
        match self {
            Scenario::RefusedHalf => 0.5,
            Scenario::Fanout3 => 3.0,
            _ => 1.0,
        }
    }
}

pub struct Options {
    pub scenarios: Vec<Scenario>,
    pub qos: Vec<u8>,
    pub systems: Vec<SystemKind>,
    /// Publishing time of one run.
    pub duration: Duration,
    /// Maximum-rate runs per system, scenario and QoS.
    pub repeats: usize,
    /// Rounds of every fixed-rate run (each round runs every system back to
    /// back); the table then shows medians, and added p99 round by round.
    pub rate_repeats: usize,
    /// Fixed offered rates (messages/s published, over all devices).
    pub rates: Vec<f64>,
    /// Also a fixed-rate run at half of consentry's measured maximum.
    pub half_max: bool,
    /// TCP_NODELAY on the load's clients in fixed-rate runs.
    pub client_nodelay: ClientNodelay,
    pub devices: usize,
    /// Idle devices wanted; fewer when the open-file limit does not allow
    /// them (see `limits`).
    pub idle_devices: usize,
    pub trickle_rate: f64,
    /// Overload: publishing time, the subscriber's pace during it, the bound
    /// on messages (over all devices), and the drain after it.
    pub overload_duration: Duration,
    pub consume_rate: f64,
    pub overload_max_messages: u64,
    pub overload_quiet: Duration,
    pub overload_drain_limit: Duration,
    /// After publishing stops, deliveries are awaited this long at most;
    /// what is still queued then counts as not delivered.
    pub drain_limit: Duration,
    /// Bound on the messages of one maximum-rate run, over all devices.
    pub max_messages: u64,
    /// How long drain waits after the last delivery before it gives up.
    pub quiet: Duration,
    pub work_dir: PathBuf,
    pub out_dir: PathBuf,
    pub consentry_bin: PathBuf,
    pub mosquitto_bin: Option<PathBuf>,
    pub rumqttd_cmd: Box<RumqttdCommand>,
    pub command: String,
    pub quick: bool,
}

impl Options {
    /// The full run, at this machine's scale (see bench/README.md).
    pub fn full(consentry_bin: PathBuf, rumqttd_cmd: Box<RumqttdCommand>) -> Options {
        Options {
            scenarios: Scenario::ALL.to_vec(),
            qos: vec![0, 1],
            systems: vec![
                SystemKind::Rumqttd,
                SystemKind::Consentry,
                SystemKind::Mosquitto,
            ],
            duration: Duration::from_secs(3),
            repeats: 3,
            rate_repeats: 1,
            rates: vec![1_000.0, 10_000.0],
            half_max: true,
            client_nodelay: ClientNodelay::Both,
            devices: 100,
            idle_devices: 20_000,
            trickle_rate: 200.0,
            overload_duration: Duration::from_secs(10),
            consume_rate: 5_000.0,
            overload_max_messages: 5_000_000,
            overload_quiet: Duration::from_secs(3),
            overload_drain_limit: Duration::from_secs(60),
            max_messages: 2_000_000,
            // Long enough for what consentry's backpressure holds in the
            // publishers' socket buffers at the end of a flood (~4 s of
            // drain measured): cut shorter, it would count as not delivered
            // what was only late.
            drain_limit: Duration::from_secs(10),
            quiet: Duration::from_secs(1),
            work_dir: std::env::temp_dir().join(format!("consentry-e2e-{}", std::process::id())),
            out_dir: PathBuf::from("bench/results"),
            consentry_bin,
            mosquitto_bin: find_mosquitto(),
            rumqttd_cmd,
            command: String::new(),
            quick: false,
        }
    }

    /// Seconds, tiny load: keeps the harness from rotting.
    pub fn make_quick(&mut self) {
        self.quick = true;
        self.scenarios = vec![
            Scenario::AllowAll,
            Scenario::Masked,
            Scenario::Overload,
            Scenario::Idle,
        ];
        self.client_nodelay = ClientNodelay::Off;
        self.max_messages = 400;
        self.drain_limit = Duration::from_secs(2);
        self.duration = Duration::from_millis(400);
        self.repeats = 1;
        // Two rounds, so the round-by-round bookkeeping runs too.
        self.rate_repeats = 2;
        self.rates = vec![500.0];
        self.half_max = false;
        self.devices = 4;
        self.idle_devices = 20;
        self.trickle_rate = 50.0;
        self.quiet = Duration::from_millis(500);
        self.overload_duration = Duration::from_millis(500);
        self.consume_rate = 500.0;
        self.overload_max_messages = 2_000;
        self.overload_quiet = Duration::from_millis(500);
        self.overload_drain_limit = Duration::from_secs(5);
    }
}

pub fn find_mosquitto() -> Option<PathBuf> {
    let candidates = [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ];
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: u32,
    pub p99_us: u32,
    pub p999_us: u32,
    pub max_us: u32,
}

impl Latency {
    /// Exact percentiles: the samples are kept and sorted (a few million
    /// u32 at most), so no histogram and no dependency are needed.
    fn of(mut v: Vec<u32>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Latency {
            samples: v.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: *v.last().unwrap(),
        }
    }
}

/// One run of one load against one system.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub scenario: Scenario,
    pub system: SystemKind,
    pub qos: u8,
    /// `max` or `rate`.
    pub mode: &'static str,
    pub offered_per_s: Option<f64>,
    /// `1k`, `10k`, `half_max`, `trickle` or `max`.
    pub label: String,
    pub repeat: usize,
    pub client_nodelay: bool,
    pub devices: usize,
    pub providers: usize,
    pub duration_s: f64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub published_per_s: f64,
    pub delivered_per_s: f64,
    pub not_delivered_share: f64,
    pub latency: Latency,
    /// Sends the generator made more than 5 ms late.
    pub late_sends: u64,
    pub cpu_s: f64,
    pub cpu_share: f64,
    /// Throughput runs: the system's CPU seconds by thread name, for the
    /// threads alive at the end of the run.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cpu_by_thread_s: BTreeMap<String, f64>,
    pub harness_cpu_s: f64,
    pub peak_rss_kib: u64,
    pub rss_before_kib: u64,
    /// Idle scenario: seconds to connect every device, and RSS once connected.
    pub connect_s: Option<f64>,
    pub rss_connected_kib: Option<u64>,
    /// Idle scenario: the system's open descriptors before and after
    /// connecting the fleet (`/proc/PID/fd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fds_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fds_connected: Option<u64>,
    /// Overload scenario only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overload: Option<OverloadResult>,
    /// consentry only: its ledger fsyncs during the run, slow ones counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_fsyncs: Option<Fsyncs>,
    /// Throughput runs: TCP segments over loopback during the run, both
    /// ways, every socket (see [`tcp`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_segments: Option<u64>,
    pub errors: Vec<String>,
}

/// What an overload run measured. `lost` is the number the target is about:
/// publishes the system acknowledged (PUBACK) that never reached the
/// subscriber, not even during the drain.
#[derive(Debug, Clone, Serialize, Default)]
pub struct OverloadResult {
    /// The subscriber's pace while the devices publish (publishes/s).
    pub consume_rate: f64,
    pub publish_s: f64,
    /// From the end of the publishing time (when the subscriber goes to full
    /// speed; a device blocked in publish() may still finish its last one
    /// after it) to the end of the drain.
    pub drain_s: f64,
    /// `complete` (every acknowledged publish arrived), `quiet` (nothing new
    /// for `overload_quiet`) or `limit` (`overload_drain_limit` passed).
    pub drain_end: &'static str,
    /// Publishes rumqttc accepted, and of them written to the network.
    pub sent: u64,
    pub went_out: u64,
    pub acked: u64,
    /// Distinct publishes received, in all and while the devices published.
    pub received: u64,
    pub received_during_publish: u64,
    pub lost: u64,
    pub lost_share: f64,
    pub duplicates: u64,
    /// Received although their PUBACK never came (not loss).
    pub received_unacked: u64,
    /// PUBACKs without a matching publish, payloads without a `seq`.
    pub unmatched_acks: u64,
    pub foreign: u64,
    /// Acknowledged publishes per second of publishing (till the last PUBACK).
    pub acked_per_s: f64,
    /// Distinct publishes received per second, till the last one arrived.
    pub delivered_per_s: f64,
    /// Largest RSS sample, the one at the end of publishing and at the end.
    pub rss_max_sampled_kib: u64,
    pub rss_end_of_publish_kib: u64,
    pub rss_end_kib: u64,
    /// `(seconds since publishing started, VmRSS KiB)` every `RSS_EVERY`.
    pub rss_samples: Vec<(f64, u64)>,
}

/// How often an overload run samples the system's RSS.
const RSS_EVERY: Duration = Duration::from_millis(250);

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn rate_label(r: f64) -> String {
    if r >= 1000.0 && (r % 1000.0) == 0.0 {
        format!("{}k", r as u64 / 1000)
    } else {
        format!("{}", r as u64)
    }
}

struct RunSpec {
    scenario: Scenario,
    qos: u8,
    pace: Pace,
    label: String,
    repeat: usize,
    nodelay: bool,
}

/// Everything the run produced.
#[derive(Debug, Serialize)]
pub struct Results {
    pub date: String,
    pub command: String,
    pub quick: bool,
    pub machine: report::Machine,
    /// The open-file limit the harness and its children ran with.
    pub fd_limit: limits::FdLimit,
    pub settings: serde_json::Value,
    pub runs: Vec<RunResult>,
    pub summary: Vec<report::Summary>,
    pub wall_s: f64,
}

/// Runs every scenario on every system, back to back, and writes
/// `latest.json`, `latest.svg` and `latest.md` to `out_dir`.
pub fn run_all(opts: &Options) -> anyhow::Result<Results> {
    let wall = Instant::now();
    // Before any child starts: they inherit the limit.
    let fd_limit = limits::raise();
    eprintln!(
        "open files: soft/hard {}/{} -> {}/{} (nr_open {}){}",
        fd_limit.soft_before,
        fd_limit.hard_before,
        fd_limit.soft,
        fd_limit.hard,
        fd_limit.nr_open,
        if fd_limit.note.is_empty() {
            String::new()
        } else {
            format!(": {}", fd_limit.note)
        }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let systems: Vec<SystemKind> = opts
        .systems
        .iter()
        .copied()
        .filter(|s| *s != SystemKind::Mosquitto || opts.mosquitto_bin.is_some())
        .collect();
    let idle = opts.scenarios.contains(&Scenario::Idle);
    let mut fd_costs: Vec<(SystemKind, limits::FdCost)> = systems
        .iter()
        .map(|&k| (k, limits::assumed_cost(k)))
        .collect();
    let mut idle_devices = opts.idle_devices;
    let mut idle_note = String::new();
    if idle && !limits::surely_fits(&fd_limit, opts.idle_devices as u64) {
        // Tight: measure what a device costs each system as it is built now.
        for (kind, cost) in &mut fd_costs {
            match probe_fd_costs(opts, &rt, *kind) {
                Ok(c) => *cost = c,
                Err(e) => eprintln!(
                    "   {}: descriptors per device not measured ({e}); assuming {}",
                    kind.name(),
                    cost.idle
                ),
            }
        }
        // Devices the trickle of one QoS round reaches (the same in both).
        let active = (opts.trickle_rate * opts.duration.as_secs_f64()).ceil() as u64;
        let fit = limits::idle_fit(&fd_limit, &fd_costs, active) as usize;
        if fit < opts.idle_devices {
            idle_devices = fit;
            idle_note = format!(
                "idle: {} devices wanted, {fit} fit the open-file limit {}{} \
                 (descriptors per device, connected / after publishing: harness 1, {})",
                opts.idle_devices,
                fd_limit.soft,
                if fd_limit.raised {
                    ""
                } else {
                    ", which could not be raised"
                },
                fd_costs
                    .iter()
                    .map(|(k, c)| format!(
                        "{} {:.1} / {:.1}{}",
                        k.name(),
                        c.idle,
                        c.active,
                        if c.measured { "" } else { " assumed" }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            eprintln!("{idle_note}");
        }
    }
    let mut runs = Vec::new();
    for &scenario in &opts.scenarios {
        eprintln!("== {}", scenario.name());
        // The directory holds the devices this scenario connects: a large
        // idle fleet's users do not weigh on the other scenarios' memory.
        let users = if scenario == Scenario::Idle {
            opts.devices.max(idle_devices)
        } else {
            opts.devices
        };
        let creds = Credentials::write(&opts.work_dir, users)?;
        // Fresh processes per scenario: no scenario inherits another's heap.
        let mut running = Vec::new();
        for &kind in &systems {
            running.push(System::start(
                kind,
                &creds,
                &opts.consentry_bin,
                opts.mosquitto_bin.as_deref(),
                opts.rumqttd_cmd.as_ref(),
            )?);
        }
        if scenario == Scenario::Idle {
            for sys in &mut running {
                runs.extend(rt.block_on(run_idle(opts, sys, idle_devices)));
            }
        } else if scenario == Scenario::Overload {
            for sys in &mut running {
                runs.push(rt.block_on(run_overload(opts, sys)));
            }
        } else {
            for &qos in &opts.qos {
                let mut these = Vec::new();
                for repeat in 0..opts.repeats {
                    // Interleaved, so a noisy moment hits every system.
                    for sys in &mut running {
                        let spec = RunSpec {
                            scenario,
                            qos,
                            pace: Pace::Max,
                            label: "max".into(),
                            repeat,
                            nodelay: false,
                        };
                        these.push(rt.block_on(run_throughput(opts, sys, &spec)));
                    }
                }
                let mut paces: Vec<(String, f64)> =
                    opts.rates.iter().map(|&r| (rate_label(r), r)).collect();
                if opts.half_max {
                    let mut c: Vec<f64> = these
                        .iter()
                        .filter(|r: &&RunResult| r.system == SystemKind::Consentry)
                        .map(|r| r.delivered_per_s)
                        .collect();
                    if !c.is_empty() {
                        let m = report::median(&mut c);
                        let rate = (0.5 * m / scenario.deliveries_per_publish()).round();
                        if rate >= 1.0 {
                            paces.push(("half_max".into(), rate));
                        }
                    }
                }
                let variants = opts.client_nodelay.variants(scenario);
                for (label, rate) in paces {
                    for &nodelay in variants {
                        for repeat in 0..opts.rate_repeats.max(1) {
                            for sys in &mut running {
                                let spec = RunSpec {
                                    scenario,
                                    qos,
                                    pace: Pace::Rate(rate),
                                    label: label.clone(),
                                    repeat,
                                    nodelay,
                                };
                                these.push(rt.block_on(run_throughput(opts, sys, &spec)));
                            }
                        }
                    }
                }
                runs.extend(these);
            }
        }
        for sys in &mut running {
            if !sys.alive() {
                eprintln!(
                    "   {} died during the scenario; see {}",
                    sys.kind.name(),
                    sys.log.display()
                );
            }
            sys.stop();
        }
    }
    drop(rt);
    let summary = report::summarize(&runs);
    let results = Results {
        date: report::now_utc(),
        command: opts.command.clone(),
        quick: opts.quick,
        machine: report::Machine::read(),
        fd_limit,
        settings: serde_json::json!({
            "duration_s": opts.duration.as_secs_f64(),
            "repeats": opts.repeats,
            "rate_repeats": opts.rate_repeats.max(1),
            "rates": opts.rates,
            "half_max": opts.half_max,
            "client_nodelay": opts.client_nodelay.name(),
            "devices": opts.devices,
            "idle_devices": idle_devices,
            "idle_devices_wanted": opts.idle_devices,
            "idle_note": idle_note,
            "fds_per_device": fd_costs
                .iter()
                .map(|(k, c)| (k.name(), c))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "trickle_rate": opts.trickle_rate,
            "overload_duration_s": opts.overload_duration.as_secs_f64(),
            "overload_consume_rate": opts.consume_rate,
            "overload_max_messages": opts.overload_max_messages,
            "overload_quiet_s": opts.overload_quiet.as_secs_f64(),
            "overload_drain_limit_s": opts.overload_drain_limit.as_secs_f64(),
            "drain_limit_s": opts.drain_limit.as_secs_f64(),
            "max_messages_per_run": opts.max_messages,
            "payload_bytes": load::PAYLOAD_BYTES,
            "mqtt": "3.1.1 (rumqttc 0.25.1)",
            "systems": systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
        }),
        runs,
        summary,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    std::fs::create_dir_all(&opts.out_dir)?;
    report::write(&results, &opts.out_dir)?;
    let _ = std::fs::remove_dir_all(&opts.work_dir);
    Ok(results)
}

fn blank(spec: &RunSpec, sys: &System, devices: usize, providers: usize) -> RunResult {
    RunResult {
        scenario: spec.scenario,
        system: sys.kind,
        qos: spec.qos,
        mode: match (spec.scenario, spec.pace) {
            (Scenario::Overload, _) => "overload",
            (_, Pace::Max) => "max",
            (_, Pace::Rate(_)) => "rate",
        },
        offered_per_s: match spec.pace {
            Pace::Max => None,
            Pace::Rate(r) => Some(r),
        },
        label: spec.label.clone(),
        repeat: spec.repeat,
        client_nodelay: spec.nodelay,
        devices,
        providers,
        duration_s: 0.0,
        published: 0,
        expected: 0,
        delivered: 0,
        published_per_s: 0.0,
        delivered_per_s: 0.0,
        not_delivered_share: 1.0,
        latency: Latency::default(),
        late_sends: 0,
        cpu_s: 0.0,
        cpu_share: 0.0,
        cpu_by_thread_s: BTreeMap::new(),
        harness_cpu_s: 0.0,
        peak_rss_kib: 0,
        rss_before_kib: 0,
        connect_s: None,
        rss_connected_kib: None,
        fds_before: None,
        fds_connected: None,
        overload: None,
        ledger_fsyncs: None,
        tcp_segments: None,
        errors: Vec::new(),
    }
}

/// Waits until the previous run's traffic is gone. A system with
/// backpressure holds a flood in its publishers' socket buffers, and those
/// messages were sent: it forwards them after the publishers disconnect,
/// and the next run's subscribers would count them as theirs.
async fn settle(sys: &System, filter: &str) {
    let Ok(probe) = Receivers::connect(sys.addr, sys.kind, 1, filter, QoS::AtMostOnce, true).await
    else {
        return;
    };
    let started = Instant::now();
    probe
        .drain(
            u64::MAX,
            Duration::from_millis(500),
            Duration::from_secs(60),
        )
        .await;
    let left = probe.delivered.load(std::sync::atomic::Ordering::Relaxed);
    probe.finish().await;
    if left > 0 {
        eprintln!(
            "   {:<9} settled: {left} messages of the previous run still arrived, for {:.1} s",
            sys.kind.name(),
            started.elapsed().as_secs_f64()
        );
    }
}

async fn run_throughput(opts: &Options, sys: &mut System, spec: &RunSpec) -> RunResult {
    let scenario = spec.scenario;
    let mut r = blank(spec, sys, opts.devices, scenario.providers());
    let qos = qos_of(spec.qos);
    let filter = format!("pii/+/+/{}", KINDS[scenario.delivered_kind()]);
    settle(sys, &filter).await;
    let receivers = match Receivers::connect(
        sys.addr,
        sys.kind,
        scenario.providers(),
        &filter,
        qos,
        spec.nodelay,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            r.errors.push(format!("providers: {e}"));
            return r;
        }
    };
    let fleet = match Fleet::connect(sys.addr, opts.devices, spec.nodelay).await {
        Ok(f) => f,
        Err(e) => {
            r.errors.push(e);
            receivers.finish().await;
            return r;
        }
    };
    // Both kinds are collected for every device; providers get one of them.
    load::warm_up(&fleet, KINDS[1 - scenario.delivered_kind()]).await;
    let pid = sys.pid();
    reset_peak(pid);
    let (cpu0, h0) = (cpu_seconds(Some(pid)), cpu_seconds(None));
    let threads0 = cpu_by_thread(pid);
    r.rss_before_kib = memory_kib(pid).1;
    let fsyncs0 = sys.fsyncs();
    let segs0 = tcp::segments_received();
    // Bounded in count as well as time.
    let cap = opts.max_messages / opts.devices.max(1) as u64 + 1;
    let (sent, start) = load::drive(
        &fleet,
        spec.pace,
        qos,
        opts.duration,
        cap,
        scenario.kind_of(),
        &KINDS,
    )
    .await;
    let expected = sent.by_kind[scenario.delivered_kind()] * scenario.providers() as u64;
    let last = receivers
        .drain(expected, opts.quiet, opts.drain_limit)
        .await;
    let (cpu1, h1) = (cpu_seconds(Some(pid)), cpu_seconds(None));
    r.cpu_by_thread_s = cpu_by_thread(pid)
        .into_iter()
        .map(|(name, t)| {
            let before = threads0.get(&name).copied().unwrap_or(0.0);
            // To the millisecond (clock ticks are coarser), without the
            // float noise of the subtraction.
            (name, ((t - before).max(0.0) * 1000.0).round() / 1000.0)
        })
        .collect();
    r.peak_rss_kib = memory_kib(pid).0;
    r.ledger_fsyncs = sys.fsyncs().zip(fsyncs0).map(|(a, b)| a.since(b));
    r.tcp_segments = tcp::segments_received()
        .zip(segs0)
        .map(|(a, b)| a.saturating_sub(b));
    let delivered = receivers
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    r.errors.extend(fleet.lost_connections());
    fleet.close();
    let got = receivers.finish().await;
    r.errors
        .extend(got.errors.into_iter().map(|e| format!("provider: {e}")));
    fill(
        &mut r,
        &sent,
        expected,
        delivered,
        start,
        last,
        opts.duration,
        got.latencies_us,
    );
    r.cpu_s = cpu1 - cpu0;
    r.harness_cpu_s = h1 - h0;
    r.cpu_share = r.cpu_s / r.duration_s.max(1e-9);
    eprintln!(
        "   {:<9} qos{} {:<8}{} delivered {:>9.0}/s of {:>9.0}/s published, not delivered {:>5.1}%, p99 {:>7.2} ms, cpu {:.2}s{}",
        sys.kind.name(),
        spec.qos,
        spec.label,
        if spec.nodelay { " nodelay" } else { "" },
        r.delivered_per_s,
        r.published_per_s,
        r.not_delivered_share * 100.0,
        r.latency.p99_us as f64 / 1000.0,
        r.cpu_s,
        if r.errors.is_empty() { String::new() } else { format!(" ERR {:?}", r.errors) }
    );
    r
}

#[allow(clippy::too_many_arguments)]
fn fill(
    r: &mut RunResult,
    sent: &load::Sent,
    expected: u64,
    delivered: u64,
    start: Instant,
    last: Instant,
    duration: Duration,
    latencies: Vec<u32>,
) {
    r.published = sent.by_kind.iter().sum();
    r.late_sends = sent.late;
    r.expected = expected;
    r.delivered = delivered;
    // Deliveries from a backlog after publishing stopped still count, over
    // the time they took.
    let elapsed = last
        .saturating_duration_since(start)
        .max(duration)
        .as_secs_f64();
    r.duration_s = elapsed;
    r.published_per_s = r.published as f64 / duration.as_secs_f64();
    r.delivered_per_s = delivered as f64 / elapsed;
    r.not_delivered_share = if expected == 0 {
        0.0
    } else {
        (1.0 - delivered as f64 / expected as f64).max(0.0)
    };
    r.latency = Latency::of(latencies);
}

/// Devices connected, and then publishing, by [`probe_fd_costs`].
const PROBE_DEVICES: usize = 100;

/// What one device costs `kind` in open descriptors, connected and idle and
/// then after one publish each: measured on a fresh process of its own with
/// [`PROBE_DEVICES`] devices. Needs the credentials in `opts.work_dir`.
fn probe_fd_costs(
    opts: &Options,
    rt: &tokio::runtime::Runtime,
    kind: SystemKind,
) -> anyhow::Result<limits::FdCost> {
    let creds = Credentials::write(&opts.work_dir, opts.devices.max(PROBE_DEVICES))?;
    let mut sys = System::start(
        kind,
        &creds,
        &opts.consentry_bin,
        opts.mosquitto_bin.as_deref(),
        opts.rumqttd_cmd.as_ref(),
    )?;
    let pid = sys.pid();
    let cost = rt.block_on(async {
        let count = || open_fds(pid).ok_or_else(|| anyhow::anyhow!("no /proc/{pid}/fd"));
        let before = count()?;
        let fleet = Fleet::connect(sys.addr, PROBE_DEVICES, false)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let connected = count()?;
        for (i, c) in &fleet.clients {
            let _ = c
                .publish(
                    load::topic(*i, KINDS[0]),
                    QoS::AtLeastOnce,
                    false,
                    load::payload(load::now_ns(), 0),
                )
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let active = count()?;
        fleet.close();
        let per = |n: u64| n.saturating_sub(before) as f64 / PROBE_DEVICES as f64;
        anyhow::Ok(limits::FdCost {
            idle: per(connected),
            active: per(active).max(per(connected)),
            measured: true,
        })
    });
    sys.stop();
    let cost = cost?;
    eprintln!(
        "   {:<9} descriptors per device: {:.2} connected, {:.2} after publishing",
        kind.name(),
        cost.idle,
        cost.active
    );
    Ok(cost)
}

/// The overload scenario: `devices` QoS 1 publishers as fast as rumqttc
/// lets them (each bounded by its 100-message inflight window) for
/// `overload_duration`, against one subscriber paced at `consume_rate`; then
/// the subscriber reads at full speed until every acknowledged publish
/// arrived, or nothing new came for `overload_quiet`, or
/// `overload_drain_limit` passed. Every `(device, k)` is tracked from
/// publish() through its PUBACK to its receipt.
async fn run_overload(opts: &Options, sys: &mut System) -> RunResult {
    use std::sync::atomic::Ordering::Relaxed;
    let spec = RunSpec {
        scenario: Scenario::Overload,
        qos: 1,
        pace: Pace::Max,
        label: "overload".into(),
        repeat: 0,
        nodelay: false,
    };
    let mut r = blank(&spec, sys, opts.devices, 1);
    let filter = format!("pii/+/+/{}", KINDS[Scenario::Overload.delivered_kind()]);
    let rx = match PacedReceiver::connect(
        sys.addr,
        sys.kind,
        &filter,
        QoS::AtLeastOnce,
        opts.consume_rate,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            r.errors.push(format!("provider: {e}"));
            return r;
        }
    };
    let mut fleet = match Fleet::connect_tracked(sys.addr, opts.devices, false).await {
        Ok(f) => f,
        Err(e) => {
            r.errors.push(e);
            rx.finish().await;
            return r;
        }
    };
    let pid = sys.pid();
    reset_peak(pid);
    let (cpu0, h0) = (cpu_seconds(Some(pid)), cpu_seconds(None));
    r.rss_before_kib = memory_kib(pid).1;
    let (stop_sampling, mut sampling) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let sampler = tokio::spawn(async move {
        let mut v = Vec::new();
        let mut tick = tokio::time::interval(RSS_EVERY);
        loop {
            tokio::select! {
                _ = sampling.changed() => return v,
                _ = tick.tick() => v.push(((t0.elapsed().as_secs_f64() * 100.0).round() / 100.0, memory_kib(pid).1)),
            }
        }
    });
    let cap = opts.overload_max_messages / opts.devices.max(1) as u64 + 1;
    // The subscriber goes to full speed when the publishing time is over,
    // whether or not every device's last publish() has returned yet.
    let full_speed = async {
        tokio::time::sleep(opts.overload_duration + Duration::from_millis(20)).await;
        let during = rx.counts.distinct.load(Relaxed);
        rx.set_rate(0.0);
        (Instant::now(), during, memory_kib(pid).1)
    };
    let ((sent, start), (drain_started, received_during_publish, rss_end_of_publish)) = tokio::join!(
        load::drive(
            &fleet,
            Pace::Max,
            QoS::AtLeastOnce,
            opts.overload_duration,
            cap,
            |_, _| Scenario::Overload.delivered_kind(),
            &KINDS,
        ),
        full_speed
    );
    let start_ns = load::now_ns().saturating_sub(start.elapsed().as_nanos() as u64);
    let publish_s = drain_started.saturating_duration_since(start).as_secs_f64();
    let c = fleet.counters.clone();
    let mut seen = (u64::MAX, u64::MAX);
    let mut changed = Instant::now();
    let drain_end = loop {
        let (handed, out, acked) = (
            c.handed.load(Relaxed),
            c.out.load(Relaxed),
            c.acked.load(Relaxed),
        );
        let (distinct, total) = (
            rx.counts.distinct.load(Relaxed),
            rx.counts.total.load(Relaxed),
        );
        if (total, acked) != seen {
            seen = (total, acked);
            changed = Instant::now();
        }
        // Everything accepted went out and was acknowledged, and as many
        // distinct publishes arrived as were acknowledged: all of them.
        if out >= handed && acked >= out && distinct >= acked {
            break "complete";
        }
        if changed.elapsed() >= opts.overload_quiet {
            break "quiet";
        }
        if drain_started.elapsed() >= opts.overload_drain_limit {
            break "limit";
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let drain_s = drain_started.elapsed().as_secs_f64();
    let (cpu1, h1) = (cpu_seconds(Some(pid)), cpu_seconds(None));
    let (peak, rss_end) = memory_kib(pid);
    r.peak_rss_kib = peak;
    let _ = stop_sampling.send(true);
    let rss_samples = sampler.await.unwrap_or_default();
    fleet.stop().await;
    r.errors.extend(fleet.lost_connections());
    let counts = rx.counts.clone();
    let got = rx.finish().await;
    r.errors
        .extend(got.error.into_iter().map(|e| format!("provider: {e}")));

    // Acknowledged against received, device by device.
    let none = load::SeqSet::default();
    let (mut acked, mut lost, mut received_unacked) = (0, 0, 0);
    for (i, t) in fleet.tracks.iter().enumerate() {
        let a = t.acked.lock().unwrap();
        let g = got.by_device.get(i).unwrap_or(&none);
        acked += a.len();
        lost += a.missing_from(g);
        received_unacked += g.missing_from(&a);
    }
    for g in got.by_device.iter().skip(fleet.tracks.len()) {
        received_unacked += g.len();
    }
    let received: u64 = got.by_device.iter().map(load::SeqSet::len).sum();
    let last_ack_ns = c.last_ack_ns.load(Relaxed);
    let last_rx_ns = counts.last_ns.load(Relaxed);
    let per_s = |n: u64, until_ns: u64| {
        let s = until_ns.saturating_sub(start_ns) as f64 / 1e9;
        if n == 0 {
            0.0
        } else {
            n as f64 / s.max(1e-3)
        }
    };
    let o = OverloadResult {
        consume_rate: opts.consume_rate,
        publish_s,
        drain_s,
        drain_end,
        sent: sent.by_kind.iter().sum(),
        went_out: c.out.load(Relaxed),
        acked,
        received,
        received_during_publish,
        lost,
        lost_share: if acked == 0 {
            0.0
        } else {
            lost as f64 / acked as f64
        },
        duplicates: counts.duplicates.load(Relaxed),
        received_unacked,
        unmatched_acks: c.unmatched.load(Relaxed),
        foreign: counts.foreign.load(Relaxed),
        acked_per_s: per_s(acked, last_ack_ns),
        delivered_per_s: per_s(received, last_rx_ns),
        rss_max_sampled_kib: rss_samples.iter().map(|s| s.1).max().unwrap_or(0),
        rss_end_of_publish_kib: rss_end_of_publish,
        rss_end_kib: rss_end,
        rss_samples,
    };
    fleet.close();
    r.published = o.sent;
    r.late_sends = sent.late;
    r.expected = o.acked;
    r.delivered = o.received;
    r.duration_s = publish_s;
    r.published_per_s = o.sent as f64 / publish_s.max(1e-9);
    r.delivered_per_s = o.delivered_per_s;
    r.not_delivered_share = o.lost_share;
    r.latency = Latency::of(got.latencies_us);
    r.cpu_s = cpu1 - cpu0;
    r.harness_cpu_s = h1 - h0;
    r.cpu_share = r.cpu_s / (publish_s + drain_s).max(1e-9);
    eprintln!(
        "   {:<9} overload: sent {}, acked {} ({:.0}/s), received {} ({:.0}/s; {} while publishing), lost {} ({:.2}%), duplicates {}, drain {} after {:.1} s, peak RSS {:.0} MiB{}",
        sys.kind.name(),
        o.sent,
        o.acked,
        o.acked_per_s,
        o.received,
        o.delivered_per_s,
        o.received_during_publish,
        o.lost,
        o.lost_share * 100.0,
        o.duplicates,
        o.drain_end,
        o.drain_s,
        r.peak_rss_kib as f64 / 1024.0,
        if r.errors.is_empty() { String::new() } else { format!(" ERR {:?}", r.errors) }
    );
    r.overload = Some(o);
    r
}

/// Connects the idle fleet, measures what it costs, then trickles messages
/// through it at each QoS.
async fn run_idle(opts: &Options, sys: &mut System, n: usize) -> Vec<RunResult> {
    let pid = sys.pid();
    let rss_before = memory_kib(pid).1;
    let fds_before = open_fds(pid);
    let connect_started = Instant::now();
    let fleet = Fleet::connect(sys.addr, n, false).await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    let (_, rss_connected) = memory_kib(pid);
    let fds_connected = open_fds(pid);
    let mut out = Vec::new();
    let fleet = match fleet {
        Ok(f) => f,
        Err(e) => {
            let spec = RunSpec {
                scenario: Scenario::Idle,
                qos: 1,
                pace: Pace::Rate(opts.trickle_rate),
                label: "trickle".into(),
                repeat: 0,
                nodelay: false,
            };
            let mut r = blank(&spec, sys, n, 1);
            r.errors.push(e);
            r.connect_s = Some(connect_s);
            r.fds_before = fds_before;
            r.fds_connected = fds_connected;
            eprintln!("   {:<9} idle: {:?}", sys.kind.name(), r.errors);
            return vec![r];
        }
    };
    eprintln!(
        "   {:<9} {n} devices connected in {connect_s:.1} s, RSS {:.0} MiB (was {:.0} MiB), {} open files (was {})",
        sys.kind.name(),
        rss_connected as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        fds_connected.map_or("?".into(), |v| v.to_string()),
        fds_before.map_or("?".into(), |v| v.to_string()),
    );
    for &q in &opts.qos {
        let spec = RunSpec {
            scenario: Scenario::Idle,
            qos: q,
            pace: Pace::Rate(opts.trickle_rate),
            label: "trickle".into(),
            repeat: 0,
            nodelay: false,
        };
        let mut r = blank(&spec, sys, n, 1);
        r.connect_s = Some(connect_s);
        r.rss_before_kib = rss_before;
        r.rss_connected_kib = Some(rss_connected);
        r.fds_before = fds_before;
        r.fds_connected = fds_connected;
        let receivers = match Receivers::connect(
            sys.addr,
            sys.kind,
            1,
            "pii/+/+/heart_rate",
            qos_of(q),
            false,
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                r.errors.push(format!("providers: {e}"));
                out.push(r);
                continue;
            }
        };
        let (cpu0, h0) = (cpu_seconds(Some(pid)), cpu_seconds(None));
        let (sent, start) = load::trickle(
            &fleet,
            opts.trickle_rate,
            qos_of(q),
            opts.duration,
            0,
            &KINDS,
        )
        .await;
        let expected = sent.by_kind[0];
        let last = receivers
            .drain(expected, opts.quiet, opts.drain_limit)
            .await;
        let (cpu1, h1) = (cpu_seconds(Some(pid)), cpu_seconds(None));
        // Peak over connecting and trickling: the number that must fit.
        r.peak_rss_kib = memory_kib(pid).0;
        let delivered = receivers
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed);
        let got = receivers.finish().await;
        r.errors
            .extend(got.errors.into_iter().map(|e| format!("provider: {e}")));
        fill(
            &mut r,
            &sent,
            expected,
            delivered,
            start,
            last,
            opts.duration,
            got.latencies_us,
        );
        r.cpu_s = cpu1 - cpu0;
        r.harness_cpu_s = h1 - h0;
        r.cpu_share = r.cpu_s / r.duration_s.max(1e-9);
        eprintln!(
            "   {:<9} qos{q} trickle {:.0}/s: delivered {}/{}, p99 {:.2} ms, peak RSS {:.0} MiB",
            sys.kind.name(),
            opts.trickle_rate,
            r.delivered,
            r.expected,
            r.latency.p99_us as f64 / 1000.0,
            r.peak_rss_kib as f64 / 1024.0
        );
        out.push(r);
    }
    let errors = fleet.errors.load(std::sync::atomic::Ordering::Relaxed);
    if errors > 0 {
        if let Some(r) = out.last_mut() {
            r.errors
                .push(format!("{errors} idle devices lost their connection"));
        }
    }
    fleet.close();
    out
}

/// `bench/results` beside this file, wherever the harness runs from.
pub fn default_out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results")
}
