//! The p25 demo: `cargo xtask demo [--keep | --down]` builds everything and runs this.
//!
//! It builds the SMTP lab of `p25_tests::smtp_lab` (subscribers with swaks, a border
//! router running p25d with `policies/lab.yaml`, an internet host with aiosmtpd on 25,
//! 587 and 465), shows who can send mail where, then the operator's view (`p25ctl top`,
//! `/metrics`), a runtime exemption with `p25ctl allow` / `deny`, and monitor mode. Every
//! result is also checked: the demo exits non-zero if p25 did not do its job, so CI runs
//! it as a test. Unless `--keep` is given it tears the lab down and checks that nothing
//! (namespaces, pins, BPF links, processes) is left.
//!
//! Internal arguments (xtask parses the user-facing ones): `--keep`, `--down`.

use std::{net::IpAddr, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};
use p25_tests::{
    daemon::bin,
    demo::{Checks, heading},
    exporter::{METRICS_ADDR, scrape},
    smtp_lab::{
        self, Attempt, BLOCK_TIMEOUT, DELIVERY_TIMEOUT, DEMO_DIR, DEMO_PIN_ROOT, HOSTS,
        MAILING_SUBSCRIBERS, Naming, Outcome, PORTS, Role, SMTP, SmtpLab, spec,
    },
};

/// How many times the infected subscriber tries port 25 in its burst.
const BOT_ATTEMPTS: usize = 24;
/// Mails the monitor-pool subscriber sends.
const POOL_MAILS: usize = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    let down = args.iter().any(|a| a == "--down");
    if let Some(bad) = args.iter().find(|a| *a != "--keep" && *a != "--down") {
        eprintln!("p25-demo: unknown argument {bad:?} (use `cargo xtask demo --help`)");
        return ExitCode::FAILURE;
    }
    let result = if down { run_down() } else { run(keep) };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("p25-demo: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run_down() -> Result<bool> {
    let removed = smtp_lab::teardown_demo()?;
    if removed.is_empty() {
        println!("no demo lab is running: nothing to remove");
    } else {
        for what in removed {
            println!("removed {what}");
        }
    }
    Ok(true)
}

fn run(keep: bool) -> Result<bool> {
    let leftovers = smtp_lab::demo_leftovers();
    if !leftovers.is_empty() {
        println!(
            "removing a demo lab left from an earlier run ({} items)",
            leftovers.len()
        );
        smtp_lab::teardown_demo()?;
    }
    let started = Instant::now();
    println!("p25 demo: port-25 management (MAAWG \"Managing Port 25\", RFC 5068) on a border");
    println!("router, with real SMTP clients (swaks) and a real SMTP server (aiosmtpd).");
    println!("building the lab: network namespaces, p25d with policies/lab.yaml, aiosmtpd ...");
    let lab = SmtpLab::build(Naming::Demo)?;
    let mut checks = Checks::default();
    print_topology();

    mail_table(&lab, &mut checks)?;
    spam_bot(&lab, &mut checks)?;
    top(&lab, &mut checks)?;
    metrics(&lab)?;
    allow_deny(&lab, &mut checks)?;
    monitor(&lab, &mut checks)?;

    heading("Result");
    let ok = checks.failed.is_empty();
    if ok {
        println!(
            "all {} checks as expected: 587 and 465 delivered for everyone, port 25 only \
             for the allowlisted business customer (and outside subscriber space)",
            checks.passed
        );
    } else {
        println!(
            "{} checks as expected, {} NOT:",
            checks.passed,
            checks.failed.len()
        );
        for what in &checks.failed {
            println!("  - {what}");
        }
    }

    if keep {
        lab.keep()?;
        heading("The lab stays up (--keep)");
        let ctl = bin("p25ctl")?;
        println!("namespaces: ip netns list | grep p25demo-");
        println!(
            "p25ctl:     {} --socket {DEMO_DIR}/p25d/p25.sock --pin-root {DEMO_PIN_ROOT} status",
            ctl.display()
        );
        println!(
            "send mail:  nsenter --net=/run/netns/p25demo-resi swaks --server 198.51.100.25 \
             --port 587 --tls --to postmaster@mx.lab.example"
        );
        println!("remove it:  cargo xtask demo --down");
    } else {
        heading("Teardown");
        let mut links = lab.pinned_link_ids()?;
        links.sort_unstable();
        let namespaces = lab.namespaces().len();
        drop(lab);
        smtp_lab::wait_links_gone(&links)?;
        let left = smtp_lab::demo_leftovers();
        if left.is_empty() {
            println!(
                "removed {namespaces} namespaces, p25d and its pins (BPF links {links:?} are \
                 gone), the SMTP server and {DEMO_DIR}: nothing left"
            );
        } else {
            bail!("the demo left things behind: {}", left.join(", "));
        }
    }
    println!("demo finished in {:.0?}", started.elapsed());
    Ok(ok)
}

