//! Floods through a veth, each against a floor measured in the same run on the same veths:
//!
//! - drop floods (SYN to 25 from subscribers, not allowlisted): p25's XDP program against
//!   an XDP_DROP floor; from one source (and against nftables doing the same job), and
//!   from many rotating sources (the generator rewrites the source of every frame,
//!   cycling through a table), IPv4 and IPv6;
//! - pass floods (SYN to 25 from allowlisted sources, many rotating): p25 against an
//!   XDP_PASS floor. A passed frame goes on into the router's stack, so the floor of a
//!   pass flood is "no filter": an XDP program that passes everything, followed by the
//!   same stack work (skb, GRO, IP receive, route lookup). The frames' destination has a
//!   blackhole route on the router, so that the stack work ends there, the same for both
//!   configurations, without an egress device (this lab has no second port to forward
//!   to). The ratio answers "how much slower does allowed mail get"; it dilutes p25's own
//!   cost with the stack's, which the per-packet section measures alone.
//!
//! Topology: a generator namespace and a router (device under test) namespace joined by a
//! veth. The DUT's veth runs its receive processing in a threaded-NAPI kernel thread
//! pinned to one CPU; the generator runs on the other CPU: `gen_xdp_tx` driven by
//! BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES` on the generator's veth (XDP_TX
//! there becomes a transmit to the peer), bounded by the run's frame count.
//!
//! The DUT's rate is what its veth queue processed (`rx_queue_0_xdp_packets`, counted
//! for every frame the queue handles, with or without an XDP program) over the
//! generator's wall time. Frames the DUT cannot keep up with are dropped at the veth ring
//! before it; the report says whether each configuration saturated the DUT.
//!
//! The many-source addresses are picked from the policy and each one is checked with a
//! test run of p25's own program before the flood: a drop flood's sources must be
//! dropped (inside an enforcing subscriber prefix, not allowlisted), a pass flood's must
//! be allowlisted entries that pass. No knowledge of the map layout is needed for that.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, XdpMode},
};
use filter_user::Dataplane;
use ipnet::IpNet;
use p25_tests::packet::Pkt;

use crate::{
    floors::{BenchObject, GEN_CONFIG, GEN_SOURCES, GENERATOR, XDP_DROP_FLOOR, XDP_PASS_FLOOR},
    netns::{Netns, veth},
    scale::PolicySet,
    stats::Stats,
    sys,
};

/// Target for p25 / XDP_DROP floor, one source.
pub const TARGET_ONE_SOURCE: f64 = 0.8;
/// Target for p25 / XDP_DROP floor, many rotating sources.
pub const TARGET_MANY_SOURCES: f64 = 0.6;
/// Target for p25 / nftables, one source.
pub const TARGET_OVER_NFT: f64 = 8.0;
/// Frames per live-frames batch (the kernel's default is 64, its maximum 256).
const GEN_BATCH: u32 = 64;
/// Capacity of the generator's source table (`GEN_SOURCES_MAX` in bench-ebpf).
pub const GEN_SOURCES_MAX: usize = 1 << 17;
/// Frames of the warm-up run of each configuration (it also sizes the measured runs).
const WARMUP_FRAMES: u32 = 200_000;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Settings.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Options {
    /// Runs per configuration.
    pub runs: usize,
    /// Most frames the generator sends per run.
    pub frames: u32,
    /// Aimed length of one run, seconds: a run's frame count is the generator's warm-up
    /// rate times this, at most `frames`.
    pub run_seconds: f64,
    /// Sources of the many-source floods.
    pub sources: usize,
    /// CPU of the DUT's receive processing.
    pub dut_cpu: usize,
    /// CPU of the generator.
    pub gen_cpu: usize,
}

/// A configuration of the DUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// An XDP program returning XDP_DROP (the floor of a drop flood).
    XdpDropFloor,
    /// An XDP program returning XDP_PASS (the floor of a pass flood).
    XdpPassFloor,
    /// p25_xdp over the maps p25d filled.
    P25Xdp,
    /// No XDP, an nftables netdev ingress chain with interval sets.
    Nftables,
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::XdpDropFloor => "XDP_DROP floor",
        Mode::XdpPassFloor => "XDP_PASS floor",
        Mode::P25Xdp => "p25_xdp",
        Mode::Nftables => "nftables",
    }
}

/// One flood: what the generator sends and which configurations receive it.
#[derive(Clone, Debug)]
struct Flood {
    name: &'static str,
    description: String,
    /// The template frame's source (the only one when `sources` is empty).
    src: IpAddr,
    dst: IpAddr,
    /// Rotating sources (empty: one source).
    sources: Vec<IpAddr>,
    drop: bool,
    modes: Vec<Mode>,
    target_over_floor: Option<f64>,
    target_over_nft: Option<f64>,
}

