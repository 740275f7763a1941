//! Drop throughput through a veth, same run: (a) an XDP_DROP floor, (b) p25's XDP program
//! with the maps at full scale, (c) nftables doing the same job.
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

use std::{collections::BTreeMap, fmt::Write as _, fs, io::Write as _, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, XdpMode},
};
use filter_user::Dataplane;
use ipnet::IpNet;
use p25_tests::packet::Pkt;

use crate::{
    floors::{BenchObject, GEN_RESTORE, GENERATOR, XDP_DROP_FLOOR},
    netns::{Netns, veth},
    scale::PolicySet,
    stats::Stats,
    sys,
};

/// Target for p25 / XDP_DROP floor.
pub const TARGET_B_OVER_A: f64 = 0.9;
/// Target for p25 / nftables.
pub const TARGET_B_OVER_C: f64 = 8.0;
/// Frames per live-frames batch (the kernel's default is 64, its maximum 256).
const GEN_BATCH: u32 = 64;

/// Settings.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Options {
    /// Runs per configuration.
    pub runs: usize,
    /// Frames the generator sends per run.
    pub frames: u32,
    /// CPU of the DUT's receive processing.
    pub dut_cpu: usize,
    /// CPU of the generator.
    pub gen_cpu: usize,
}

/// A configuration of the DUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// (a) XDP program returning XDP_DROP.
    XdpDropFloor,
    /// (b) p25_xdp, maps at full scale.
    P25Xdp,
    /// (c) nftables netdev ingress chain with interval sets.
    Nftables,
}

const MODES: [Mode; 3] = [Mode::XdpDropFloor, Mode::P25Xdp, Mode::Nftables];

/// One run of one configuration.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Run {
    /// Frames the generator sent.
    pub sent: u64,
    /// Frames the DUT's queue processed.
    pub processed: u64,
    /// Frames the DUT dropped by its rule (XDP drops or the nft rule counter).
    pub dropped_by_rule: u64,
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

/// The whole section.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Settings.
    pub options: Options,
    /// nft set elements loaded (subscriber and allowlist prefixes).
    pub nft_elements: usize,
    /// Seconds `nft -f` took to load the ruleset.
    pub nft_load_seconds: f64,
    /// Per configuration.
    pub modes: Vec<ModeResult>,
    /// p25 / floor, per run index.
    pub ratio_b_over_a: Stats,
    /// p25 / nftables, per run index.
    pub ratio_b_over_c: Stats,
    /// Whether the median ratios meet the targets.
    pub met_b_over_a: bool,
    /// See above.
    pub met_b_over_c: bool,
}

impl Report {
    /// The section as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nDrop throughput through veth (DUT rx on CPU {}, generator on CPU {}, {} runs x {} frames, IPv4 SYN to 25 from a subscriber)",
            self.options.dut_cpu, self.options.gen_cpu, self.options.runs, self.options.frames
        );
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>9} {:>9} {:>12} {:>10}",
            "config", "Mpps min", "Mpps med", "Mpps max", "offered med", "saturated"
        );
        for m in &self.modes {
            let _ = writeln!(
                out,
                "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>12.3} {:>10}",
                mode_name(m.mode),
                m.mpps.min,
                m.mpps.median,
                m.mpps.max,
                m.offered_mpps.median,
                if m.saturated { "yes" } else { "NO" }
            );
        }
        let _ = writeln!(
            out,
            "ratio b/a (p25 / XDP_DROP): min {:.3} med {:.3} max {:.3}  target >= {TARGET_B_OVER_A} {}",
            self.ratio_b_over_a.min,
            self.ratio_b_over_a.median,
            self.ratio_b_over_a.max,
            if self.met_b_over_a { "ok" } else { "MISS" }
        );
        let _ = writeln!(
            out,
            "ratio b/c (p25 / nftables): min {:.2} med {:.2} max {:.2}  target >= {TARGET_B_OVER_C} {}  (nft: {} set elements, loaded in {:.1} s)",
            self.ratio_b_over_c.min,
            self.ratio_b_over_c.median,
            self.ratio_b_over_c.max,
            if self.met_b_over_c { "ok" } else { "MISS" },
            self.nft_elements,
            self.nft_load_seconds
        );
        out
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::XdpDropFloor => "(a) XDP_DROP",
        Mode::P25Xdp => "(b) p25_xdp",
        Mode::Nftables => "(c) nftables",
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