fn print_topology() {
    heading("The lab");
    println!(
        "  internet: mail server 198.51.100.25 / 2001:db8:2::25, SMTP on 25, 587 (STARTTLS), 465 (TLS)"
    );
    println!(
        "  router:   p25d; XDP on r-sub (access switch) and r-vlan (802.1Q VLAN 100), TC on r-up"
    );
    for host in &HOSTS {
        let v6 = host
            .v6
            .map(|(addr, _)| format!(" + {addr}"))
            .unwrap_or_default();
        println!("  {:<24} {}{v6}", host.label, host.v4);
    }
}

fn sources(role: Role) -> Result<Vec<IpAddr>> {
    Ok(spec(role).context("unknown role")?.sources())
}

fn expected(role: Role, port: u16) -> Result<Outcome> {
    Ok(spec(role).context("unknown role")?.expected(port))
}

fn label(role: Role) -> &'static str {
    spec(role).map_or("?", |h| h.label)
}

fn print_attempt(attempt: &Attempt, verdict: &str) {
    println!(
        "  {:<24} {:<22} {:>4}   {:<34} {verdict}",
        label(attempt.role),
        attempt.src.to_string(),
        attempt.port,
        attempt.outcome.describe(),
    );
}

/// Every subscriber sends one mail to each port, over each address it has.
fn mail_table(lab: &SmtpLab, checks: &mut Checks) -> Result<()> {
    heading("Every subscriber sends mail with swaks (25 plain, 587 STARTTLS, 465 TLS)");
    println!(
        "  {:<24} {:<22} {:>4}   {:<34} CHECK",
        "SUBSCRIBER", "SOURCE", "PORT", "RESULT"
    );
    let mut pending = Vec::new();
    for role in MAILING_SUBSCRIBERS {
        for src in sources(role)? {
            for port in PORTS {
                let timeout = expected(role, port)?.timeout();
                pending.push(lab.spawn_mail(role, src, port, timeout)?);
            }
        }
    }
    for attempt in pending {
        let attempt = lab.finish(attempt)?;
        let want = expected(attempt.role, attempt.port)?;
        let verdict = checks.check(
            attempt.outcome == want,
            format!(
                "{} {} port {}: {}",
                label(attempt.role),
                attempt.src,
                attempt.port,
                attempt.outcome.describe()
            ),
        );
        print_attempt(&attempt, verdict);
    }
    println!("  Outside subscriber space, p25 does not look at port 25 at all:");
    for src in sources(Role::Infra)? {
        let attempt = lab.send_mail(Role::Infra, src, SMTP, DELIVERY_TIMEOUT)?;
        let verdict = checks.check(
            attempt.outcome == Outcome::Delivered,
            format!("infrastructure {src} port 25"),
        );
        print_attempt(&attempt, verdict);
    }
    Ok(())
}

