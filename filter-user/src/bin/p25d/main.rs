//! p25d: loads and pins the p25 dataplane, keeps its maps in sync with the policy file and
//! the runtime allowlist, and answers p25ctl.
//!
//! Stopping p25d does not stop filtering: programs, links and maps stay pinned under
//! /sys/fs/bpf/p25 and the next p25d adopts them. `p25d detach` removes everything.

mod daemon;
mod fleet;
mod linkwatch;
mod notify;
mod observe;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use filter_user::{
    control::DEFAULT_SOCKET,
    loader::{DEFAULT_PIN_ROOT, PinLayout, remove_all_pins},
    policy,
};

/// p25 daemon: port-25 filtering for ISP edge routers (MAAWG / RFC 5068).
#[derive(Debug, Parser)]
#[command(name = "p25d", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load, pin and attach the dataplane, then keep it in sync with the policy.
    #[command(
        after_help = "Examples:\n  p25d run    # /etc/p25/policy.yaml, socket /run/p25/p25.sock\n  \
        p25d run --policy lab.yaml --socket-group p25 --log-format json"
    )]
    Run(Box<RunArgs>),
    /// Validate a policy file without touching the kernel; exit 1 on any error.
    #[command(after_help = "Example:\n  p25d check /etc/p25/policy.yaml && systemctl reload p25d")]
    Check {
        /// The policy file.
        policy: PathBuf,
    },
    /// Detach and unpin everything p25 left in the kernel (programs, links, maps).
    #[command(
        after_help = "Examples:\n  systemctl stop p25d && p25d detach    # filtering stops here\n  \
        p25d detach --all-versions           # also state of older p25 releases"
    )]
    Detach {
        /// Root of the pinned state.
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Also remove pinned state left by other ABI versions.
        #[arg(long)]
        all_versions: bool,
    },
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The policy file (YAML).
    #[arg(long, default_value = "/etc/p25/policy.yaml")]
    policy: PathBuf,
    /// Where runtime allowlist entries (p25ctl allow) are persisted.
    #[arg(long, default_value = "/var/lib/p25/runtime-allow.json")]
    state: PathBuf,
    /// The control socket p25ctl talks to.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group allowed to use the control socket (besides root); the socket is mode 0660,
    /// and its directory, if p25d creates it, 0750 in this group.
    #[arg(long)]
    socket_group: Option<String>,
    /// Group whose members may change the filter through the socket (allow, deny,
    /// reload), besides root. Read-only commands need only --socket-group.
    #[arg(long, default_value = "p25-admin")]
    admin_group: String,
    /// Most runtime allowlist entries (p25ctl allow); more belong in the policy file.
    #[arg(long, default_value_t = filter_user::runtime::DEFAULT_MAX_RUNTIME_ENTRIES,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_runtime_entries: u64,
    /// Root of the pinned state on bpffs.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Re-sync the maps with the desired state this often, repairing any drift.
    #[arg(long, default_value = "30s", value_parser = nonzero_duration)]
    resync: Duration,
    /// How often to check the policy file and the interfaces for changes.
    #[arg(long, default_value = "1s", value_parser = nonzero_duration)]
    poll: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics on this address (`off` disables the exporter).
    #[arg(long, default_value = filter_user::metrics::DEFAULT_LISTEN)]
    metrics_listen: String,
    /// Also export the attempts of the N worst offenders as labelled series. Off (0) by
    /// default: it puts subscriber addresses into the metrics.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1000))]
    metrics_top_offenders: u16,
    /// Prefix length that identifies one IPv6 subscriber in the offender table. Per-/128
    /// keys would let a host evade tracking by rotating its address.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    offender_v6_prefix: u8,
    /// Alert when a subscriber makes at least this many blocked port-25 attempts within
    /// --alert-window.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    alert_threshold: u64,
    /// The offender alert window.
    #[arg(long, default_value = "5m", value_parser = nonzero_duration)]
    alert_window: Duration,
    /// How often to scan the offender table for alerts.
    #[arg(long, default_value = "1s", value_parser = nonzero_duration)]
    offender_scan: Duration,
    /// Where to write sampled drop events as JSON lines: a file (appended), `-` for stdout,
    /// or `off`.
    #[arg(long, default_value = "-")]
    events: String,
    /// Drop events per second, in total over all CPUs (enforced in the kernel, per CPU).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    events_rate: u32,
    /// Burst size of the drop-event rate limit.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    events_burst: u32,
    /// Follow the fleet policy in etcd instead of --policy: endpoints, comma-separated
    /// (http://host:port). See docs/fleet.md.
    #[arg(long, env = "P25_ETCD", conflicts_with = "policy")]
    etcd: Option<String>,
    /// The prefix of the fleet's keys in etcd.
    #[arg(long, default_value = filter_user::fleet::keys::DEFAULT_PREFIX, requires = "etcd")]
    etcd_prefix: String,
    /// This router's name in the fleet (its registration and interface override keys).
    /// Defaults to the hostname.
    #[arg(long, requires = "etcd")]
    router: Option<String>,
}