/// One run of one configuration.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Run {
    /// Frames the generator sent.
    pub sent: u64,
    /// Frames the DUT's queue processed.
    pub processed: u64,
    /// Frames the DUT dropped by its rule (XDP drops or the nft rule counter).
    pub dropped: u64,
    /// Generator wall time, seconds.
    pub seconds: f64,
    /// processed / seconds, in Mpps.
    pub mpps: f64,
}

/// Results of one configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModeResult {
    /// Which.
    pub mode: Mode,
    /// Every run.
    pub runs: Vec<Run>,
    /// DUT rate, Mpps.
    pub mpps: Stats,
    /// Generator rate (frames sent / wall time), Mpps.
    pub offered_mpps: Stats,
    /// Whether the DUT was the bottleneck in every run (it processed < 99% of the frames).
    pub saturated: bool,
}

/// Results of one flood.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FloodResult {
    /// Short name.
    pub name: &'static str,
    /// What it is.
    pub description: String,
    /// Distinct source addresses (1 for a one-source flood).
    pub sources: usize,
    /// What p25 does with the frames.
    pub verdict: &'static str,
    /// Per configuration.
    pub modes: Vec<ModeResult>,
    /// p25 / the floor, per run index.
    pub ratio_over_floor: Stats,
    /// p25's extra time per frame on the DUT CPU: 1/rate(p25) - 1/rate(floor), per run
    /// index, ns.
    pub net_ns_per_frame: Stats,
    /// p25 / nftables, per run index, when nftables ran.
    pub ratio_over_nft: Option<Stats>,
    /// Time spent inside p25_xdp per frame during one extra run with the kernel's BPF
    /// run-time statistics on (bpf_stats `run_time_ns / run_cnt`), ns: where the net time
    /// goes. Not taken during the measured runs, whose rates the statistics would slow.
    pub p25_prog_ns_per_frame: f64,
    /// Target for `ratio_over_floor`, if the issue sets one.
    pub target_over_floor: Option<f64>,
    /// Whether the median meets it.
    pub met_over_floor: Option<bool>,
    /// Target for `ratio_over_nft`.
    pub target_over_nft: Option<f64>,
    /// Whether the median meets it.
    pub met_over_nft: Option<bool>,
}

/// The whole section.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Settings.
    pub options: Options,
    /// nft set elements loaded (subscriber and allowlist prefixes).
    pub nft_elements: usize,
    /// Seconds `nft -f` took to load the ruleset.
    pub nft_load_seconds: f64,
    /// Per flood.
    pub floods: Vec<FloodResult>,
}

impl Report {
    /// The section as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nFloods through veth (DUT rx on CPU {}, generator on CPU {}, {} runs of ~{} s (<= {} frames) per configuration; ratios per run, same run)",
            self.options.dut_cpu,
            self.options.gen_cpu,
            self.options.runs,
            self.options.run_seconds,
            self.options.frames
        );
        let _ = writeln!(
            out,
            "{:<24} {:<15} {:>9} {:>9} {:>9} {:>11} {:>5}",
            "flood", "config", "Mpps min", "Mpps med", "Mpps max", "offered med", "satur"
        );
        for f in &self.floods {
            for m in &f.modes {
                let _ = writeln!(
                    out,
                    "{:<24} {:<15} {:>9.3} {:>9.3} {:>9.3} {:>11.3} {:>5}",
                    f.name,
                    mode_name(m.mode),
                    m.mpps.min,
                    m.mpps.median,
                    m.mpps.max,
                    m.offered_mpps.median,
                    if m.saturated { "yes" } else { "NO" }
                );
            }
        }
        let _ = writeln!(
            out,
            "\n{:<24} {:<7} {:>7} {:>23} {:>10} {:>9} {:>12} {:>12} {:>9}",
            "flood",
            "verdict",
            "sources",
            "p25/floor min/med/max",
            "net ns/frm",
            "in-prog ns",
            "target",
            "p25/nft med",
            "target"
        );
        let ok = |met: Option<bool>, target: Option<f64>| match (met, target) {
            (Some(true), Some(t)) => format!(">={t} ok"),
            (_, Some(t)) => format!(">={t} MISS"),
            _ => "-".into(),
        };
        for f in &self.floods {
            let nft = f
                .ratio_over_nft
                .map_or_else(|| "-".into(), |r| format!("{:.2}", r.median));
            let _ = writeln!(
                out,
                "{:<24} {:<7} {:>7} {:>7.3}/{:>7.3}/{:>7.3} {:>10.0} {:>9.0} {:>12} {:>12} {:>9}",
                f.name,
                f.verdict,
                f.sources,
                f.ratio_over_floor.min,
                f.ratio_over_floor.median,
                f.ratio_over_floor.max,
                f.net_ns_per_frame.median,
                f.p25_prog_ns_per_frame,
                ok(f.met_over_floor, f.target_over_floor),
                nft,
                ok(f.met_over_nft, f.target_over_nft),
            );
        }
        let _ = writeln!(
            out,
            "(nft: {} set elements, loaded in {:.1} s)",
            self.nft_elements, self.nft_load_seconds
        );
        out
    }
}