/// The infected subscriber hammers port 25, as a spam bot does.
fn spam_bot(lab: &SmtpLab, checks: &mut Checks) -> Result<()> {
    let bot = spec(Role::Infected).context("bot")?;
    heading(&format!(
        "The infected subscriber ({}) hammers port 25 like a spam bot",
        bot.v4
    ));
    let pending = (0..BOT_ATTEMPTS)
        .map(|_| lab.spawn_mail(Role::Infected, IpAddr::V4(bot.v4), SMTP, BLOCK_TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    let mut blocked = 0;
    for attempt in pending {
        if lab.finish(attempt)?.outcome == Outcome::Blocked {
            blocked += 1;
        }
    }
    let verdict = checks.check(
        blocked == BOT_ATTEMPTS,
        format!("spam bot: {blocked} of {BOT_ATTEMPTS} blocked"),
    );
    println!("  {BOT_ATTEMPTS} concurrent swaks runs to port 25: {blocked} blocked   {verdict}");
    Ok(())
}

/// `p25ctl top`: worst offenders first.
fn top(lab: &SmtpLab, checks: &mut Checks) -> Result<()> {
    heading("p25ctl top: the worst offenders, for the abuse desk");
    let text = lab.daemon.ctl_ok(&["top", "--limit", "5"])?;
    for line in text.lines() {
        println!("  {line}");
    }
    let bot = spec(Role::Infected).context("bot")?.v4.to_string();
    let first = text
        .lines()
        .find(|l| l.contains("100.64.") || l.contains("2001:db8:"));
    let verdict = checks.check(
        first.is_some_and(|l| l.contains(&bot)),
        "p25ctl top should list the infected subscriber first",
    );
    println!("  infected subscriber listed first: {verdict}");
    Ok(())
}

/// An excerpt of p25d's Prometheus endpoint.
fn metrics(lab: &SmtpLab) -> Result<()> {
    heading(&format!(
        "Prometheus metrics: GET http://{METRICS_ADDR}/metrics in the router"
    ));
    let body = scrape(&lab.router)?;
    let excerpt: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("p25_packets_total") && !l.ends_with(" 0"))
        .take(14)
        .collect();
    ensure!(
        !excerpt.is_empty(),
        "p25d's metrics show no port-25 packets after the lab's traffic:\n{}",
        body.lines().take(10).collect::<Vec<_>>().join("\n")
    );
    for line in excerpt {
        println!("  {line}");
    }
    Ok(())
}

/// A runtime exemption for the residential subscriber, then its removal.
fn allow_deny(lab: &SmtpLab, checks: &mut Checks) -> Result<()> {
    let resi = spec(Role::Residential).context("residential")?;
    let src = IpAddr::V4(resi.v4);
    heading(&format!(
        "p25ctl allow {src}: the residential customer gets an exemption"
    ));
    let said = lab.daemon.ctl_ok(&[
        "allow",
        &src.to_string(),
        "--comment",
        "demo: customer runs a mail server",
    ])?;
    println!("  $ p25ctl allow {src} --comment ...   → {}", said.trim());
    let attempt = lab.send_mail(Role::Residential, src, SMTP, DELIVERY_TIMEOUT)?;
    let verdict = checks.check(
        attempt.outcome == Outcome::Delivered,
        "residential port 25 after p25ctl allow",
    );
    print_attempt(&attempt, verdict);
    let said = lab.daemon.ctl_ok(&["deny", &src.to_string()])?;
    println!("  $ p25ctl deny {src}   → {}", said.trim());
    let attempt = lab.send_mail(Role::Residential, src, SMTP, BLOCK_TIMEOUT)?;
    let verdict = checks.check(
        attempt.outcome == Outcome::Blocked,
        "residential port 25 after p25ctl deny",
    );
    print_attempt(&attempt, verdict);
    Ok(())
}

/// Monitor mode on the new pool: mail goes through, p25 counts what it would drop.
fn monitor(lab: &SmtpLab, checks: &mut Checks) -> Result<()> {
    let pool = spec(Role::NewPool).context("pool")?;
    heading("Monitor mode: 100.64.9.0/24 is a new pool being rolled out (mode: monitor)");
    let before = lab.verdict_packets("egress", "ipv4", "would_drop")?;
    let dropped_before = lab.verdict_packets("egress", "ipv4", "dropped")?;
    let mut delivered = 0;
    for _ in 0..POOL_MAILS {
        let attempt = lab.send_mail(Role::NewPool, IpAddr::V4(pool.v4), SMTP, DELIVERY_TIMEOUT)?;
        let verdict = checks.check(
            attempt.outcome == Outcome::Delivered,
            "monitor pool port 25 should be delivered",
        );
        print_attempt(&attempt, verdict);
        delivered += usize::from(attempt.outcome == Outcome::Delivered);
    }
    let would_drop = lab.verdict_packets("egress", "ipv4", "would_drop")? - before;
    let dropped = lab.verdict_packets("egress", "ipv4", "dropped")? - dropped_before;
    let verdict = checks.check(
        would_drop > 0 && dropped == 0,
        format!("monitor mode: would_drop +{would_drop}, dropped +{dropped}"),
    );
    println!(
        "  {delivered} of {POOL_MAILS} mails delivered; p25ctl stats: would_drop +{would_drop} \
         packets (every packet of those sessions, counted and passed), dropped +{dropped}   \
         {verdict}"
    );
    Ok(())
}
