//! Medians, ratios, the target checks, and the three outputs:
//! `latest.json` (everything), `latest.md` (the tables bench/README.md
//! quotes) and `latest.svg` (the chart).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::systems::SystemKind;
use super::{Results, RunResult, Scenario};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub open_files_limit: String,
    pub mosquitto: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
            mem_total_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            open_files_limit: limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default(),
            mosquitto: super::find_mosquitto()
                .and_then(|m| std::process::Command::new(m).arg("-h").output().ok())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "not installed".into()),
        }
    }
}

pub fn now_utc() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// All runs of one system under one load, reduced.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: Scenario,
    pub qos: u8,
    pub label: String,
    pub client_nodelay: bool,
    pub system: SystemKind,
    pub runs: usize,
    pub offered_per_s: Option<f64>,
    pub delivered_per_s: f64,
    pub delivered_per_s_min: f64,
    pub delivered_per_s_max: f64,
    pub not_delivered_share: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cpu_share: f64,
    /// The load generator's (this harness process's) CPU over the same
    /// runs: with it, how much of the machine the load took.
    pub harness_cpu_share: f64,
    pub cpu_us_per_delivery: f64,
    pub peak_rss_kib: u64,
    pub ratio_vs_rumqttd: Option<f64>,
    /// The same ratio round by round: each round runs every system back to
    /// back, so these show how much of the spread is the machine's.
    pub ratio_vs_rumqttd_by_round: Vec<f64>,
    pub ratio_vs_mosquitto: Option<f64>,
    pub added_p99_us_vs_rumqttd: Option<f64>,
    /// Fixed rates: the same difference round by round (`--rate-repeats`),
    /// each against bare rumqttd's run of the same round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub added_p99_us_by_round: Vec<f64>,
    /// consentry: its ledger fsyncs over all the runs, slow ones counted.
    pub ledger_fsyncs: Option<super::systems::Fsyncs>,
    /// Loopback TCP segments, both ways, per delivered message (median of
    /// the runs). At tens of thousands of msg/s with client NODELAY off:
    /// about 1.6 when each publish went alone and was ACKed at once, 0.1–0.5
    /// when segments carried several. At 1k msg/s each message travels alone
    /// either way (about 4).
    pub tcp_segments_per_delivery: Option<f64>,
    pub errors: usize,
}

type Key = (usize, u8, String, bool);

