//! `cargo bench --bench e2e -- [options]`: the end-to-end benchmark of
//! consentry against bare rumqttd and Mosquitto. See bench/README.md.

mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use harness::systems::SystemKind;
use harness::{Options, Scenario};

const USAGE: &str = "\
cargo bench --bench e2e -- [--quick] [--scenario NAME,…] [--qos 0,1] [--systems rumqttd,consentry,mosquitto]
    [--duration SECS] [--drain-limit SECS] [--repeats N] [--rate-repeats N] [--rates 1000,10000] [--no-half-max]
    [--client-nodelay off|on|both] [--no-nodelay-variant]
    [--devices N] [--idle-devices N] [--trickle-rate R] [--out DIR]
    [--overload-duration SECS] [--consume-rate R] [--overload-max-messages N]
    [--consentry-bin PATH]
scenarios: allow_all refused_half masked fanout3 overload idle
--duration sets the overload scenario's publishing time too (default 10 s there);
--overload-duration after it sets that alone. --idle-devices (default 20000) is
lowered to what the open-file limit allows. --consentry-bin runs another
consentry build in place of this tree's (to compare two builds); a wrapper
script must exec it, since only the direct child is stopped. --drain-limit
(default 10 s) bounds how long the providers may go on receiving after the
devices stop; what arrives later counts as not delivered. --client-nodelay
sets TCP_NODELAY on the load's clients in fixed-rate runs: off, on, or both
(the default: off, and allow_all again with it on); --no-nodelay-variant is
--client-nodelay off. --rate-repeats (default 1) runs every fixed-rate load
that many rounds, each system back to back in each round: the fixed-rate
table then shows medians, and added p99 round by round.";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The bare-rumqttd child is this same binary.
    if let Some(i) = args.iter().position(|a| a == "--serve-rumqttd") {
        let v4 = args[i + 1].parse()?;
        let v5 = args[i + 2].parse()?;
        harness::rumqttd::serve(v4, v5, &PathBuf::from(&args[i + 3]));
    }
    // `cargo test --all-targets` runs bench targets without `--bench`; the
    // smoke test (tests/bench_smoke.rs) is what runs the harness there.
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e: not run under `cargo test`; use `cargo bench --bench e2e` (tests/bench_smoke.rs runs it in quick mode)");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut opts = Options::full(
        PathBuf::from(env!("CARGO_BIN_EXE_consentry")),
        Box::new(move |v4, v5, auth| {
            let mut c = Command::new(&exe);
            c.arg("--serve-rumqttd")
                .arg(v4.to_string())
                .arg(v5.to_string())
                .arg(auth);
            c
        }),
    );
    opts.out_dir = harness::default_out_dir();
    let user_args: Vec<&String> = args.iter().filter(|a| *a != "--bench").collect();
    opts.command = format!(
        "cargo bench --bench e2e{}{}",
        if user_args.is_empty() { "" } else { " -- " },
        user_args
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut it = user_args.into_iter();
    let list = |v: Option<&String>| -> anyhow::Result<Vec<String>> {
        Ok(v.ok_or_else(|| anyhow::anyhow!("missing value\n{USAGE}"))?
            .split(',')
            .map(str::to_string)
            .collect())
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.make_quick(),
            "--scenario" | "--scenarios" => {
                opts.scenarios = list(it.next())?
                    .iter()
                    .map(|s| {
                        Scenario::parse(s)
                            .ok_or_else(|| anyhow::anyhow!("unknown scenario {s}\n{USAGE}"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--qos" => {
                opts.qos = list(it.next())?
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--systems" => {
                opts.systems = list(it.next())?
                    .iter()
                    .map(|s| match s.as_str() {
                        "rumqttd" => Ok(SystemKind::Rumqttd),
                        "consentry" => Ok(SystemKind::Consentry),
                        "mosquitto" => Ok(SystemKind::Mosquitto),
                        _ => Err(anyhow::anyhow!("unknown system {s}\n{USAGE}")),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--duration" => {
                opts.duration = Duration::from_secs_f64(list(it.next())?[0].parse()?);
                opts.overload_duration = opts.duration;
            }
            "--drain-limit" => {
                opts.drain_limit = Duration::from_secs_f64(list(it.next())?[0].parse()?)
            }
            "--overload-duration" => {
                opts.overload_duration = Duration::from_secs_f64(list(it.next())?[0].parse()?)
            }
            "--consume-rate" => opts.consume_rate = list(it.next())?[0].parse()?,
            "--overload-max-messages" => {
                opts.overload_max_messages = list(it.next())?[0].parse()?
            }
            "--repeats" => opts.repeats = list(it.next())?[0].parse()?,
            "--rate-repeats" => opts.rate_repeats = list(it.next())?[0].parse()?,
            "--rates" => {
                opts.rates = list(it.next())?
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--no-half-max" => opts.half_max = false,
            "--no-nodelay-variant" => opts.client_nodelay = harness::ClientNodelay::Off,
            "--client-nodelay" => {
                opts.client_nodelay = harness::ClientNodelay::parse(&list(it.next())?[0])
                    .map_err(anyhow::Error::msg)?
            }
            "--devices" => opts.devices = list(it.next())?[0].parse()?,
            "--idle-devices" => opts.idle_devices = list(it.next())?[0].parse()?,
            "--trickle-rate" => opts.trickle_rate = list(it.next())?[0].parse()?,
            "--out" => opts.out_dir = PathBuf::from(&list(it.next())?[0]),
            "--consentry-bin" => opts.consentry_bin = PathBuf::from(&list(it.next())?[0]),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let results = harness::run_all(&opts)?;
    println!("{}", harness::report::markdown(&results));
    println!("wrote {}/latest.{{json,md,svg}}", opts.out_dir.display());
    Ok(())
}
