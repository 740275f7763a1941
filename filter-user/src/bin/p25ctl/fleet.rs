//! `p25ctl fleet`: manage the policy and allowlist that every router of a fleet follows
//! from etcd (docs/fleet.md). Talks to etcd only, never to the local p25d.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use filter_user::{
    fleet::{
        self, Layout,
        etcd::{self as store, within},
        keys::{DEFAULT_PREFIX, allow_key_name},
        values::{self, AllowValue, RouterStatus},
        views::{
            FleetAllowView, FleetDenyView, FleetListView, FleetStatusView, PushView, RouterView,
            SourceView,
        },
    },
    policy::{MAX_POLICY_BYTES, PolicyError},
};

/// `p25ctl fleet` arguments.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// etcd endpoints, comma-separated (http://host:port).
    #[arg(long, env = "P25_ETCD")]
    etcd: String,
    /// The prefix of the fleet's keys.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    etcd_prefix: String,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Check a policy file here, then store it as the fleet's policy.
    #[command(
        after_help = "Example:\n  p25ctl fleet --etcd http://etcd1:2379 push /etc/p25/fleet-policy.yaml"
    )]
    Push {
        /// The policy file (YAML, without list files).
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Allow an address or prefix on every router of the fleet.
    #[command(
        after_help = "Examples:\n  p25ctl fleet allow 198.51.100.25 --comment \"ticket 4711\"\n  \
        p25ctl fleet allow 2001:db8:40::/64 --expires 7d\n  \
        p25ctl fleet allow 192.0.2.0/24 --expires 2027-01-01T00:00:00Z"
    )]
    Allow {
        /// IPv4/IPv6 address or CIDR prefix (host bits must be clear).
        prefix: String,
        /// Why, for whom.
        #[arg(long)]
        comment: Option<String>,
        /// When the entry ends: a duration from now (7d, 12h) or an RFC 3339 time in UTC.
        #[arg(long)]
        expires: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a fleet allow entry.
    #[command(after_help = "Example:\n  p25ctl fleet deny 198.51.100.25")]
    Deny {
        /// The address or prefix given to `fleet allow`.
        prefix: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the fleet allow entries (with the ones routers skip, and why).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show each router: the revision it applied, when it was last seen, whether it is in
    /// sync.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `p25ctl fleet`.
pub fn run(args: &FleetArgs) -> Result<()> {
    let layout = Layout::new(&args.etcd_prefix)?;
    let endpoints = store::endpoints(&args.etcd)?;
    // Checked before connecting: a bad file is refused even with etcd down.
    let pushed = match &args.command {
        FleetCommand::Push { file, .. } => Some(check_file(file)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut client = store::connect(&endpoints).await?;
        match &args.command {
            FleetCommand::Push { json, .. } => {
                let (text, view) = pushed.context("the checked policy")?;
                let view = push(&mut client, &layout, text, view).await?;
                show(*json, &view, |view| {
                    for warning in &view.warnings {
                        println!("warning: {warning}");
                    }
                    println!(
                        "pushed {} at revision {}: {} subscriber prefixes, {} allowlist entries",
                        view.key, view.revision, view.subscribers, view.allow
                    );
                })
            }
            FleetCommand::Allow {
                prefix,
                comment,
                expires,
                json,
            } => {
                let view = allow(&mut client, &layout, prefix, comment, expires.as_deref()).await?;
                show(*json, &view, |view| match &view.expires {
                    Some(at) => println!(
                        "fleet: allowed {} until {at} (revision {})",
                        view.prefix, view.revision
                    ),
                    None => println!(
                        "fleet: allowed {} (revision {})",
                        view.prefix, view.revision
                    ),
                })
            }
            FleetCommand::Deny { prefix, json } => {
                let view = deny(&mut client, &layout, prefix).await?;
                show(*json, &view, |view| {
                    println!(
                        "fleet: removed {} (revision {})",
                        view.prefix, view.revision
                    );
                })
            }
            FleetCommand::List { json } => {
                show(*json, &list(&mut client, &layout).await?, print_list)
            }
            FleetCommand::Status { json } => {
                show(*json, &status(&mut client, &layout).await?, print_status)
            }
        }
    })
}

/// Prints `view` as JSON, or for people with `print`.
fn show<T: serde::Serialize>(json: bool, view: &T, print: impl FnOnce(&T)) -> Result<()> {
    if json {
        return crate::print_json(view);
    }
    print(view);
    Ok(())
}

/// Reads and checks a policy file exactly as p25d will check it in etcd: the same
/// diagnostics, `file:line:col`, and list files refused.
fn check_file(file: &std::path::Path) -> Result<(String, PushView)> {
    let len = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    if len > MAX_POLICY_BYTES as u64 {
        bail!(
            "{} is {len} bytes long; a policy in etcd may have at most {MAX_POLICY_BYTES}",
            file.display()
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = file.display().to_string();
    let checked = match fleet::check_document(&text, &name) {
        Ok(checked) => checked,
        Err(PolicyError::Invalid(diagnostics)) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            bail!(
                "{name} is not a valid fleet policy ({} problems above); nothing was pushed",
                diagnostics.len()
            );
        }
        Err(e) => return Err(e.into()),
    };
    let view = PushView {
        key: String::new(),
        revision: 0,
        subscribers: checked.policy.subscribers.len(),
        allow: checked.policy.allow_len(),
        warnings: checked.warnings.iter().map(ToString::to_string).collect(),
    };
    Ok((text, view))
}

async fn push(
    client: &mut Client,
    layout: &Layout,
    text: String,
    mut view: PushView,
) -> Result<PushView> {
    let key = layout.policy();
    let response = within("storing the policy", client.put(key.clone(), text, None)).await?;
    view.key = key;
    view.revision = response.header().map_or(0, |h| h.revision());
    Ok(view)
}

/// `--expires`: a duration from now, or an RFC 3339 time in UTC.
fn expiry(text: &str, now: SystemTime) -> Result<String> {
    let at = match humantime::parse_duration(text) {
        Ok(after) => values::expires_after(now, after.max(Duration::from_secs(1))),
        Err(_) => text.to_owned(),
    };
    values::check_expiry(&at, now)
        .map_err(|why| anyhow::anyhow!("--expires {text}: {why}; or give a duration such as 7d"))?;
    Ok(at)
}

async fn allow(
    client: &mut Client,
    layout: &Layout,
    prefix: &str,
    comment: &Option<String>,
    expires: Option<&str>,
) -> Result<FleetAllowView> {
    let net = crate::parse_prefix(prefix)?;
    let now = SystemTime::now();
    if let Some(comment) = comment {
        values::check_text(comment).map_err(|why| anyhow::anyhow!("--comment: {why}"))?;
    }
    let value = AllowValue {
        prefix: net.to_string(),
        comment: comment.clone(),
        expires: expires.map(|t| expiry(t, now)).transpose()?,
    };
    let bytes = serde_json::to_vec(&value)?;
    // The same check the routers make: what is written here is never skipped there.
    values::check_allow(&allow_key_name(net), &bytes, now)
        .map_err(|why| anyhow::anyhow!("{why}"))?;
    let key = layout.allow(net);
    let response = within(
        "storing the allow entry",
        client.put(key.clone(), bytes, None),
    )
    .await?;
    Ok(FleetAllowView {
        key,
        prefix: value.prefix,
        comment: value.comment,
        expires: value.expires,
        revision: response.header().map_or(0, |h| h.revision()),
        error: None,
    })
}

async fn deny(client: &mut Client, layout: &Layout, prefix: &str) -> Result<FleetDenyView> {
    let net = crate::parse_prefix(prefix)?;
    let key = layout.allow(net);
    let response = within("removing the allow entry", client.delete(key.clone(), None)).await?;
    if response.deleted() == 0 {
        bail!(
            "{net} has no fleet allow entry ({key} does not exist); `p25ctl fleet list` shows \
             the entries"
        );
    }
    Ok(FleetDenyView {
        key,
        prefix: net.to_string(),
        revision: response.header().map_or(0, |h| h.revision()),
    })
}

async fn list(client: &mut Client, layout: &Layout) -> Result<FleetListView> {
    let mut response = within(
        "reading the allow entries",
        client.get(layout.allow_dir(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let now = SystemTime::now();
    let dir = layout.allow_dir();
    let allow = response
        .take_kvs()
        .into_iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key.strip_prefix(&dir).unwrap_or(&key).to_owned();
            let checked = values::check_allow(&name, kv.value(), now);
            let raw: Option<AllowValue> = serde_json::from_slice(kv.value()).ok();
            FleetAllowView {
                prefix: raw.as_ref().map_or(name, |v| v.prefix.clone()),
                comment: raw.as_ref().and_then(|v| v.comment.clone()),
                expires: raw.and_then(|v| v.expires),
                revision: kv.mod_revision(),
                error: checked.err(),
                key,
            }
        })
        .collect();
    Ok(FleetListView { revision, allow })
}

async fn status(client: &mut Client, layout: &Layout) -> Result<FleetStatusView> {
    // What a router must have applied: every change to the policy and allow keys. The
    // newest put is the highest mod revision in the range; a delete leaves no key behind,
    // so for each router revision r the range's key count at r is compared with the count
    // now: any change after r either is a put (mod revision > r) or changes the count.
    let (start, end) = layout.watched_range();
    let newest = within(
        "reading the policy and allow keys",
        client.get(
            start.clone(),
            Some(
                GetOptions::new()
                    .with_range(end.clone())
                    .with_keys_only()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1),
            ),
        ),
    )
    .await?;
    let latest_change = newest
        .kvs()
        .first()
        .map_or(0, etcd_client::KeyValue::mod_revision);
    let count_now = newest.count();
    let mut routers_response = within(
        "reading the routers' registrations",
        client.get(layout.routers_dir(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = routers_response.header().map_or(0, |h| h.revision());
    let mut counts: BTreeMap<i64, Option<i64>> = BTreeMap::new();
    let mut routers = Vec::new();
    for kv in routers_response.take_kvs() {
        if !matches!(layout.classify(kv.key()), fleet::keys::Key::Status(_)) {
            continue;
        }
        let Ok(status) = serde_json::from_slice::<RouterStatus>(kv.value()) else {
            continue;
        };
        let last_seen_secs_ago = if kv.lease() == 0 {
            None
        } else {
            match within(
                "reading a lease",
                client.lease_time_to_live(kv.lease(), None),
            )
            .await
            {
                Ok(lease) if lease.ttl() >= 0 => Some(lease.granted_ttl() - lease.ttl()),
                _ => None,
            }
        };
        let r = status.revision;
        let caught_up = if r < latest_change || r <= 0 {
            false
        } else {
            let count = match counts.get(&r) {
                Some(count) => *count,
                None => {
                    // None: the revision is compacted away (or unreadable): not known to
                    // be in sync.
                    let count = within(
                        "counting the policy and allow keys at a router's revision",
                        client.get(
                            start.clone(),
                            Some(
                                GetOptions::new()
                                    .with_range(end.clone())
                                    .with_count_only()
                                    .with_revision(r),
                            ),
                        ),
                    )
                    .await
                    .ok()
                    .map(|response| response.count());
                    counts.insert(r, count);
                    count
                }
            };
            count == Some(count_now)
        };
        routers.push(RouterView {
            in_sync: caught_up && status.error.is_none(),
            status,
            last_seen_secs_ago,
        });
    }
    routers.sort_by(|a, b| a.status.router.cmp(&b.status.router));
    Ok(FleetStatusView {
        revision,
        latest_change,
        routers,
    })
}

fn print_list(view: &FleetListView) {
    println!(
        "FLEET ALLOWLIST ({} entries, revision {})",
        view.allow.len(),
        view.revision
    );
    println!("{:<44} {:<21} COMMENT", "PREFIX", "EXPIRES");
    for e in &view.allow {
        let comment = e.comment.as_deref().unwrap_or("");
        println!(
            "{:<44} {:<21} {comment}",
            e.prefix,
            e.expires.as_deref().unwrap_or("-")
        );
        if let Some(error) = &e.error {
            println!("  SKIPPED BY ROUTERS: {} : {error}", e.key);
        }
    }
}

fn print_status(view: &FleetStatusView) {
    println!(
        "store revision {}, latest policy/allow change at {}",
        view.revision, view.latest_change
    );
    println!(
        "{:<24} {:>9} {:<21} {:>9} {:<8} {:<6} ERROR",
        "ROUTER", "REVISION", "APPLIED AT", "SEEN AGO", "IN SYNC", "ETCD"
    );
    for r in &view.routers {
        println!(
            "{:<24} {:>9} {:<21} {:>9} {:<8} {:<6} {}",
            r.status.router,
            r.status.revision,
            r.status.applied_at,
            r.last_seen_secs_ago
                .map_or("-".to_owned(), |s| format!("{s}s")),
            if r.in_sync { "yes" } else { "NO" },
            if r.status.source_up { "up" } else { "DOWN" },
            r.status
                .error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or("")
        );
    }
    if view.routers.is_empty() {
        println!("(no router is registered)");
    }
}

/// The fleet lines of `p25ctl status`.
pub fn print_source(source: &SourceView) {
    println!(
        "fleet:       {} {} (router {}), revision {}, {}",
        source.kind,
        source.location,
        source.router.as_deref().unwrap_or("?"),
        source.revision,
        if source.up {
            "following live"
        } else {
            "DOWN: filtering with the last state applied"
        }
    );
    println!("fleet allow: {} entries in force", source.fleet_allow);
    if let Some(e) = &source.last_error {
        println!("etcd error:  {e}");
    }
    for problem in &source.problems {
        println!(
            "fleet problem ({}): {}",
            problem.reason.label(),
            problem.message
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_takes_a_duration_or_a_time() -> Result<()> {
        let now = humantime::parse_rfc3339("2026-12-01T00:00:00Z")?;
        assert_eq!(expiry("1d", now)?, "2026-12-02T00:00:00Z");
        assert_eq!(expiry("2027-01-01T00:00:00Z", now)?, "2027-01-01T00:00:00Z");
        assert!(expiry("11y", now).is_err());
        assert!(expiry("soon", now).is_err());
        Ok(())
    }
}