fn scenario_index(s: Scenario) -> usize {
    Scenario::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

pub fn summarize(runs: &[RunResult]) -> Vec<Summary> {
    let mut groups: BTreeMap<(Key, u8), Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        let key = (
            scenario_index(r.scenario),
            r.qos,
            r.label.clone(),
            r.client_nodelay,
        );
        groups.entry((key, r.system as u8)).or_default().push(r);
    }
    let mut out: Vec<Summary> = groups
        .values()
        .map(|rs| {
            let f = |g: &dyn Fn(&RunResult) -> f64| {
                let mut v: Vec<f64> = rs.iter().map(|r| g(r)).collect();
                median(&mut v)
            };
            let ok: Vec<f64> = rs.iter().map(|r| r.delivered_per_s).collect();
            Summary {
                scenario: rs[0].scenario,
                qos: rs[0].qos,
                label: rs[0].label.clone(),
                client_nodelay: rs[0].client_nodelay,
                system: rs[0].system,
                runs: rs.len(),
                offered_per_s: rs[0].offered_per_s,
                delivered_per_s: f(&|r| r.delivered_per_s),
                delivered_per_s_min: ok.iter().copied().fold(f64::INFINITY, f64::min),
                delivered_per_s_max: ok.iter().copied().fold(0.0, f64::max),
                not_delivered_share: f(&|r| r.not_delivered_share),
                p50_us: f(&|r| r.latency.p50_us as f64),
                p99_us: f(&|r| r.latency.p99_us as f64),
                p999_us: f(&|r| r.latency.p999_us as f64),
                cpu_share: f(&|r| r.cpu_share),
                harness_cpu_share: f(&|r| r.harness_cpu_s / r.duration_s.max(1e-9)),
                cpu_us_per_delivery: f(&|r| r.cpu_s * 1e6 / (r.delivered.max(1) as f64)),
                peak_rss_kib: rs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0),
                ratio_vs_rumqttd: None,
                ratio_vs_rumqttd_by_round: Vec::new(),
                ratio_vs_mosquitto: None,
                added_p99_us_vs_rumqttd: None,
                added_p99_us_by_round: Vec::new(),
                ledger_fsyncs: rs
                    .iter()
                    .filter_map(|r| r.ledger_fsyncs)
                    .reduce(|a, b| a.plus(b)),
                tcp_segments_per_delivery: {
                    let mut v: Vec<f64> = rs
                        .iter()
                        .filter(|r| r.delivered > 0)
                        .filter_map(|r| Some(r.tcp_segments? as f64 / r.delivered as f64))
                        .collect();
                    (!v.is_empty()).then(|| median(&mut v))
                },
                errors: rs.iter().map(|r| r.errors.len()).sum(),
            }
        })
        .collect();
    let snapshot = out.clone();
    for s in &mut out {
        let peer = |sys: SystemKind| {
            snapshot.iter().find(|o| {
                o.system == sys
                    && o.scenario == s.scenario
                    && o.qos == s.qos
                    && o.label == s.label
                    && o.client_nodelay == s.client_nodelay
            })
        };
        if let Some(b) = peer(SystemKind::Rumqttd) {
            if b.delivered_per_s > 0.0 {
                s.ratio_vs_rumqttd = Some(s.delivered_per_s / b.delivered_per_s);
            }
            s.added_p99_us_vs_rumqttd = Some(s.p99_us - b.p99_us);
            if s.system != SystemKind::Rumqttd {
                s.ratio_vs_rumqttd_by_round = by_round(runs, s, |r, b| {
                    (b.delivered_per_s > 0.0).then(|| r.delivered_per_s / b.delivered_per_s)
                });
                if s.label != "max" {
                    s.added_p99_us_by_round = by_round(runs, s, |r, b| {
                        Some(r.latency.p99_us as f64 - b.latency.p99_us as f64)
                    });
                }
            }
        }
        if let Some(m) = peer(SystemKind::Mosquitto) {
            if m.delivered_per_s > 0.0 {
                s.ratio_vs_mosquitto = Some(s.delivered_per_s / m.delivered_per_s);
            }
        }
    }
    out
}

/// `f` of `s`'s run and bare rumqttd's, for each round both ran.
fn by_round(
    runs: &[RunResult],
    s: &Summary,
    f: impl Fn(&RunResult, &RunResult) -> Option<f64>,
) -> Vec<f64> {
    let same = |r: &&RunResult, sys: SystemKind| {
        r.system == sys
            && r.scenario == s.scenario
            && r.qos == s.qos
            && r.label == s.label
            && r.client_nodelay == s.client_nodelay
    };
    runs.iter()
        .filter(|r| same(r, s.system))
        .filter_map(|r| {
            let b = runs
                .iter()
                .find(|b| same(b, SystemKind::Rumqttd) && b.repeat == r.repeat)?;
            f(r, b)
        })
        .collect()
}