/// IPv4 header checksum (RFC 1071) of `header`.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| match c {
            [a, b] => u32::from(u16::from_be_bytes([*a, *b])),
            [a] => u32::from(*a) << 8,
            _ => 0,
        })
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// `ethtool -S` of `dev` in `ns` as name → value.
fn nic_stats(ns: &Netns, dev: &str) -> Result<BTreeMap<String, u64>> {
    let out = ns.exec(&["ethtool", "-S", dev])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

fn stat(stats: &BTreeMap<String, u64>, key: &str) -> Result<u64> {
    stats
        .get(key)
        .copied()
        .with_context(|| format!("veth statistic {key} missing"))
}

/// Sum of the packet counters of the nft chain's rules. Slow with big sets (nft fetches
/// every set element first), so it is called once per benchmark.
fn nft_dropped(ns: &Netns, table: &str) -> Result<u64> {
    let out = ns.exec(&["nft", "-j", "list", "chain", "netdev", table, "ingress"])?;
    let json: serde_json::Value = serde_json::from_str(&out).context("parsing nft -j")?;
    let mut total = 0;
    for item in json
        .get("nftables")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        for expr in item
            .pointer("/rule/expr")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            total += expr
                .pointer("/counter/packets")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Writes and loads the nftables ruleset; returns (elements, seconds).
fn load_nft(ns: &Netns, table: &str, dev: &str, set: &PolicySet) -> Result<(usize, f64)> {
    // Named like the other temporary files, so that a sweep after a signal finds it.
    let path = std::env::temp_dir().join(format!("p25b-{}-nft.nft", std::process::id()));
    let mut text = String::with_capacity(32 * (set.subscribers.len() + set.allow.len()));
    // The same job as p25's rules: port 25 first (the cheapest test, so non-25 traffic
    // costs one comparison), then subscriber space, then not allowlisted.
    let _ = write!(
        text,
        "table netdev {table} {{\n\
         \tset subs4 {{ type ipv4_addr; flags interval; }}\n\
         \tset subs6 {{ type ipv6_addr; flags interval; }}\n\
         \tset allow4 {{ type ipv4_addr; flags interval; }}\n\
         \tset allow6 {{ type ipv6_addr; flags interval; }}\n\
         \tchain ingress {{\n\
         \t\ttype filter hook ingress device \"{dev}\" priority 0; policy accept;\n\
         \t\ttcp dport 25 ip saddr @subs4 ip saddr != @allow4 counter drop\n\
         \t\ttcp sport 25 ip daddr @subs4 ip daddr != @allow4 counter drop\n\
         \t\ttcp dport 25 ip6 saddr @subs6 ip6 saddr != @allow6 counter drop\n\
         \t\ttcp sport 25 ip6 daddr @subs6 ip6 daddr != @allow6 counter drop\n\
         \t}}\n}}\n"
    );
    let mut elements = 0;
    let mut add = |name: &str, nets: &mut dyn Iterator<Item = &IpNet>| {
        let nets: Vec<_> = nets.collect();
        for chunk in nets.chunks(20_000) {
            let list: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                text,
                "add element netdev {table} {name} {{ {} }}",
                list.join(", ")
            );
            elements += chunk.len();
        }
    };
    add(
        "subs4",
        &mut set.subscribers.iter().filter(|n| matches!(n, IpNet::V4(_))),
    );
    add(
        "subs6",
        &mut set.subscribers.iter().filter(|n| matches!(n, IpNet::V6(_))),
    );
    add(
        "allow4",
        &mut set.allow.iter().filter(|n| matches!(n, IpNet::V4(_))),
    );
    add(
        "allow6",
        &mut set.allow.iter().filter(|n| matches!(n, IpNet::V6(_))),
    );
    let mut file =
        fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    drop(file);
    let started = Instant::now();
    let result = ns.exec(&["nft", "-f", &path.display().to_string()]);
    let seconds = started.elapsed().as_secs_f64();
    let _ = fs::remove_file(&path);
    result.context("loading the nftables ruleset")?;
    Ok((elements, seconds))
}

/// Finds the threaded-NAPI kernel thread of `dev` (`napi/DEV-ID`).
fn napi_thread(dev: &str) -> Result<libc::pid_t> {
    let prefix = format!("napi/{dev}-");
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&prefix) {
            return Ok(pid);
        }
    }
    bail!("no threaded NAPI thread for {dev}")
}

