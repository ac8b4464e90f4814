//! `consentry`: thin command-line glue over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use consentry::config::{Config, Listen};
use consentry::server::Server;

#[derive(Parser)]
#[command(version, about = "MQTT broker enforcing ITU-T X.1363 PII preferences")]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "CONSENTRY_CONFIG",
        default_value = "config/consentry.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with its broker, ledger and metrics.
    Serve {
        /// MQTT listen address (overrides server.listen; "" turns the
        /// plain listener off).
        #[arg(long, env = "CONSENTRY_LISTEN")]
        listen: Option<Listen>,
        /// HTTP API listen address (overrides api.listen; "" turns it off).
        #[arg(long, env = "CONSENTRY_API_LISTEN")]
        api_listen: Option<Listen>,
        /// Prometheus listen address (overrides metrics.listen; "" turns it off).
        #[arg(long, env = "CONSENTRY_METRICS_LISTEN")]
        metrics_listen: Option<Listen>,
        /// `embedded`, mqtt://host:port or mqtts://host:port (overrides
        /// broker.upstream; mqtts needs broker.ca).
        #[arg(long, env = "CONSENTRY_UPSTREAM")]
        upstream: Option<String>,
        /// Data directory (overrides storage.data_dir).
        #[arg(long, env = "CONSENTRY_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Print an argon2id hash of a password, for the directory file.
    HashPassword {
        /// Read from standard input when omitted.
        password: Option<String>,
    },
    /// Check a configuration and its directory file without starting
    /// anything or touching the data directory; prints what they hold.
    Check,
    /// The share ledger (run with the server stopped).
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
        /// Data directory (overrides storage.data_dir).
        #[arg(long, env = "CONSENTRY_DATA_DIR", global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Consent receipts.
    Receipt {
        #[command(subcommand)]
        command: ReceiptCommand,
    },
    /// Encryption keys of the share ledger.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        /// Data directory (overrides storage.data_dir).
        #[arg(long, env = "CONSENTRY_DATA_DIR", global = true)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Walk the hash chain and signed checkpoints; name the first bad record.
    Verify,
    /// One user's share history, as JSON lines with the fields the HTTP
    /// API's history uses. Recorded in the ledger as an extract by the
    /// operator.
    Show {
        #[arg(long)]
        user: String,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// Inclusive: an RFC 3339 time (2026-11-23T08:00:00+01:00) or a date
        /// (2026-11-23), which means its start, 00:00 UTC.
        #[arg(long, value_parser = parse_time)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Exclusive: an RFC 3339 time or a date, which means its start,
        /// 00:00 UTC (`--to 2026-11-24` ends with 23 November).
        #[arg(long, value_parser = parse_time)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Who is reading, for the extract record.
        #[arg(long, env = "USER", default_value = "operator")]
        actor: String,
        /// Why, for the extract record.
        #[arg(long, default_value = "operator inspection")]
        purpose: String,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Check a receipt's signature (against a JWKS file) and its Kantara
    /// v0.8 schema; exits non-zero with the reason when either fails.
    Verify {
        /// The compact JWS, or the JSON the API returns (with its `jws`).
        file: PathBuf,
        /// The JWKS: a file, or the URL of /.well-known/jwks.json.
        #[arg(long)]
        jwks: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a ledger data key and make it active; old records stay readable.
    Rotate,
    /// Add a receipt signing key and make it active; old keys stay in the
    /// JWKS so old receipts verify. A running server signs with the new key
    /// after its next start.
    RotateReceipts,
}

/// `--from`/`--to` of `ledger show`: an RFC 3339 time, or a date meaning
/// its start in UTC.
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    Err("expected an RFC 3339 time (2026-11-23T08:00:00Z) or a date (2026-11-23)".into())
}

fn load_with_data_dir(path: &std::path::Path, data_dir: Option<PathBuf>) -> anyhow::Result<Config> {
    let mut cfg = Config::load(path)?;
    if let Some(d) = data_dir {
        cfg.storage.data_dir = d;
    }
    Ok(cfg)
}

/// Fixes glibc's mmap threshold, which otherwise rises to the size of the
/// largest block freed. A password check (argon2) takes 19 MiB: once one
/// was freed, later ones came from the malloc arenas of the threads that
/// ran them and stayed there, and a few hundred wrong passwords, which
/// anyone who reaches the port can send, left the process at ~700 MiB for
/// good. At a fixed threshold of 16 MiB such blocks are mapped and
/// unmapped each time; smaller ones come from the arenas, as they would
/// once the threshold had risen (ledger batches of a few MiB, say).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_large_blocks() {
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_large_blocks() {}

/// A file-size limit (RLIMIT_FSIZE) reached while writing sends SIGXFSZ,
/// whose default action kills the process: the ledger and the store could
/// not fail closed and be counted. Ignored, the write fails with EFBIG and
/// takes the same path as a full disk.
#[cfg(unix)]
fn file_size_limit_fails_writes() {
    // SAFETY: sets a signal's disposition to ignore; no handler runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn file_size_limit_fails_writes() {}

fn main() -> anyhow::Result<()> {
    release_large_blocks();
    file_size_limit_fails_writes();
    consentry::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            api_listen,
            metrics_listen,
            upstream,
            data_dir,
        } => {
            let mut cfg = Config::load(&cli.config)?;
            if let Some(Listen(l)) = listen {
                cfg.server.listen = l;
            }
            if let Some(Listen(a)) = api_listen {
                cfg.api.listen = a;
            }
            if let Some(Listen(m)) = metrics_listen {
                cfg.metrics.listen = m;
            }
            if let Some(u) = upstream {
                cfg.broker.upstream = u;
            }
            if let Some(d) = data_dir {
                cfg.storage.data_dir = d;
            }
            cfg.validate()?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(cfg))
        }
        Command::HashPassword { password } => {
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if password.is_empty() {
                // Its hash would let in anyone who knows the name.
                anyhow::bail!("refusing to hash an empty password");
            }
            println!("{}", consentry::auth::hash_password(&password));
            Ok(())
        }
        Command::Ledger { command, data_dir } => {
            let cfg = load_with_data_dir(&cli.config, data_dir)?;
            match command {
                LedgerCommand::Verify => match consentry::admin::verify(&cfg) {
                    Ok(report) => {
                        println!("{report}");
                        Ok(())
                    }
                    Err(e) => {
                        // Only a chain that does not check out is a failed
                        // verification; a file that cannot be read is not.
                        let tampered = e.chain().any(|c| {
                            matches!(
                                c.downcast_ref::<consentry::ledger::LedgerError>(),
                                Some(consentry::ledger::LedgerError::Tampered { .. })
                            )
                        });
                        if tampered {
                            eprintln!("ledger verification FAILED: {e:#}");
                        } else {
                            eprintln!("ledger verify could not run: {e:#}");
                        }
                        std::process::exit(1);
                    }
                },
                LedgerCommand::Show {
                    user,
                    provider,
                    kind,
                    from,
                    to,
                    actor,
                    purpose,
                } => {
                    let args = consentry::admin::ShowArgs {
                        user,
                        provider,
                        kind,
                        from,
                        to,
                        actor,
                        purpose,
                    };
                    let rt = tokio::runtime::Runtime::new()?;
                    let entries = rt.block_on(consentry::admin::show(&cfg, args))?;
                    print_lines(entries)
                }
            }
        }
        Command::Receipt {
            command: ReceiptCommand::Verify { file, jwks },
        } => {
            let result = (|| -> anyhow::Result<consentry::receipt::VerifiedReceipt> {
                let input = std::fs::read_to_string(&file)
                    .with_context(|| format!("read {}", file.display()))?;
                let keys = if jwks.starts_with("http://") || jwks.starts_with("https://") {
                    ureq::get(&jwks)
                        .timeout(std::time::Duration::from_secs(10))
                        .call()
                        .with_context(|| format!("fetch {jwks}"))?
                        .into_string()
                        .with_context(|| format!("read {jwks}"))?
                } else {
                    std::fs::read_to_string(&jwks).with_context(|| format!("read {jwks}"))?
                };
                // Jwks::from_json reports a bad JWKS in the words of a bad
                // receipt ("not a readable compact JWS"): name the input at fault.
                let keys = consentry::receipt::Jwks::from_json(&keys).map_err(|e| match e {
                    consentry::receipt::ReceiptError::Malformed(why) => {
                        anyhow::anyhow!("--jwks {jwks}: {why}")
                    }
                    other => anyhow::anyhow!("--jwks {jwks}: {other}"),
                })?;
                consentry::receipt::verify(&input, &keys)
                    .with_context(|| format!("receipt {}", file.display()))
            })();
            match result {
                Ok(v) => {
                    println!(
                        "receipt OK: signature by key {} verifies, Kantara v0.8 schema valid (jti {})",
                        v.kid, v.receipt.jti
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!("receipt verification FAILED: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        Command::Keys { command, data_dir } => {
            let cfg = load_with_data_dir(&cli.config, data_dir)?;
            match command {
                KeysCommand::Rotate => println!("{}", consentry::admin::rotate_keys(&cfg)?),
                KeysCommand::RotateReceipts => {
                    let data = consentry::server::data_dir(&cfg)?;
                    let mut keys = consentry::receipt::ReceiptKeys::open(data)?;
                    println!("new receipt signing key {}", keys.rotate()?);
                }
            }
            Ok(())
        }
        Command::Check => {
            let cfg = Config::load(&cli.config)?;
            println!("{}", consentry::server::check(&cfg, &cli.config)?);
            Ok(())
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives as soon as we say "ready" must
    // drain the server, not kill it.
    let mut signals = Signals::install()?;
    // Each client is a socket, and with the embedded broker each session is
    // three until it goes idle; the usual soft limit of 1024 would cap a
    // gateway at a few hundred devices.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let _metrics = match cfg.metrics.listen {
        Some(addr) => {
            let endpoint = consentry::metrics::install(addr)
                .await
                .with_context(|| format!("start the metrics endpoint on {addr}"))?;
            tracing::info!(addr = %endpoint.addr, "metrics on /metrics");
            Some(endpoint)
        }
        None => None,
    };
    let server = Server::start(cfg).await?;
    // Tests and scripts read these lines to find the bound ports.
    if let Some(mqtt) = server.mqtt_addr {
        println!("consentry listening mqtt={mqtt}");
    }
    if let Some(tls) = server.tls_addr {
        println!("consentry listening mqtts={tls}");
    }
    if let Some(api) = server.api_addr {
        println!("consentry listening api={api}");
    }
    println!("consentry listening ready=all");
    signals.wait(&server).await?;
    tracing::info!("shutting down");
    // A second SIGTERM or Ctrl-C cuts the drain short. Nothing recorded is
    // lost: every share record was durable before its delivery, and the
    // recovery at the next start signs the ledger's head.
    tokio::select! {
        () = server.shutdown() => Ok(()),
        () = signals.again() => {
            tracing::warn!("second signal: exiting without finishing the drain");
            std::process::exit(1);
        }
    }
}

#[cfg(unix)]
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Reloads on SIGHUP; returns on SIGTERM or SIGINT.
    async fn wait(&mut self, server: &Server) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    if let Err(e) = server.reload() {
                        tracing::error!(error = %e, "reload failed; the ACT in force stays");
                    }
                }
                _ = self.term.recv() => return Ok(()),
                _ = self.int.recv() => return Ok(()),
            }
        }
    }

    /// Returns at the next SIGTERM or SIGINT.
    async fn again(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals)
    }

    async fn wait(&mut self, _server: &Server) -> anyhow::Result<()> {
        tokio::signal::ctrl_c().await.map_err(Into::into)
    }

    async fn again(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Prints one line per item. A reader that stops early (`| head`) closes
/// the pipe: that ends the output, and is not an error.
fn print_lines<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = items
        .into_iter()
        .try_for_each(|item| writeln!(out, "{item}"))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("write to standard output")?),
    }
}
