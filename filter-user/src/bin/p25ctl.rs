//! p25ctl: operate a running p25d (allow, deny, reload) and inspect the filter (list,
//! status, stats). Read commands work without the daemon by reading the pinned maps.
//! `p25ctl fleet` manages the fleet's policy and allowlist in etcd (see fleet.rs).
//!
//! About 550 lines plus tests: the clap definitions, which are also the man page and the
//! completions, and one small text and one `--json` rendering per command. The request
//! types and views live in `filter_user::control`, shared with p25d.

// A directory of its own, so that cargo does not take the module for another binary.
#[path = "p25ctl/fleet.rs"]
mod fleet;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use filter_common::abi::{MAX_SYN_PER_MINUTE, Origin};
use filter_user::{
    KernelTables, check_prefix,
    control::{
        self, AllowEntryView, AllowedView, ClientError, DeniedView, InterfaceView, ListView,
        ReloadView, Request, Source, StatsView, StatusView, SubscriberView,
    },
    loader::{DEFAULT_PIN_ROOT, PinLayout, pinned_link_status},
    offenders::{self, OffenderView},
    parse_prefix,
    runtime::MAX_LIFETIME_SECS,
};

/// Control and inspect p25, the port-25 filter.
#[derive(Debug, Parser)]
#[command(name = "p25ctl", version)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Root of the pinned state (read when the daemon is down).
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Allowlist an address or prefix at run time (survives reloads and restarts).
    #[command(
        after_help = "Examples:\n  p25ctl allow 198.51.100.25 --comment \"customer 4711 relay\"\n  \
        p25ctl allow 2001:db8:40::/64 --expires 7d"
    )]
    Allow {
        /// IPv4/IPv6 address or CIDR prefix (host bits must be clear).
        prefix: String,
        /// Why, for whom: shown by `p25ctl list`.
        #[arg(long)]
        comment: Option<String>,
        /// Remove the entry automatically after this long (e.g. 2h, 7d; at most 10y).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Limit each source inside to this many new port-25 connections per minute.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SYN_PER_MINUTE)))]
        max_syn_per_minute: Option<u32>,
        /// How many of those may come at once (default: a minute's worth).
        #[arg(long, requires = "max_syn_per_minute", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SYN_PER_MINUTE)))]
        syn_burst: Option<u32>,
        /// Accept a prefix wider than the subscriber prefix it covers, or 0.0.0.0/0 / ::/0.
        #[arg(long)]
        force: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a runtime allowlist entry.
    #[command(after_help = "Example:\n  p25ctl deny 198.51.100.25")]
    Deny {
        /// The address or prefix given to `allow`.
        prefix: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the allowlist (policy and runtime entries, apart) and subscriber prefixes.
    #[command(after_help = "Examples:\n  p25ctl list\n  p25ctl list --json | jq '.allow[]'")]
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show attached interfaces, modes, policy generation and reload results.
    #[command(after_help = "Examples:\n  p25ctl status\n  p25ctl status --json")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the verdict and parse-outcome counters.
    #[command(after_help = "Example:\n  p25ctl stats --json")]
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make the daemon re-read its policy file now.
    #[command(after_help = "Example:\n  p25d check /etc/p25/policy.yaml && p25ctl reload")]
    Reload {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the worst offenders: subscribers with the most blocked port-25 attempts.
    #[command(after_help = "Examples:\n  p25ctl top\n  p25ctl top --limit 50 --json")]
    Top {
        /// How many rows.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Export offenders for the abuse desk: the evidence to hand to the customer.
    #[command(
        after_help = "Examples:\n  p25ctl offenders --since 1h > offenders.csv\n  \
        p25ctl offenders --since 24h --format json"
    )]
    Offenders {
        /// Only subscribers whose latest attempt is at most this old (e.g. 1h, 30m).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        /// Machine-readable output: the same as `--format json`.
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// Manage the policy and allowlist every router of a fleet follows from etcd.
    #[command(
        after_help = "Examples:\n  p25ctl fleet --etcd http://127.0.0.1:2379 push policy.yaml\n  \
        p25ctl fleet --etcd http://127.0.0.1:2379 allow 192.0.2.25 --comment relay\n  \
        P25_ETCD=http://127.0.0.1:2379 p25ctl fleet status --json"
    )]
    Fleet(fleet::FleetArgs),
}