/// The template frame: a SYN to 25 from `src` to `dst`, addressed to the DUT's MAC, with
/// a valid IPv4 header checksum (the stack checks it on the nftables and pass paths).
fn template(src: IpAddr, dst: IpAddr, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Result<Vec<u8>> {
    let mut frame = Pkt::tcp(src, 40_000, dst, 25).build();
    frame
        .get_mut(..6)
        .context("short frame")?
        .copy_from_slice(&dst_mac);
    frame
        .get_mut(6..12)
        .context("short frame")?
        .copy_from_slice(&src_mac);
    if src.is_ipv4() {
        let csum = ipv4_csum_with(&frame, None)?;
        frame
            .get_mut(24..26)
            .context("short frame")?
            .copy_from_slice(&csum);
    }
    Ok(frame)
}

/// The IPv4 header checksum of `frame` (untagged), with its source replaced by `src`.
fn ipv4_csum_with(frame: &[u8], src: Option<Ipv4Addr>) -> Result<[u8; 2]> {
    let mut header: [u8; 20] = frame
        .get(14..34)
        .and_then(|h| h.try_into().ok())
        .context("short IPv4 frame")?;
    header[10..12].copy_from_slice(&[0, 0]);
    if let Some(src) = src {
        header[12..16].copy_from_slice(&src.octets());
    }
    Ok(ipv4_checksum(&header).to_be_bytes())
}

/// p25_xdp's verdict on one SYN to 25 from `src` to `dst`.
fn verdict(dataplane: &mut Dataplane, src: IpAddr, dst: IpAddr) -> Result<u32> {
    let frame = Pkt::tcp(src, 40_000, dst, 25).build();
    let opts = TestRunOptions {
        data_in: Some(&frame),
        ..TestRunOptions::default()
    };
    Ok(dataplane
        .xdp()?
        .test_run(opts)
        .context("test run of p25_xdp")?
        .return_value)
}

/// Up to `n` distinct subscriber addresses of one family that p25 drops: hosts spread
/// over all subscriber prefixes of that family (one host of every prefix, then a second
/// one, ...), skipping allowlisted ones, each checked with a test run.
fn drop_sources(
    dataplane: &mut Dataplane,
    set: &PolicySet,
    allowed: &HashSet<IpAddr>,
    dst: IpAddr,
    n: usize,
) -> Result<Vec<IpAddr>> {
    let prefixes: Vec<IpNet> = set
        .subscribers
        .iter()
        .filter(|p| p.addr().is_ipv4() == dst.is_ipv4())
        .copied()
        .collect();
    let mut found = Vec::with_capacity(n);
    let mut seen = HashSet::with_capacity(n);
    // 64 hosts per prefix at most: enough for 65,536 sources at full scale.
    'rounds: for round in 0..64_u32 {
        for net in &prefixes {
            if found.len() >= n {
                break 'rounds;
            }
            let host = match net {
                // An odd multiplier visits every host of a /26 once in 64 rounds.
                IpNet::V4(v4) => {
                    let span = u32::MAX
                        .checked_shr(u32::from(v4.prefix_len()))
                        .unwrap_or(0);
                    IpAddr::V4(Ipv4Addr::from(
                        u32::from(v4.network()) | (round.wrapping_mul(37).wrapping_add(11) & span),
                    ))
                }
                // Hosts from 0x1_0000 up: never allowlisted by the generated policy.
                IpNet::V6(v6) => IpAddr::V6(Ipv6Addr::from(
                    u128::from(v6.network()) | (0x1_0000 + u128::from(round)),
                )),
            };
            if allowed.contains(&host) || !seen.insert(host) {
                continue;
            }
            if verdict(dataplane, host, dst)? == XDP_DROP {
                found.push(host);
            }
        }
    }
    Ok(found)
}

/// Up to `n` allowlisted addresses of one family that p25 passes (checked).
fn allowed_sources(
    dataplane: &mut Dataplane,
    set: &PolicySet,
    dst: IpAddr,
    n: usize,
) -> Result<Vec<IpAddr>> {
    let mut found = Vec::with_capacity(n);
    for net in set
        .allow
        .iter()
        .filter(|p| p.addr().is_ipv4() == dst.is_ipv4())
    {
        if found.len() >= n {
            break;
        }
        if verdict(dataplane, net.addr(), dst)? == XDP_PASS {
            found.push(net.addr());
        }
    }
    Ok(found)
}