/// ` (rounds 0.61–1.02×)` when there was more than one round.
fn round_range(v: &[f64]) -> String {
    if v.len() < 2 {
        return String::new();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!(" (rounds {lo:.2}–{hi:.2}×)")
}

/// ` (rounds −0.52 to 3.10 ms, ≤ 1 ms in 2 of 3)` when there was more than
/// one round of a fixed-rate load.
fn added_rounds(v: &[f64]) -> String {
    if v.len() < 2 {
        return String::new();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let within = v.iter().filter(|d| **d <= 1000.0).count();
    format!(
        " (rounds {} to {} ms, ≤ 1 ms in {within} of {})",
        ms(lo),
        ms(hi),
        v.len()
    )
}

pub fn write(results: &Results, dir: &Path) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    std::fs::write(dir.join("latest.md"), markdown(results))?;
    chart(results, &dir.join("latest.svg"))?;
    Ok(())
}

fn ms(us: f64) -> String {
    if us.is_nan() {
        "–".into()
    } else {
        format!("{:.2}", us / 1000.0)
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

pub fn markdown(results: &Results) -> String {
    let m = &results.machine;
    let mut s = String::new();
    let _ =
        writeln!(
        s,
        "Run {} · `{}` · {} × {} · {} GiB · Linux {} · open files {} · {} · wall time {:.0} s{}\n",
        results.date,
        results.command,
        m.nproc,
        m.cpu_model,
        m.mem_total_gib,
        m.kernel,
        m.open_files_limit,
        m.mosquitto,
        results.wall_s,
        if results.quick { " · QUICK (smoke) run" } else { "" }
    );
    let fd = &results.fd_limit;
    let _ = writeln!(
        s,
        "Open files (soft/hard): {}/{} at start, {}/{} for the run (nr_open {}){}\n",
        fd.soft_before,
        fd.hard_before,
        fd.soft,
        fd.hard,
        fd.nr_open,
        if fd.note.is_empty() {
            String::new()
        } else {
            format!(" — {}", fd.note)
        }
    );
    if let Some(note) = results.settings["idle_note"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        let _ = writeln!(s, "{note}.\n");
    }
    let _ = writeln!(s, "Settings: `{}`\n", results.settings);
    let sum = &results.summary;

    let _ = writeln!(s, "### Maximum rate (median of runs, min–max)\n");
    let _ = writeln!(s, "| scenario | QoS | system | delivered msg/s | not delivered | CPU µs/msg | peak RSS MiB | × rumqttd | × mosquitto |");
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for x in sum.iter().filter(|x| x.label == "max") {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} ({:.0}–{:.0}) | {} | {:.1} | {} | {} | {} |",
            x.scenario_name(),
            x.qos,
            x.system.name(),
            x.delivered_per_s,
            x.delivered_per_s_min,
            x.delivered_per_s_max,
            pct(x.not_delivered_share),
            x.cpu_us_per_delivery,
            mib(x.peak_rss_kib),
            ratio(x.ratio_vs_rumqttd) + &round_range(&x.ratio_vs_rumqttd_by_round),
            ratio(x.ratio_vs_mosquitto),
        );
    }

    let rounds = sum
        .iter()
        .filter(|x| is_fixed_rate(x))
        .map(|x| x.runs)
        .max()
        .unwrap_or(1);
    let each = if rounds > 1 {
        format!("median of {rounds} rounds")
    } else {
        "one run each".to_string()
    };
    let _ = writeln!(
        s,
        "\n### Fixed offered rate ({each}): latency from publish() to receipt\n"
    );
    let _ = writeln!(s, "| scenario | QoS | offered msg/s | client NODELAY | system | delivered msg/s | not delivered | p50 ms | p99 ms | p999 ms | added p99 vs rumqttd ms | ledger fsyncs > 5 ms (> 10 ms) of all | CPU (load generator) | peak RSS MiB | TCP segments per message |");
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for x in sum.iter().filter(|x| is_fixed_rate(x)) {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.0}% ({:.0}%) | {} | {} |",
            load_cells(
                x.scenario_name(),
                x.qos,
                x.offered_per_s,
                &x.label,
                x.client_nodelay
            ),
            x.system.name(),
            x.delivered_per_s,
            pct(x.not_delivered_share),
            ms(x.p50_us),
            ms(x.p99_us),
            ms(x.p999_us),
            x.added_p99_us_vs_rumqttd.map_or("–".into(), |d| ms(d)
                + &added_rounds(&x.added_p99_us_by_round)),
            x.ledger_fsyncs.map_or("–".into(), |f| format!(
                "{} ({}) of {}",
                f.over_5ms, f.over_10ms, f.count
            )),
            x.cpu_share * 100.0,
            x.harness_cpu_share * 100.0,
            mib(x.peak_rss_kib),
            x.tcp_segments_per_delivery
                .map_or("–".into(), |v| format!("{v:.2}")),
        );
    }

    let by_thread: Vec<&RunResult> = results
        .runs
        .iter()
        .filter(|r| {
            r.system == SystemKind::Consentry && r.mode == "rate" && !r.cpu_by_thread_s.is_empty()
        })
        .collect();
    if !by_thread.is_empty() {
        let _ = writeln!(
            s,
            "\n### consentry's CPU by thread at fixed rates: % of a core (µs per delivered message)\n\n\
             Threads alive at the end of each run; the embedded rumqttd is its `v4`, `v5`, \
             `router-*`, `rumqttd` and `rumqttd-links` threads. The bridges between sessions \
             and rumqttd's router run on the tokio workers and count as sessions.\n"
        );
        let _ = writeln!(s, "| scenario | QoS | offered msg/s | client NODELAY | sessions (tokio workers) | ledger | embedded rumqttd | other |");
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
        // One row per load: its rounds' CPU, time and deliveries summed.
        let mut rows: Vec<(&RunResult, [f64; 4], f64, u64)> = Vec::new();
        for r in by_thread {
            let i = match rows.iter().position(|(f, ..)| {
                f.scenario == r.scenario
                    && f.qos == r.qos
                    && f.label == r.label
                    && f.client_nodelay == r.client_nodelay
            }) {
                Some(i) => i,
                None => {
                    rows.push((r, [0.0; 4], 0.0, 0));
                    rows.len() - 1
                }
            };
            let row = &mut rows[i];
            for (name, secs) in &r.cpu_by_thread_s {
                row.1[thread_group(name)] += secs;
            }
            row.2 += r.duration_s;
            row.3 += r.delivered;
        }
        for (r, groups, duration_s, delivered) in rows {
            let cell = |secs: f64| {
                format!(
                    "{:.1}% ({:.1})",
                    secs / duration_s.max(1e-9) * 100.0,
                    secs * 1e6 / delivered.max(1) as f64
                )
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                load_cells(
                    r.scenario_name(),
                    r.qos,
                    r.offered_per_s,
                    &r.label,
                    r.client_nodelay
                ),
                cell(groups[0]),
                cell(groups[1]),
                cell(groups[2]),
                cell(groups[3]),
            );
        }
    }

    let overload: Vec<(&RunResult, &super::OverloadResult)> = results
        .runs
        .iter()
        .filter_map(|r| r.overload.as_ref().map(|o| (r, o)))
        .collect();
    if let Some((first, o)) = overload.first() {
        let _ = writeln!(
            s,
            "\n### Overload: {} QoS 1 publishers as fast as they can for {:.1} s, one subscriber reading {:.0} msg/s, then draining\n",
            first.devices, o.publish_s, o.consume_rate
        );
        let _ = writeln!(s, "| system | sent | acked | acked msg/s | received (distinct) | while publishing | delivered msg/s | lost (acked, never received) | duplicates | drain | peak RSS MiB | RSS samples MiB | CPU s |");
        let _ = writeln!(
            s,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (r, o) in &overload {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {} | {} | {:.0} | {} ({:.2}%) | {} | {} {:.1} s | {} | {} | {:.1} |",
                r.system.name(),
                o.sent,
                o.acked,
                o.acked_per_s,
                o.received,
                o.received_during_publish,
                o.delivered_per_s,
                o.lost,
                o.lost_share * 100.0,
                o.duplicates,
                o.drain_end,
                o.drain_s,
                mib(r.peak_rss_kib),
                rss_trace(&o.rss_samples),
                r.cpu_s,
            );
        }
        let _ = writeln!(
            s,
            "\n(\"lost\": PUBACK received by the publisher, never delivered to the subscriber, not even while draining. \
             RSS samples: every 0.25 s, six of them evenly spaced over publishing and draining; peak RSS is VmHWM.)"
        );
    }

    let idle: Vec<&RunResult> = results
        .runs
        .iter()
        .filter(|r| r.scenario == Scenario::Idle)
        .collect();
    if !idle.is_empty() {
        let _ = writeln!(s, "\n### Many idle devices, trickle of messages\n");
        let _ = writeln!(s, "| system | devices | connect s | RSS before MiB | RSS connected MiB | KiB per device | RSS at 20k, extrapolated MiB | fds per device | QoS | trickle delivered | p50 ms | p99 ms | peak RSS MiB |");
        let _ = writeln!(
            s,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for r in idle {
            let connected = r.rss_connected_kib.unwrap_or(0);
            let per = (connected.saturating_sub(r.rss_before_kib)) as f64 / r.devices.max(1) as f64;
            let at20k = r.rss_before_kib as f64 + per * 20_000.0;
            let fds = match (r.fds_before, r.fds_connected) {
                (Some(b), Some(c)) => {
                    format!(
                        "{:.2}",
                        c.saturating_sub(b) as f64 / r.devices.max(1) as f64
                    )
                }
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {} | {} | {:.1} | {:.0} | {} | {} | {}/{} | {} | {} | {} |",
                r.system.name(),
                r.devices,
                r.connect_s.unwrap_or(f64::NAN),
                mib(r.rss_before_kib),
                mib(connected),
                per,
                at20k / 1024.0,
                fds,
                r.qos,
                r.delivered,
                r.expected,
                ms(r.latency.p50_us as f64),
                ms(r.latency.p99_us as f64),
                mib(r.peak_rss_kib),
            );
        }
    }

    let _ = writeln!(s, "\n### Targets\n");
    for line in targets(results) {
        let _ = writeln!(s, "- {line}");
    }
    let errors: Vec<String> = results
        .runs
        .iter()
        .filter(|r| !r.errors.is_empty())
        .map(|r| {
            format!(
                "{} {} qos{} {}: {}",
                r.scenario_name(),
                r.system.name(),
                r.qos,
                r.label,
                r.errors.join("; ")
            )
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\n### Errors during the run\n");
        for e in errors {
            let _ = writeln!(s, "- {e}");
        }
    }
    s
}

impl Summary {
    fn scenario_name(&self) -> &'static str {
        self.scenario.name()
    }
}