/// The generator's frame: a SYN to 25 from a subscriber, addressed to the DUT's MAC,
/// with a valid IPv4 header checksum (the stack checks it on the nftables path).
fn frame(set: &PolicySet, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Result<(Vec<u8>, [u8; 2])> {
    let mut frame = Pkt::v4(set.probes.sub_v4, 40_000, set.probes.mx_v4, 25).build();
    frame
        .get_mut(..6)
        .context("short frame")?
        .copy_from_slice(&dst_mac);
    frame
        .get_mut(6..12)
        .context("short frame")?
        .copy_from_slice(&src_mac);
    let csum_field = frame.get_mut(24..26).context("short frame")?;
    csum_field.copy_from_slice(&[0, 0]);
    let csum = ipv4_checksum(frame.get(14..34).context("short frame")?).to_be_bytes();
    frame
        .get_mut(24..26)
        .context("short frame")?
        .copy_from_slice(&csum);
    Ok((frame, csum))
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
    let path = std::env::temp_dir().join(format!("{table}.nft"));
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

struct Lab {
    gen_ns: Netns,
    dut: Netns,
    dut_if: String,
    gen_ifindex: u32,
    table: String,
}

fn setup(opts: &Options) -> Result<Lab> {
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
    frame: &[u8],
    frames: u32,
) -> Result<Run> {
    // Attach the configuration's XDP program, if any, for this run only.
    enum Attached {
        Floor(aya::programs::xdp::XdpLinkId),
        P25(aya::programs::xdp::XdpLinkId),
        None,
    }
    let dev = lab.dut_if.as_str();
    let attached = lab.dut.enter(|| -> Result<Attached> {
        Ok(match mode {
            Mode::XdpDropFloor => {
                Attached::Floor(bench.xdp(XDP_DROP_FLOOR)?.attach(dev, XdpMode::Driver)?)
            }
            Mode::P25Xdp => Attached::P25(dataplane.attach_xdp(dev, XdpMode::Driver)?),
            Mode::Nftables => Attached::None,
        })
    })??;
    let before = nic_stats(&lab.dut, dev)?;
    let result = generate(lab, bench, frame, frames);
    // Let the DUT drain its ring (at most 256 frames) before reading its counters.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let after = nic_stats(&lab.dut, dev)?;
    match attached {
        Attached::Floor(id) => bench.xdp(XDP_DROP_FLOOR)?.detach(id)?,
        Attached::P25(id) => dataplane.xdp()?.detach(id)?,
        Attached::None => {}
    }
    let seconds = result?;
    let delta = |k: &str| -> Result<u64> { Ok(stat(&after, k)?.saturating_sub(stat(&before, k)?)) };
    let processed = delta("rx_queue_0_xdp_packets")?;
    // nft's rule counters cannot be read per run: any listing makes nft fetch the
    // million set elements (tens of seconds). They are checked once, over all runs, in
    // `run`; here the frames the queue processed stand for the rule's drops.
    let dropped_by_rule = match mode {
        Mode::Nftables => processed,
        _ => delta("rx_queue_0_xdp_drops")?,
    };
    ensure!(
        processed > 0 && dropped_by_rule * 100 >= processed * 99,
        "{mode:?}: the DUT processed {processed} frames but dropped only {dropped_by_rule}; \
         it is not doing the job being measured"
    );
    Ok(Run {
        sent: u64::from(frames),
        processed,
        dropped_by_rule,
        seconds,
        mpps: processed as f64 / seconds / 1e6,
    })
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
    let lab = setup(&opts)?;
    let (frame, csum) = frame(set, lab.gen_ns.mac("g0")?, lab.dut.mac(&lab.dut_if)?)?;
    {
        let map = bench
            .ebpf_mut()
            .map_mut(GEN_RESTORE)
            .context("no GEN_RESTORE map")?;
        let mut restore: Array<_, u32> = Array::try_from(map)?;
        // Restore { ipv4_ttl, ipv6_hop_limit, ipv4_csum } as laid out in memory.
        restore.set(0, u32::from_ne_bytes([64, 64, csum[0], csum[1]]), 0)?;
    }
    eprintln!("  throughput: loading the nftables ruleset");
    let (nft_elements, nft_load_seconds) = load_nft(&lab.dut, &lab.table, &lab.dut_if, set)?;
    eprintln!("  throughput: nft loaded {nft_elements} elements in {nft_load_seconds:.1} s");

    // Warm-up: page pools, NAPI thread, caches.
    for mode in MODES {
        one_run(
            &lab,
            mode,
            dataplane,
            bench,
            &frame,
            opts.frames.min(200_000),
        )?;
    }
    let mut runs: BTreeMap<Mode, Vec<Run>> = BTreeMap::new();
    for i in 0..opts.runs {
        for k in 0..MODES.len() {
            let mode = *MODES.get((k + i) % MODES.len()).context("mode")?;
            let run = one_run(&lab, mode, dataplane, bench, &frame, opts.frames)?;
            eprintln!(
                "  throughput: run {}/{} {:<16} {:.3} Mpps ({} of {} frames processed)",
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
    // Every frame nft processed must have been dropped by its rules (warm-up included).
    let nft_processed: u64 = runs
        .get(&Mode::Nftables)
        .into_iter()
        .flatten()
        .map(|r| r.processed)
        .sum();
    let nft_counted = nft_dropped(&lab.dut, &lab.table)?;
    ensure!(
        nft_counted * 100 >= nft_processed * 99,
        "nftables dropped {nft_counted} frames in all, but processed {nft_processed} in the \
         measured runs: it is not doing the job being measured"
    );
    let get = |m: Mode| runs.get(&m).cloned().unwrap_or_default();
    let (a, b, c) = (
        get(Mode::XdpDropFloor),
        get(Mode::P25Xdp),
        get(Mode::Nftables),
    );
    let ratio = |x: &[Run], y: &[Run]| -> Result<Stats> {
        let r: Vec<f64> = x.iter().zip(y).map(|(x, y)| x.mpps / y.mpps).collect();
        Stats::of(&r).context("no runs")
    };
    let ratio_b_over_a = ratio(&b, &a)?;
    let ratio_b_over_c = ratio(&b, &c)?;
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
    drop(lab);
    Ok(Report {
        options: opts,
        nft_elements,
        nft_load_seconds,
        modes,
        met_b_over_a: ratio_b_over_a.median >= TARGET_B_OVER_A,
        met_b_over_c: ratio_b_over_c.median >= TARGET_B_OVER_C,
        ratio_b_over_a,
        ratio_b_over_c,
    })
}