/// Writes the generator's configuration: TTL/hop limit, and the source table of `flood`
/// with each source's IPv4 checksum for `frame`.
fn program_generator(bench: &mut BenchObject, frame: &[u8], flood: &Flood) -> Result<()> {
    ensure!(
        flood.sources.len() <= GEN_SOURCES_MAX,
        "{} sources, the generator holds {GEN_SOURCES_MAX}",
        flood.sources.len()
    );
    {
        let map = bench
            .ebpf_mut()
            .map_mut(GEN_SOURCES)
            .context("no GEN_SOURCES map")?;
        let mut table: Array<_, [u8; 20]> = Array::try_from(map)?;
        for (i, ip) in flood.sources.iter().enumerate() {
            // GenSource { addr: [u8; 16], ipv4_csum: [u8; 2], _pad: [u8; 2] }.
            let mut entry = [0_u8; 20];
            match ip {
                IpAddr::V4(v4) => {
                    entry[..4].copy_from_slice(&v4.octets());
                    entry[16..18].copy_from_slice(&ipv4_csum_with(frame, Some(*v4))?);
                }
                IpAddr::V6(v6) => entry[..16].copy_from_slice(&v6.octets()),
            }
            table.set(u32::try_from(i)?, entry, 0)?;
        }
    }
    let csum = if flood.src.is_ipv4() {
        ipv4_csum_with(frame, None)?
    } else {
        [0, 0]
    };
    let map = bench
        .ebpf_mut()
        .map_mut(GEN_CONFIG)
        .context("no GEN_CONFIG map")?;
    let mut config: Array<_, [u8; 8]> = Array::try_from(map)?;
    // GenConfig { ipv4_ttl, ipv6_hop_limit, ipv4_csum: [u8; 2], sources: u32 }: the
    // template's TTL and hop limit are 64.
    let mut value = [64, 64, csum[0], csum[1], 0, 0, 0, 0];
    value[4..].copy_from_slice(&u32::try_from(flood.sources.len())?.to_ne_bytes());
    config.set(0, value, 0)?;
    Ok(())
}

struct Lab {
    gen_ns: Netns,
    dut: Netns,
    dut_if: String,
    gen_ifindex: u32,
    table: String,
}

fn setup(opts: &Options, set: &PolicySet) -> Result<Lab> {
    let gen_ns = Netns::new("gen")?;
    let dut = Netns::new("dut")?;
    // Unique per process: the NAPI thread is found by this name, host-wide.
    let dut_if = format!("d{:04x}", std::process::id() & 0xFFFF);
    veth(&gen_ns, "g0", &dut, &dut_if)?;
    // GRO on gives the veth a NAPI instance without an XDP program (needed for the
    // nftables configuration: frames sent with XDP_TX need a NAPI receiver), and keeps it
    // across XDP attach/detach, so the pinned thread stays the same for every config.
    dut.exec(&["ethtool", "-K", &dut_if, "gro", "on"])?;
    dut.exec_with_sys(&[
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{dut_if}/threaded"),
    ])?;
    // The pass floods: the router forwards, and the destination's blackhole route ends
    // the stack's work at the route lookup (see the module documentation).
    dut.enable_forwarding()?;
    for key in [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
    ] {
        dut.sysctl(key, "0")?;
    }
    dut.sysctl(&format!("net.ipv4.conf.{dut_if}.rp_filter"), "0")?;
    let mx4 = IpNet::new(IpAddr::V4(set.probes.mx_v4), 24)?.trunc();
    let mx6 = IpNet::new(IpAddr::V6(set.probes.mx_v6), 48)?.trunc();
    for net in [mx4, mx6] {
        dut.ip(&["route", "add", "blackhole", &net.to_string()])?;
    }
    let napi = napi_thread(&dut_if)?;
    sys::pin_to_cpu(napi, opts.dut_cpu)?;
    let gen_ifindex = gen_ns.ifindex("g0")?;
    Ok(Lab {
        gen_ns,
        dut,
        dut_if,
        gen_ifindex,
        table: format!("p25b_{}", std::process::id()),
    })
}

/// Runs the generator once (on this thread, which is pinned to the generator CPU).
fn generate(lab: &Lab, bench: &mut BenchObject, frame: &[u8], frames: u32) -> Result<f64> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. Live-frames mode wants data = 0 and data_end = the frame length.
    let mut ctx = Vec::with_capacity(24);
    for word in [0, frame.len() as u32, 0, lab.gen_ifindex, 0, 0] {
        ctx.extend_from_slice(&word.to_ne_bytes());
    }
    let generator = bench.xdp(GENERATOR)?;
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: frames,
        attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
        ..TestRunOptions::default()
    };
    let started = Instant::now();
    // The ifindex is resolved in the calling thread's namespace: run inside the
    // generator's.
    lab.gen_ns
        .enter(|| generator.test_run(opts))?
        .context("live-frames test run of the generator")?;
    Ok(started.elapsed().as_secs_f64())
}