/// The cells naming a fixed-rate load: scenario, QoS, offered rate (label),
/// client NODELAY.
fn load_cells(scenario: &str, qos: u8, offered: Option<f64>, label: &str, nodelay: bool) -> String {
    format!(
        "{scenario} | {qos} | {:.0} ({label}) | {}",
        offered.unwrap_or(0.0),
        if nodelay { "on" } else { "off" }
    )
}

/// Which of consentry's thread groups a thread name belongs to: its
/// sessions, its ledger writer, the embedded rumqttd, anything else.
fn thread_group(name: &str) -> usize {
    match name {
        "tokio-rt-worker" => 0,
        // `comm` keeps 15 bytes: the writer ("consentry-ledger") and the
        // retention scan ("consentry-ledger-scan") both read so.
        n if n.starts_with("consentry-ledge") => 1,
        // `rumqttd-links` opens consentry's in-memory links to the router.
        "v4" | "v5" | "rumqttd" | "rumqttd-links" => 2,
        n if n.starts_with("router-") => 2,
        _ => 3,
    }
}

/// A row of the fixed-offered-rate table and latency panels.
fn is_fixed_rate(x: &Summary) -> bool {
    x.label != "max" && !matches!(x.scenario, Scenario::Idle | Scenario::Overload)
}