/// Export format of `p25ctl offenders`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// Comma-separated values with a header row.
    Csv,
    /// A JSON array.
    Json,
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // `__generate-docs DIR` (for packaging) is not a clap subcommand, so that it shows up
    // in neither --help nor the completions it writes.
    if let Some(code) = filter_user::cli_docs::generate_if_asked::<Cli>() {
        return code;
    }
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("p25ctl: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Prints `view` as pretty JSON.
fn print_json(view: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(view)?);
    Ok(())
}

/// `--expires` as seconds for the daemon: at least 1, at most ten years.
fn expires_secs(expires: Duration) -> Result<u64> {
    let secs = expires.as_secs().max(1);
    if secs > MAX_LIFETIME_SECS {
        bail!(
            "--expires {} is more than 10 years; use at most 10y, or leave --expires out for \
             an entry that stays until `p25ctl deny`",
            humantime::format_duration(expires)
        );
    }
    Ok(secs)
}

fn run(cli: &Cli) -> Result<()> {
    let layout = PinLayout::new(&cli.pin_root);
    match &cli.command {
        Command::Allow {
            prefix,
            comment,
            expires,
            max_syn_per_minute,
            syn_burst,
            force,
            json,
        } => {
            let prefix = check_prefix(parse_prefix(prefix)?)?;
            let request = Request::Allow {
                prefix,
                comment: comment.clone(),
                expires_in_secs: expires.map(expires_secs).transpose()?,
                max_syn_per_minute: *max_syn_per_minute,
                syn_burst: *syn_burst,
                force: *force,
            };
            let view: AllowedView = mutate(&cli.socket, &request)?;
            if *json {
                return print_json(&view);
            }
            let limit = match (view.max_syn_per_minute, view.syn_burst) {
                (Some(rate), Some(burst)) => format!(", at most {rate} SYN/min (burst {burst})"),
                (Some(rate), None) => format!(", at most {rate} SYN/min"),
                _ => String::new(),
            };
            match &view.expires {
                Some(expires) => println!("allowed {}{limit} until {expires}", view.prefix),
                None => println!("allowed {}{limit}", view.prefix),
            }
        }
        Command::Deny { prefix, json } => {
            let prefix = check_prefix(parse_prefix(prefix)?)?;
            let view: DeniedView = mutate(&cli.socket, &Request::Deny { prefix })?;
            if *json {
                return print_json(&view);
            }
            println!("removed {} from the runtime allowlist", view.prefix);
        }
        Command::Reload { json } => {
            let view: ReloadView = mutate(&cli.socket, &Request::Reload)?;
            if *json {
                return print_json(&view);
            }
            println!("reloaded: generation {}", view.generation);
        }
        Command::List { json } => {
            let mut view = match fallback(control::list(&cli.socket, TIMEOUT))? {
                Some(view) => view,
                None => list_from_pins(&layout)?,
            };
            // The daemon streams policy entries first, then runtime ones; show them sorted.
            view.allow.sort_by_key(|e| e.prefix);
            if *json {
                return print_json(&view);
            }
            print_list(&view);
        }
        Command::Status { json } => {
            let view: StatusView =
                match fallback(control::request(&cli.socket, &Request::Status, TIMEOUT))? {
                    Some(view) => view,
                    None => status_from_pins(&layout)?,
                };
            if *json {
                return print_json(&view);
            }
            print_status(&view);
        }
        Command::Top { limit, json } => {
            let views = offenders(&cli.socket, &layout, None, Some(*limit))?;
            if *json {
                return print_json(&views);
            }
            print_top(&views);
        }
        Command::Offenders {
            since,
            format,
            json,
        } => {
            let since_secs = since.map(|d| d.as_secs());
            let views = offenders(&cli.socket, &layout, since_secs, None)?;
            if *json || *format == ExportFormat::Json {
                return print_json(&views);
            }
            print!("{}", offenders_csv(&views));
        }
        Command::Fleet(args) => fleet::run(args)?,
        Command::Stats { json } => {
            let view: StatsView =
                match fallback(control::request(&cli.socket, &Request::Stats, TIMEOUT))? {
                    Some(view) => view,
                    None => StatsView::from(&open_pins(&layout)?.counters()?),
                };
            if *json {
                return print_json(&view);
            }
            print_stats(&view);
        }
    }
    Ok(())
}

/// A change request: only the daemon may write the maps, so no daemon means an error.
fn mutate<T: serde::de::DeserializeOwned>(socket: &Path, request: &Request) -> Result<T> {
    match control::request(socket, request, TIMEOUT) {
        Ok(data) => Ok(data),
        Err(ClientError::Refused(message)) => Err(anyhow!(message)),
        Err(e @ ClientError::NotRunning { .. }) => Err(anyhow!(e)).context(
            "changes go through p25d, the single writer of the maps; start it (systemctl start p25d)",
        ),
        Err(e) => Err(e.into()),
    }
}