/// Parses a duration such as `1s` or `5m` that must not be zero: these flags are timer
/// periods (a zero period would spin, and tokio refuses it with a panic) or the alert
/// window (a zero window never sees two attempts).
fn nonzero_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err(format!(
            "{text:?} is zero; give a positive duration such as 100ms, 1s or 5m"
        ));
    }
    Ok(duration)
}

fn main() -> ExitCode {
    // `__generate-docs DIR` (for packaging) is not a clap subcommand, so that it shows up
    // in neither --help nor the completions it writes.
    if let Some(code) = filter_user::cli_docs::generate_if_asked::<Cli>() {
        return code;
    }
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("p25d: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("P25_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    // Colour only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Check { policy: path } => Ok(check(&path)),
        Command::Detach {
            pin_root,
            all_versions,
        } => {
            // Refused while a p25d runs on this root; held until the pins are gone.
            let _lock = daemon::lock_pin_root(&pin_root, daemon::LockFor::Detach)?;
            let layout = PinLayout::new(&pin_root);
            let mut removed = remove_all_pins(&layout)
                .with_context(|| format!("removing pinned state under {}", pin_root.display()))?;
            if all_versions {
                for (version, dir) in layout.other_versions() {
                    removed += daemon::remove_version_dir(&dir)
                        .with_context(|| format!("removing ABI v{version} state"))?;
                }
            } else {
                for (version, dir) in layout.other_versions() {
                    println!(
                        "left pinned state of ABI v{version} at {} (use --all-versions)",
                        dir.display()
                    );
                }
            }
            println!(
                "detached: removed {removed} pins under {}",
                pin_root.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            // Everything p25d creates (pins, state file, event log, directories) is private
            // unless it says otherwise: the socket gets an explicit 0660 and the runtime
            // directory 0750 in the socket group.
            // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
            unsafe { libc::umask(0o077) };
            let fleet = args
                .etcd
                .as_deref()
                .map(|etcd| {
                    fleet::FleetOptions::new(
                        etcd,
                        &args.etcd_prefix,
                        args.router.as_deref(),
                        &args.state,
                    )
                })
                .transpose()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(daemon::Options {
                policy: args.policy,
                state: args.state,
                socket: args.socket,
                socket_group: args.socket_group,
                layout: PinLayout::new(args.pin_root),
                resync: args.resync,
                poll: args.poll,
                metrics_listen: match args.metrics_listen.as_str() {
                    "off" => None,
                    addr => Some(addr.parse().with_context(|| {
                        format!("--metrics-listen {addr:?} is not an address:port or `off`")
                    })?),
                },
                metrics_top_offenders: usize::from(args.metrics_top_offenders),
                offender_v6_prefix: args.offender_v6_prefix,
                alert_threshold: args.alert_threshold,
                alert_window: args.alert_window,
                offender_scan: args.offender_scan,
                events: match args.events.as_str() {
                    "off" => daemon::EventSink::Off,
                    "-" => daemon::EventSink::Stdout,
                    path => daemon::EventSink::File(path.into()),
                },
                events_rate: args.events_rate,
                events_burst: args.events_burst,
                admin_group: args.admin_group,
                max_runtime_entries: usize::try_from(args.max_runtime_entries)
                    .unwrap_or(usize::MAX),
                fleet,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `p25d check`: prints every diagnostic as `file:line:column: message`.
fn check(path: &std::path::Path) -> ExitCode {
    match policy::load(path) {
        Ok(checked) => {
            for warning in &checked.warnings {
                println!("warning: {warning}");
            }
            let p = &checked.policy;
            println!(
                "{}: ok: {} subscriber prefixes, {} allowlist entries, {} interfaces, mode {:?}",
                path.display(),
                p.subscribers.len(),
                p.allow_len(),
                p.interfaces.len(),
                p.defaults.mode
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