fn one_run(
    lab: &Lab,
    mode: Mode,
    dataplane: &mut Dataplane,
    bench: &mut BenchObject,
    flood: &Flood,
    frame: &[u8],
    frames: u32,
) -> Result<Run> {
    // Attach the configuration's XDP program, if any, for this run only.
    enum Attached {
        Floor(&'static str, aya::programs::xdp::XdpLinkId),
        P25(aya::programs::xdp::XdpLinkId),
        None,
    }
    let dev = lab.dut_if.as_str();
    let attached = lab.dut.enter(|| -> Result<Attached> {
        Ok(match mode {
            Mode::XdpDropFloor | Mode::XdpPassFloor => {
                let name = if mode == Mode::XdpDropFloor {
                    XDP_DROP_FLOOR
                } else {
                    XDP_PASS_FLOOR
                };
                Attached::Floor(name, bench.xdp(name)?.attach(dev, XdpMode::Driver)?)
            }
            Mode::P25Xdp => Attached::P25(dataplane.attach_xdp(dev, XdpMode::Driver)?),
            Mode::Nftables => Attached::None,
        })
    })??;
    let before = nic_stats(&lab.dut, dev)?;
    let result = generate(lab, bench, frame, frames);
    // Let the DUT drain its ring (at most 256 frames) before reading its counters.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let after = nic_stats(&lab.dut, dev);
    match attached {
        Attached::Floor(name, id) => bench.xdp(name)?.detach(id)?,
        Attached::P25(id) => dataplane.xdp()?.detach(id)?,
        Attached::None => {}
    }
    let (seconds, after) = (result?, after?);
    let delta = |k: &str| -> Result<u64> { Ok(stat(&after, k)?.saturating_sub(stat(&before, k)?)) };
    let processed = delta("rx_queue_0_xdp_packets")?;
    // nft's rule counters cannot be read per run: any listing makes nft fetch the
    // million set elements (tens of seconds). They are checked once, over all runs, in
    // `run`; here the frames the queue processed stand for the rule's drops.
    let dropped = match mode {
        Mode::Nftables => processed,
        _ => delta("rx_queue_0_xdp_drops")?,
    };
    ensure!(processed > 0, "{mode:?}: the DUT processed no frame");
    if flood.drop {
        ensure!(
            dropped * 100 >= processed * 99,
            "{} / {mode:?}: the DUT processed {processed} frames but dropped only {dropped}; \
             it is not doing the job being measured",
            flood.name
        );
    } else {
        ensure!(
            dropped * 100 <= processed,
            "{} / {mode:?}: the DUT processed {processed} frames and dropped {dropped} at XDP; \
             the frames should pass",
            flood.name
        );
    }
    Ok(Run {
        sent: u64::from(frames),
        processed,
        dropped,
        seconds,
        mpps: processed as f64 / seconds / 1e6,
    })
}

/// The floods of the section, sources picked and checked.
fn floods(dataplane: &mut Dataplane, set: &PolicySet, n: usize) -> Result<Vec<Flood>> {
    let p = &set.probes;
    let (mx4, mx6) = (IpAddr::V4(p.mx_v4), IpAddr::V6(p.mx_v6));
    let allowed: HashSet<IpAddr> = set.allow.iter().map(IpNet::addr).collect();
    let n = n.min(GEN_SOURCES_MAX);
    let mut floods = vec![Flood {
        name: "v4_one_source_drop",
        description: "IPv4 SYN to 25 from one subscriber address, not allowlisted".into(),
        src: IpAddr::V4(p.sub_v4),
        dst: mx4,
        sources: Vec::new(),
        drop: true,
        modes: vec![Mode::XdpDropFloor, Mode::P25Xdp, Mode::Nftables],
        target_over_floor: Some(TARGET_ONE_SOURCE),
        target_over_nft: Some(TARGET_OVER_NFT),
    }];
    for (name, dst) in [("v4_many_sources_drop", mx4), ("v6_many_sources_drop", mx6)] {
        let sources = drop_sources(dataplane, set, &allowed, dst, n)?;
        let src = *sources.first().context("no subscriber address p25 drops")?;
        floods.push(Flood {
            name,
            description: format!(
                "{} SYN to 25, source rotating over {} subscriber addresses, none allowlisted",
                if dst.is_ipv4() { "IPv4" } else { "IPv6" },
                sources.len()
            ),
            src,
            dst,
            sources,
            drop: true,
            modes: vec![Mode::XdpDropFloor, Mode::P25Xdp],
            target_over_floor: Some(TARGET_MANY_SOURCES),
            target_over_nft: None,
        });
    }
    for (name, dst) in [("v4_allowlisted_pass", mx4), ("v6_allowlisted_pass", mx6)] {
        let sources = allowed_sources(dataplane, set, dst, n)?;
        let src = *sources
            .first()
            .context("no allowlisted address p25 passes")?;
        floods.push(Flood {
            name,
            description: format!(
                "{} SYN to 25, source rotating over {} allowlisted addresses",
                if dst.is_ipv4() { "IPv4" } else { "IPv6" },
                sources.len()
            ),
            src,
            dst,
            sources,
            drop: false,
            modes: vec![Mode::XdpPassFloor, Mode::P25Xdp],
            target_over_floor: None,
            target_over_nft: None,
        });
    }
    Ok(floods)
}

/// Per-run-index ratios `x / y` of two configurations' rates.
fn ratios(x: &[Run], y: &[Run]) -> Result<Stats> {
    let r: Vec<f64> = x.iter().zip(y).map(|(x, y)| x.mpps / y.mpps).collect();
    Stats::of(&r).context("no runs")
}

/// Runs the section. The maps behind `dataplane` must already hold `set`.
pub fn run(
    opts: Options,
    dataplane: &mut Dataplane,
    bench: &mut BenchObject,
    set: &PolicySet,
) -> Result<Report> {
    ensure!(
        opts.dut_cpu != opts.gen_cpu,
        "the throughput benchmark needs two CPUs (DUT and generator)"
    );
    sys::pin_to_cpu(0, opts.gen_cpu)?;
    eprintln!("  throughput: picking and checking the flood sources");
    let floods = floods(dataplane, set, opts.sources)?;
    let lab = setup(&opts, set)?;
    let macs = (lab.gen_ns.mac("g0")?, lab.dut.mac(&lab.dut_if)?);
    eprintln!("  throughput: loading the nftables ruleset");
    let (nft_elements, nft_load_seconds) = load_nft(&lab.dut, &lab.table, &lab.dut_if, set)?;
    eprintln!("  throughput: nft loaded {nft_elements} elements in {nft_load_seconds:.1} s");
    let mut nft_loaded = true;

    let mut results = Vec::new();
    for flood in &floods {
        if nft_loaded && !flood.modes.contains(&Mode::Nftables) {
            // The chain would also see the frames the XDP programs pass, on top of the
            // floor: remove it once the floods that use it are done.
            nft_verify(&lab, &results)?;
            lab.dut
                .exec(&["nft", "delete", "table", "netdev", &lab.table])?;
            nft_loaded = false;
        }
        let frame = template(flood.src, flood.dst, macs.0, macs.1)?;
        program_generator(bench, &frame, flood)?;
        // Warm-up (page pools, NAPI thread, caches, the offender table), which also sizes
        // the runs: the generator's rate times the aimed run length.
        let mut frames = BTreeMap::new();
        for &mode in &flood.modes {
            let warm = one_run(&lab, mode, dataplane, bench, flood, &frame, WARMUP_FRAMES)?;
            let offered = warm.sent as f64 / warm.seconds;
            let sized = (offered * opts.run_seconds)
                .clamp(f64::from(WARMUP_FRAMES), f64::from(opts.frames));
            frames.insert(mode, sized as u32);
        }
        let mut runs: BTreeMap<Mode, Vec<Run>> = BTreeMap::new();
        for i in 0..opts.runs {
            for k in 0..flood.modes.len() {
                let mode = *flood
                    .modes
                    .get((k + i) % flood.modes.len())
                    .context("mode")?;
                let n = frames.get(&mode).copied().unwrap_or(WARMUP_FRAMES);
                let run = one_run(&lab, mode, dataplane, bench, flood, &frame, n)?;
                eprintln!(
                    "  throughput: {} run {}/{} {:<15} {:.3} Mpps ({} of {} frames processed)",
                    flood.name,
                    i + 1,
                    opts.runs,
                    mode_name(mode),
                    run.mpps,
                    run.processed,
                    run.sent
                );
                runs.entry(mode).or_default().push(run);
            }
        }
        let prog_ns = prog_ns_per_frame(&lab, dataplane, bench, flood, &frame, &frames)?;
        results.push(flood_result(flood, runs, prog_ns)?);
    }
    if nft_loaded {
        nft_verify(&lab, &results)?;
    }
    drop(lab);
    Ok(Report {
        options: opts,
        nft_elements,
        nft_load_seconds,
        floods: results,
    })
}

/// Every frame nftables processed in the measured runs must have been dropped by its
/// rules (the counters include the warm-up, so they may exceed it).
fn nft_verify(lab: &Lab, results: &[FloodResult]) -> Result<()> {
    let nft_processed: u64 = results
        .iter()
        .flat_map(|f| &f.modes)
        .filter(|m| m.mode == Mode::Nftables)
        .flat_map(|m| &m.runs)
        .map(|r| r.processed)
        .sum();
    let nft_counted = nft_dropped(&lab.dut, &lab.table)?;
    ensure!(
        nft_counted * 100 >= nft_processed * 99,
        "nftables dropped {nft_counted} frames in all, but processed {nft_processed} in the \
         measured runs: it is not doing the job being measured"
    );
    Ok(())
}

/// One more p25 run of `flood`, with BPF run-time statistics on: ns spent in p25_xdp per
/// frame it ran on.
fn prog_ns_per_frame(
    lab: &Lab,
    dataplane: &mut Dataplane,
    bench: &mut BenchObject,
    flood: &Flood,
    frame: &[u8],
    frames: &BTreeMap<Mode, u32>,
) -> Result<f64> {
    let n = frames.get(&Mode::P25Xdp).copied().unwrap_or(WARMUP_FRAMES);
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let before = dataplane.xdp()?.info()?;
    let run = one_run(lab, Mode::P25Xdp, dataplane, bench, flood, frame, n);
    let after = dataplane.xdp()?.info();
    drop(stats);
    let (_, after) = (run?, after?);
    let ns = after
        .run_time()
        .saturating_sub(before.run_time())
        .as_nanos() as f64;
    let count = after.run_count().saturating_sub(before.run_count());
    ensure!(count > 0, "p25_xdp did not run with statistics on");
    Ok(ns / count as f64)
}

fn flood_result(
    flood: &Flood,
    runs: BTreeMap<Mode, Vec<Run>>,
    p25_prog_ns_per_frame: f64,
) -> Result<FloodResult> {
    let get = |m: Mode| runs.get(&m).cloned().unwrap_or_default();
    let floor_mode = *flood
        .modes
        .first()
        .context("flood without configurations")?;
    let (floor, p25) = (get(floor_mode), get(Mode::P25Xdp));
    let ratio_over_floor = ratios(&p25, &floor)?;
    let net: Vec<f64> = p25
        .iter()
        .zip(&floor)
        .map(|(p, f)| 1e3 / p.mpps - 1e3 / f.mpps)
        .collect();
    let net_ns_per_frame = Stats::of(&net).context("no runs")?;
    let ratio_over_nft = if flood.modes.contains(&Mode::Nftables) {
        Some(ratios(&p25, &get(Mode::Nftables))?)
    } else {
        None
    };
    let mut modes = Vec::new();
    for (mode, runs) in runs {
        let mpps: Vec<f64> = runs.iter().map(|r| r.mpps).collect();
        let offered: Vec<f64> = runs
            .iter()
            .map(|r| r.sent as f64 / r.seconds / 1e6)
            .collect();
        modes.push(ModeResult {
            mode,
            mpps: Stats::of(&mpps).context("no runs")?,
            offered_mpps: Stats::of(&offered).context("no runs")?,
            saturated: runs.iter().all(|r| r.processed * 100 < r.sent * 99),
            runs,
        });
    }
    Ok(FloodResult {
        name: flood.name,
        description: flood.description.clone(),
        sources: flood.sources.len().max(1),
        verdict: if flood.drop { "drop" } else { "pass" },
        modes,
        met_over_floor: flood
            .target_over_floor
            .map(|t| ratio_over_floor.median >= t),
        ratio_over_floor,
        net_ns_per_frame,
        met_over_nft: flood
            .target_over_nft
            .zip(ratio_over_nft)
            .map(|(t, r)| r.median >= t),
        ratio_over_nft,
        p25_prog_ns_per_frame,
        target_over_floor: flood.target_over_floor,
        target_over_nft: flood.target_over_nft,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header carrying its checksum sums to zero (RFC 1071), for the template's own
    /// source and for a rewritten one.
    #[test]
    fn rewritten_sources_carry_valid_checksums() -> Result<()> {
        let src = Ipv4Addr::new(100, 64, 1, 2);
        let dst = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 25));
        let frame = template(IpAddr::V4(src), dst, [2; 6], [4; 6])?;
        let header = frame.get(14..34).context("short frame")?;
        assert_eq!(ipv4_checksum(header), 0);
        let other = Ipv4Addr::new(100, 127, 255, 254);
        let csum = ipv4_csum_with(&frame, Some(other))?;
        let mut rewritten = frame.clone();
        rewritten
            .get_mut(26..30)
            .context("short frame")?
            .copy_from_slice(&other.octets());
        rewritten
            .get_mut(24..26)
            .context("short frame")?
            .copy_from_slice(&csum);
        assert_eq!(ipv4_checksum(rewritten.get(14..34).context("short")?), 0);
        assert_ne!(csum, ipv4_csum_with(&frame, None)?);
        Ok(())
    }
}