/// The answer of a read request, or `Ok(None)` when the daemon is down, so the caller
/// reads the pins.
fn fallback<T>(answer: Result<T, ClientError>) -> Result<Option<T>> {
    match answer {
        Ok(data) => Ok(Some(data)),
        Err(ClientError::Refused(message)) => Err(anyhow!(message)),
        Err(ClientError::NotRunning { .. }) => {
            eprintln!("p25ctl: p25d is not running; reading the pinned maps directly");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The offender table from the daemon, or from the pins when it is down.
fn offenders(
    socket: &Path,
    layout: &PinLayout,
    since_secs: Option<u64>,
    limit: Option<usize>,
) -> Result<Vec<OffenderView>> {
    match fallback(control::offenders(socket, since_secs, limit, TIMEOUT))? {
        Some(views) => Ok(views),
        None => {
            let entries = open_pins(layout)?.offenders()?;
            let views = offenders::views(&entries, &offenders::Clock::now());
            let now = filter_user::runtime::unix(std::time::SystemTime::now());
            Ok(control::filter_offenders(views, since_secs, limit, now))
        }
    }
}

fn print_top(views: &[OffenderView]) {
    if views.is_empty() {
        println!("no offenders: no blocked port-25 attempts recorded");
        return;
    }
    println!(
        "{:<4} {:<26} {:>9}  {:<20}  {:<28} verdict",
        "rank", "subscriber", "attempts", "last seen", "last destination"
    );
    for (rank, v) in views.iter().enumerate() {
        println!(
            "{:<4} {:<26} {:>9}  {:<20}  {:<28} {}",
            rank + 1,
            v.subscriber.to_string(),
            v.attempts,
            v.last_seen,
            v.last_destination.to_string(),
            v.last_verdict
        );
    }
}

/// RFC 4180 CSV. Every field is an address, a number or a timestamp, so none needs
/// quoting; that is asserted by the unit test rather than assumed silently.
fn offenders_csv(views: &[OffenderView]) -> String {
    let mut out =
        String::from("subscriber,attempts,first_seen,last_seen,last_destination,last_verdict\n");
    for v in views {
        out.push_str(&format!(
            "{},{},{},{},{},{}\n",
            v.subscriber, v.attempts, v.first_seen, v.last_seen, v.last_destination, v.last_verdict
        ));
    }
    out
}

fn open_pins(layout: &PinLayout) -> Result<KernelTables> {
    KernelTables::open_pinned(layout).with_context(|| {
        format!(
            "reading the pinned maps under {} (is p25 loaded?)",
            layout.dir().display()
        )
    })
}

fn list_from_pins(layout: &PinLayout) -> Result<ListView> {
    let tables = open_pins(layout)?;
    Ok(ListView {
        allow: tables
            .allowlist()?
            .into_iter()
            .map(|(prefix, value)| AllowEntryView {
                prefix,
                source: if value.origin == Origin::RUNTIME {
                    Source::Runtime
                } else {
                    Source::Policy
                },
                comment: None,
                owner: None,
                expires: None,
                max_syn_per_minute: (value.syn_per_minute != 0).then_some(value.syn_per_minute),
                syn_burst: (value.syn_per_minute != 0).then_some(value.syn_burst),
            })
            .collect(),
        subscribers: tables
            .subscribers()?
            .into_iter()
            .map(|(prefix, value)| SubscriberView {
                prefix,
                mode: value.mode.name().into(),
                action: value.action.name().into(),
            })
            .collect(),
    })
}

fn status_from_pins(layout: &PinLayout) -> Result<StatusView> {
    let tables = open_pins(layout)?;
    let config = tables.config()?;
    Ok(StatusView {
        daemon: false,
        policy: String::new(),
        generation: config.generation,
        mode: config.mode.name().into(),
        fragments: config.fragments.name().into(),
        reloads_ok: 0,
        reloads_failed: 0,
        last_error: None,
        interfaces: pinned_link_status(layout)
            .into_iter()
            .map(|l| InterfaceView {
                name: l.interface,
                role: String::new(),
                hook: format!("{:?}", l.hook).to_lowercase(),
                attached: l.ifindex.is_some(),
                note: if l.ifindex.is_some() {
                    String::new()
                } else {
                    "link defunct: the interface is gone".into()
                },
            })
            .collect(),
        subscribers: tables.subscribers()?.len(),
        allow: tables.allowlist()?.len(),
        runtime_allow: 0,
        pins: layout.dir().display().to_string(),
        source: None,
    })
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Policy => "policy",
        Source::Runtime => "runtime",
        Source::PolicyAndRuntime => "policy+runtime",
    }
}

fn print_list(view: &ListView) {
    println!("ALLOWLIST ({} entries)", view.allow.len());
    println!(
        "{:<44} {:<15} {:<21} {:<17} COMMENT",
        "PREFIX", "SOURCE", "EXPIRES", "SYN LIMIT"
    );
    for e in &view.allow {
        let comment = match (&e.comment, &e.owner) {
            (Some(c), Some(o)) => format!("{c} (owner: {o})"),
            (Some(c), None) => c.clone(),
            (None, Some(o)) => format!("(owner: {o})"),
            (None, None) => String::new(),
        };
        let limit = match (e.max_syn_per_minute, e.syn_burst) {
            (Some(rate), Some(burst)) => format!("{rate}/min b{burst}"),
            (Some(rate), None) => format!("{rate}/min"),
            _ => "-".to_owned(),
        };
        println!(
            "{:<44} {:<15} {:<21} {limit:<17} {comment}",
            e.prefix.to_string(),
            source_name(e.source),
            e.expires.as_deref().unwrap_or("-")
        );
    }
    println!();
    println!("SUBSCRIBER PREFIXES ({})", view.subscribers.len());
    for s in &view.subscribers {
        println!("{:<44} {:<8} {}", s.prefix.to_string(), s.mode, s.action);
    }
}

fn print_status(view: &StatusView) {
    let source = if view.daemon {
        "p25d"
    } else {
        "pinned maps (p25d not running)"
    };
    println!("source:      {source}");
    if !view.policy.is_empty() {
        println!("policy:      {}", view.policy);
    }
    println!("generation:  {}", view.generation);
    println!("mode:        {}   fragments: {}", view.mode, view.fragments);
    if view.daemon {
        println!(
            "reloads:     {} ok, {} rejected",
            view.reloads_ok, view.reloads_failed
        );
    }
    if let Some(e) = &view.last_error {
        println!("last reload: REJECTED: {e}");
    }
    if let Some(source) = &view.source
        && source.kind != "file"
    {
        fleet::print_source(source);
    }
    println!(
        "maps:        {} subscriber prefixes, {} allowlist entries ({} runtime)",
        view.subscribers, view.allow, view.runtime_allow
    );
    println!("pins:        {}", view.pins);
    println!("interfaces:");
    for i in &view.interfaces {
        let state = if i.attached {
            "attached"
        } else {
            "NOT ATTACHED"
        };
        println!(
            "  {:<16} {:<11} {:<4} {state} {}",
            i.name, i.role, i.hook, i.note
        );
    }
}

fn print_stats(view: &StatsView) {
    println!(
        "{:<9} {:<5} {:<12} {:>14} {:>16}",
        "DIRECTION", "FAMILY", "VERDICT", "PACKETS", "BYTES"
    );
    for c in &view.verdicts {
        println!(
            "{:<9} {:<5} {:<12} {:>14} {:>16}",
            c.direction, c.family, c.name, c.packets, c.bytes
        );
    }
    println!();
    println!("{:<28} {:>14} {:>16}", "PARSE OUTCOME", "PACKETS", "BYTES");
    for c in &view.parse {
        println!("{:<28} {:>14} {:>16}", c.name, c.packets, c.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offenders_csv_has_a_header_and_one_plain_row_per_offender() -> Result<()> {
        let view = OffenderView {
            subscriber: "2001:db8:100:7::/64".parse()?,
            attempts: 150,
            first_seen: "2026-11-25T08:00:00Z".into(),
            last_seen: "2026-11-25T08:00:05Z".into(),
            last_destination: "[2001:db8:2::25]:25".parse()?,
            last_verdict: "dropped".into(),
            last_seen_unix: 0,
        };
        let csv = offenders_csv(&[view]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines.get(1).copied(),
            Some(
                "2001:db8:100:7::/64,150,2026-11-25T08:00:00Z,2026-11-25T08:00:05Z,[2001:db8:2::25]:25,dropped"
            )
        );
        // Six fields per row, so no field contained a comma or needed quoting.
        assert!(lines.iter().all(|l| l.split(',').count() == 6));
        Ok(())
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