/// Six RSS samples (MiB), evenly spaced over the run, first and last included.
fn rss_trace(samples: &[(f64, u64)]) -> String {
    if samples.is_empty() {
        return "–".into();
    }
    let n = samples.len();
    let picks = 6.min(n);
    let mut at: Vec<usize> = (0..picks)
        .map(|j| {
            if picks == 1 {
                0
            } else {
                j * (n - 1) / (picks - 1)
            }
        })
        .collect();
    at.dedup();
    at.iter()
        .map(|&i| format!("{:.0}", samples[i].1 as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(" → ")
}

impl RunResult {
    fn scenario_name(&self) -> &'static str {
        self.scenario.name()
    }
}

/// Each target of the benchmark issue, judged from the medians of this run.
pub fn targets(results: &Results) -> Vec<String> {
    let sum = &results.summary;
    let find_of = |sys: SystemKind, sc: Scenario, q: u8, label: &str, nodelay: bool| {
        sum.iter().find(|x| {
            x.system == sys
                && x.scenario == sc
                && x.qos == q
                && x.label == label
                && x.client_nodelay == nodelay
        })
    };
    let find = |sc: Scenario, q: u8, label: &str, nodelay: bool| {
        find_of(SystemKind::Consentry, sc, q, label, nodelay)
    };
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let mut out = Vec::new();
    for (sc, goal) in [(Scenario::AllowAll, 0.80), (Scenario::Masked, 0.70)] {
        for q in [0u8, 1] {
            if let Some(x) = find(sc, q, "max", false) {
                if let Some(r) = x.ratio_vs_rumqttd {
                    out.push(format!(
                        "{} QoS {q}: consentry / bare rumqttd = {r:.2}×{} (target ≥ {goal:.2}×): {}",
                        sc.name(),
                        round_range(&x.ratio_vs_rumqttd_by_round),
                        verdict(r >= goal)
                    ));
                }
            }
        }
    }
    for q in [0u8, 1] {
        if let Some(r) =
            find(Scenario::AllowAll, q, "max", false).and_then(|x| x.ratio_vs_mosquitto)
        {
            out.push(format!(
                "allow_all QoS {q}: consentry / Mosquitto with ACL = {r:.2}× (target ≥ 1.00×): {}",
                verdict(r >= 1.0)
            ));
        }
    }
    for q in [0u8, 1] {
        for nodelay in [false, true] {
            if let Some(x) = find(Scenario::AllowAll, q, "half_max", nodelay) {
                if let Some(d) = x.added_p99_us_vs_rumqttd {
                    // Which way the clients' TCP fell (see `tcp`), for both brokers.
                    let segs = |x: Option<&Summary>| {
                        x.and_then(|x| x.tcp_segments_per_delivery)
                            .map_or("–".into(), |v| format!("{v:.2}"))
                    };
                    let bare = find_of(
                        SystemKind::Rumqttd,
                        Scenario::AllowAll,
                        q,
                        "half_max",
                        nodelay,
                    );
                    out.push(format!(
                        "allow_all QoS {q} at half of consentry's max ({:.0} msg/s), client NODELAY {}: added p99 = {} ms{} (target ≤ 1 ms): {} (CPU: consentry {:.0}% + load generator {:.0}% of {}%; TCP segments per message: consentry {}, rumqttd {})",
                        x.offered_per_s.unwrap_or(0.0),
                        if nodelay { "on" } else { "off" },
                        ms(d),
                        added_rounds(&x.added_p99_us_by_round),
                        verdict(d <= 1000.0),
                        x.cpu_share * 100.0,
                        x.harness_cpu_share * 100.0,
                        100 * results.machine.nproc,
                        segs(Some(x)),
                        segs(bare),
                    ));
                }
            }
        }
    }
    if let Some((r, o)) = results
        .runs
        .iter()
        .filter(|r| r.system == SystemKind::Consentry)
        .find_map(|r| r.overload.as_ref().map(|o| (r, o)))
    {
        out.push(format!(
            "overload (QoS 1 publishers faster than a {:.0} msg/s subscriber): consentry peak RSS = {} MiB (target ≤ 512 MiB): {}",
            o.consume_rate,
            mib(r.peak_rss_kib),
            verdict(r.peak_rss_kib <= 512 * 1024)
        ));
        out.push(format!(
            "overload: acknowledged QoS 1 publishes consentry never delivered = {} of {} (target 0): {}",
            o.lost,
            o.acked,
            verdict(o.lost == 0 && o.acked > 0)
        ));
    }
    if let Some(r) = results
        .runs
        .iter()
        .filter(|r| r.scenario == Scenario::Idle && r.system == SystemKind::Consentry)
        .max_by_key(|r| r.peak_rss_kib)
    {
        let connected = r.rss_connected_kib.unwrap_or(0);
        let per = connected.saturating_sub(r.rss_before_kib) as f64 / r.devices.max(1) as f64;
        let at20k = (r.rss_before_kib as f64 + per * 20_000.0) / 1024.0;
        let measured = r.devices >= 20_000;
        let why = if measured {
            String::new()
        } else {
            format!(
                " (open-file limit {}{})",
                results.fd_limit.soft,
                if results.fd_limit.raised {
                    ""
                } else {
                    ", could not be raised"
                }
            )
        };
        out.push(format!(
            "20k device connections in ≤ 1 GiB RSS: {} devices measured{why}, peak RSS {} MiB; {} {:.0} MiB at 20k: {}",
            r.devices,
            mib(r.peak_rss_kib),
            if measured { "measured" } else { "extrapolated (linear in devices)" },
            at20k,
            if measured {
                verdict(r.peak_rss_kib <= 1024 * 1024).to_string()
            } else {
                format!("{} by extrapolation only", verdict(at20k <= 1024.0))
            }
        ));
    }
    out
}

fn color(s: SystemKind) -> RGBColor {
    match s {
        SystemKind::Rumqttd => RGBColor(120, 120, 120),
        SystemKind::Consentry => RGBColor(31, 119, 180),
        SystemKind::Mosquitto => RGBColor(255, 127, 14),
    }
}

fn group_label(x: &Summary) -> String {
    let name = match x.scenario {
        Scenario::AllowAll => "allow-all",
        Scenario::RefusedHalf => "½ refused",
        Scenario::Masked => "masked",
        Scenario::Fanout3 => "fan-out 3",
        Scenario::Overload => "overload",
        Scenario::Idle => "idle",
    };
    format!("{name} QoS{}", x.qos)
}

/// Low and high end of a bar's whisker.
type Spread = fn(&Summary) -> (f64, f64);

/// One panel: groups of bars, one bar per system.
struct Panel<'a> {
    title: String,
    y_label: &'static str,
    log: bool,
    rows: Vec<&'a Summary>,
    value: fn(&Summary) -> f64,
    whisker: Option<Spread>,
    /// Log-scale panels: the text over each bar.
    text: fn(&Summary) -> String,
}

fn two_decimals(x: &Summary) -> String {
    format!("{:.2}", x.p99_us / 1000.0)
}

fn chart(results: &Results, path: &Path) -> anyhow::Result<()> {
    let sum = &results.summary;
    let max_rows: Vec<&Summary> = sum.iter().filter(|x| x.label == "max").collect();
    let mut panels = vec![Panel {
        title: "Delivered messages/s at maximum rate (median of runs, whiskers min–max; ratio = consentry / bare rumqttd)".into(),
        y_label: "delivered msg/s",
        log: false,
        rows: max_rows,
        value: |x| x.delivered_per_s,
        whisker: Some(|x| (x.delivered_per_s_min, x.delivered_per_s_max)),
        text: two_decimals,
    }];
    let mut labels: Vec<(String, f64)> = Vec::new();
    for x in sum.iter().filter(|x| is_fixed_rate(x) && !x.client_nodelay) {
        if !labels.iter().any(|(l, _)| *l == x.label) {
            labels.push((x.label.clone(), x.offered_per_s.unwrap_or(0.0)));
        }
    }
    // Highest rates first: half_max is the target's load.
    labels.sort_by(|a, b| {
        (b.0 == "half_max")
            .cmp(&(a.0 == "half_max"))
            .then(b.1.total_cmp(&a.1))
    });
    for (label, _) in labels.into_iter().take(2) {
        let what = if label == "half_max" {
            "half of consentry's max rate (per scenario)".to_string()
        } else {
            format!("{label} msg/s offered")
        };
        panels.push(Panel {
            title: format!(
                "p99 latency, publish() to receipt, at {what}; client NODELAY off (log scale)"
            ),
            y_label: "p99 ms",
            log: true,
            rows: sum
                .iter()
                .filter(|x| x.label == label && !x.client_nodelay && is_fixed_rate(x))
                .collect(),
            value: |x| x.p99_us / 1000.0,
            whisker: None,
            text: two_decimals,
        });
    }
    let overload: Vec<&Summary> = sum
        .iter()
        .filter(|x| x.scenario == Scenario::Overload)
        .collect();
    if !overload.is_empty() {
        panels.push(Panel {
            title: "Overload (QoS 1 publishers faster than the subscriber): peak RSS in MiB (log scale; target ≤ 512 MiB) and acknowledged messages lost".into(),
            y_label: "peak RSS MiB",
            log: true,
            rows: overload,
            value: |x| x.peak_rss_kib as f64 / 1024.0,
            whisker: None,
            text: |x| {
                format!(
                    "{:.0} MiB, lost {:.2}%",
                    x.peak_rss_kib as f64 / 1024.0,
                    x.not_delivered_share * 100.0
                )
            },
        });
    }
    // An empty panel only when there is nothing else to draw.
    if panels.len() > 1 && panels[0].rows.is_empty() {
        panels.remove(0);
    }
    let height = 420 * panels.len() as u32 + 40;
    let root = SVGBackend::new(path, (1300, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(40);
    head.draw(&Text::new(
        format!(
            "consentry vs bare rumqttd vs Mosquitto (ACL) · {} · {} × {} · {}",
            results.date,
            results.machine.nproc,
            results.machine.cpu_model,
            if results.quick {
                "QUICK smoke run"
            } else {
                "bench/README.md"
            }
        ),
        (10, 12),
        ("sans-serif", 18).into_font(),
    ))?;
    let areas = body.split_evenly((panels.len(), 1));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(panel, area)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    p: &Panel,
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    let mut groups: Vec<String> = Vec::new();
    for x in &p.rows {
        let g = group_label(x);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let systems = [
        SystemKind::Rumqttd,
        SystemKind::Consentry,
        SystemKind::Mosquitto,
    ];
    let top = p
        .rows
        .iter()
        .map(|x| p.whisker.map_or((p.value)(x), |w| w(x).1.max((p.value)(x))))
        .fold(0.0, f64::max)
        .max(1e-3);
    let n = groups.len().max(1) as f64;
    let mut b = ChartBuilder::on(area);
    b.caption(&p.title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(70);
    let bar = |g: usize, s: usize| {
        let x0 = g as f64 + 0.12 + s as f64 * 0.25;
        (x0, x0 + 0.23)
    };
    let label_style = ("sans-serif", 13).into_font();
    if p.log {
        let lo = p
            .rows
            .iter()
            .map(|x| (p.value)(x))
            .filter(|v| *v > 0.0)
            .fold(f64::INFINITY, f64::min)
            .min(top)
            / 2.0;
        let lo = if lo.is_finite() { lo.max(1e-3) } else { 1e-3 };
        let mut c = b.build_cartesian_2d(0f64..n, (lo..top * 3.0).log_scale())?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(p.y_label)
            .draw()?;
        for (si, &sys) in systems.iter().enumerate() {
            let rows: Vec<(usize, f64, String)> = p
                .rows
                .iter()
                .filter(|x| x.system == sys)
                .filter_map(|x| {
                    groups
                        .iter()
                        .position(|g| *g == group_label(x))
                        .map(|g| (g, (p.value)(x), (p.text)(x)))
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            c.draw_series(rows.iter().map(|&(g, v, _)| {
                let (x0, x1) = bar(g, si);
                Rectangle::new([(x0, lo), (x1, v.max(lo))], color(sys).filled())
            }))?
            .label(sys.name())
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color(sys).filled())
            });
            c.draw_series(rows.iter().map(|(g, v, text)| {
                let (x0, _) = bar(*g, si);
                EmptyElement::at((x0, v.max(lo)))
                    + Text::new(text.clone(), (0, -13), ("sans-serif", 10).into_font())
            }))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        for (g, name) in groups.iter().enumerate() {
            let (px, py) = c.backend_coord(&(g as f64 + 0.3, lo));
            area.draw(&Text::new(
                name.clone(),
                (
                    px - area.get_base_pixel().0,
                    py - area.get_base_pixel().1 + 8,
                ),
                label_style.clone(),
            ))?;
        }
    } else {
        let mut c = b.build_cartesian_2d(0f64..n, 0f64..top * 1.15)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(p.y_label)
            .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
            .draw()?;
        let base: Vec<(String, f64)> = p
            .rows
            .iter()
            .filter(|x| x.system == SystemKind::Rumqttd)
            .map(|x| (group_label(x), (p.value)(x)))
            .collect();
        for (si, &sys) in systems.iter().enumerate() {
            let rows: Vec<(usize, &Summary)> = p
                .rows
                .iter()
                .filter(|x| x.system == sys)
                .filter_map(|x| {
                    groups
                        .iter()
                        .position(|g| *g == group_label(x))
                        .map(|g| (g, *x))
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            c.draw_series(rows.iter().map(|&(g, x)| {
                let (x0, x1) = bar(g, si);
                Rectangle::new([(x0, 0.0), (x1, (p.value)(x))], color(sys).filled())
            }))?
            .label(sys.name())
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color(sys).filled())
            });
            if let Some(w) = p.whisker {
                c.draw_series(rows.iter().map(|&(g, x)| {
                    let (x0, x1) = bar(g, si);
                    let (lo, hi) = w(x);
                    let mid = (x0 + x1) / 2.0;
                    PathElement::new(vec![(mid, lo), (mid, hi)], BLACK.stroke_width(1))
                }))?;
            }
            if sys != SystemKind::Rumqttd {
                c.draw_series(rows.iter().filter_map(|&(g, x)| {
                    let b = base.iter().find(|(l, _)| *l == group_label(x))?.1;
                    let (x0, _) = bar(g, si);
                    let top = p.whisker.map_or((p.value)(x), |w| w(x).1);
                    (b > 0.0).then(|| {
                        EmptyElement::at((x0, top))
                            + Text::new(
                                format!("{:.2}×", (p.value)(x) / b),
                                (0, -14),
                                ("sans-serif", 11).into_font(),
                            )
                    })
                }))?;
            }
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        for (g, name) in groups.iter().enumerate() {
            let (px, py) = c.backend_coord(&(g as f64 + 0.3, 0.0));
            area.draw(&Text::new(
                name.clone(),
                (
                    px - area.get_base_pixel().0,
                    py - area.get_base_pixel().1 + 8,
                ),
                label_style.clone(),
            ))?;
        }
    }
    Ok(())
}
