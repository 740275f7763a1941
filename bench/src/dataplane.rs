//! Per-packet cost with BPF_PROG_TEST_RUN: p25's XDP and TC programs against trivial
//! floors, per packet class, with the maps at full scale.
//!
//! Method (test_run is noisy on a small shared VM):
//! - every round runs every (class, program) pair once, with the program order rotated
//!   each round, so slow phases of the machine hit all programs alike;
//! - a sample is the calling thread's CPU time over one test run of `repeat` packets,
//!   divided by `repeat` (preemption does not count; the kernel's own figure, an integer
//!   number of ns, is kept as a cross-check);
//! - net cost = p25 minus the floor of the same hook, class and round;
//! - the timed XDP programs are attached to a spare veth while timing: the kernel's XDP
//!   dispatcher only covers attached programs, and an unattached one pays an indirect
//!   (retpolined) call per packet that a real deployment never pays.

use std::{fmt::Write as _, net::Ipv6Addr};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, TestRunResult, XdpMode};
use filter_user::Dataplane;
use ipnet::IpNet;
use p25_tests::packet::{Ext, Pkt, Pppoe, TPID_8021AD, TPID_8021Q};

use crate::{
    floors::{BenchObject, XDP_PASS_FLOOR},
    netns::{Netns, veth},
    scale::PolicySet,
    stats::Stats,
    sys,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;

/// Net-cost target for traffic that is not TCP/25, in ns.
pub const TARGET_NON25_NS: f64 = 5.0;
/// Net-cost target for a TCP/25 verdict, in ns.
pub const TARGET_PORT25_NS: f64 = 30.0;

/// Settings.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Options {
    /// Rounds (K).
    pub rounds: usize,
    /// Packets per test run.
    pub repeat: u32,
    /// CPU the timing thread is pinned to.
    pub cpu: usize,
}

/// One packet class.
#[derive(Clone, Debug)]
pub struct Class {
    /// Short name.
    pub name: &'static str,
    /// What it stands for.
    pub description: &'static str,
    /// The frame.
    pub frame: Vec<u8>,
    /// Whether p25 must drop it.
    pub drop: bool,
    /// Net-cost target, if the issue sets one for this class.
    pub target_ns: Option<f64>,
}

/// The packet classes of the issue, from the addresses of the generated policy.
pub fn classes(set: &PolicySet) -> Result<Vec<Class>> {
    let p = &set.probes;
    let v4 = |src, dport| Pkt::v4(src, 40_000, p.mx_v4, dport);
    let v6 = |src, dport| Pkt::v6(src, 40_000, p.mx_v6, dport);
    let allowed_v6 = set
        .allow
        .iter()
        .find_map(|n| match n {
            IpNet::V6(n) => Some(n.addr()),
            IpNet::V4(_) => None,
        })
        .context("no IPv6 allowlist entry in the policy")?;
    // Outside every generated /56 (its site bits, ffff:ff, are above the generator's).
    let outside_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0xff00, 0, 0, 0, 7);
    let sub25 = v4(p.sub_v4, 25);
    let sub25_v6 = v6(p.sub_v6, 25);
    let mut truncated = sub25.build();
    // Ethernet + IPv4 header + 2 bytes of TCP: the ports are cut off (parse outcome
    // `truncated`). Long enough for the kernel's skb test run (34 bytes).
    truncated.truncate(14 + 20 + 2);
    let class = |name, description, pkt: Pkt, drop, target_ns| Class {
        name,
        description,
        frame: pkt.build(),
        drop,
        target_ns,
    };
    let (non25, port25) = (Some(TARGET_NON25_NS), Some(TARGET_PORT25_NS));
    Ok(vec![
        class(
            "v4_syn_443",
            "IPv4 SYN to 443 from a subscriber (the common case)",
            v4(p.sub_v4, 443),
            false,
            non25,
        ),
        class(
            "v4_syn_25_sub",
            "IPv4 SYN to 25 from a subscriber (drop)",
            sub25.clone(),
            true,
            port25,
        ),
        class(
            "v4_syn_25_allow",
            "IPv4 SYN to 25 from an allowlisted source (pass)",
            v4(p.allowed_v4, 25),
            false,
            port25,
        ),
        class(
            "v4_syn_25_outside",
            "IPv4 SYN to 25 from outside subscriber space (pass)",
            v4(p.outside_v4, 25),
            false,
            port25,
        ),
        class(
            "vlan_syn_25_sub",
            "802.1Q-tagged IPv4 SYN to 25 from a subscriber (drop)",
            sub25.clone().tags(&[TPID_8021Q]),
            true,
            port25,
        ),
        class(
            "qinq_syn_25_sub",
            "QinQ (802.1ad + 802.1Q) IPv4 SYN to 25 from a subscriber (drop)",
            sub25.clone().tags(&[TPID_8021AD, TPID_8021Q]),
            true,
            port25,
        ),
        class(
            "pppoe_syn_25_sub",
            "PPPoE session IPv4 SYN to 25 from a subscriber (drop)",
            sub25.clone().pppoe(Pppoe::default()),
            true,
            port25,
        ),
        class(
            "v6_syn_443",
            "IPv6 SYN to 443 from a subscriber",
            v6(p.sub_v6, 443),
            false,
            non25,
        ),
        class(
            "v6_syn_25_sub",
            "IPv6 SYN to 25 from a subscriber (drop)",
            sub25_v6.clone(),
            true,
            port25,
        ),
        class(
            "v6_syn_25_allow",
            "IPv6 SYN to 25 from an allowlisted source (pass)",
            v6(allowed_v6, 25),
            false,
            port25,
        ),
        class(
            "v6_syn_25_outside",
            "IPv6 SYN to 25 from outside subscriber space (pass)",
            v6(outside_v6, 25),
            false,
            port25,
        ),
        class(
            "v6_hbh_syn_25_sub",
            "IPv6 with a hop-by-hop header, SYN to 25 from a subscriber (drop)",
            sub25_v6.clone().ext(&[Ext::HopByHop(0)]),
            true,
            port25,
        ),
        class(
            "v6_ext3_syn_25_sub",
            "IPv6 with hop-by-hop, destination options and routing headers, SYN to 25 from a subscriber (drop)",
            sub25_v6
                .clone()
                .ext(&[Ext::HopByHop(0), Ext::DestOpts(1), Ext::Routing(0)]),
            true,
            port25,
        ),
        class(
            "pppoe_v6_syn_25_sub",
            "PPPoE session IPv6 SYN to 25 from a subscriber (drop)",
            sub25_v6.clone().pppoe(Pppoe::default()),
            true,
            port25,
        ),
        Class {
            name: "truncated",
            description: "truncated frame: IPv4 header, TCP cut before the ports (pass)",
            frame: truncated,
            drop: false,
            target_ns: None,
        },
    ])
}

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP.
    Xdp,
    /// TC (skb).
    Tc,
}

/// One (hook, class) result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassResult {
    /// Hook.
    pub hook: Hook,
    /// Class name.
    pub class: &'static str,
    /// Class description.
    pub description: &'static str,
    /// p25's verdict.
    pub verdict: &'static str,
    /// p25, ns/packet.
    pub p25_ns: Stats,
    /// The floor, ns/packet.
    pub floor_ns: Stats,
    /// p25 minus floor, per round, ns/packet.
    pub net_ns: Stats,
    /// p25 / floor, per round.
    pub ratio_over_floor: Stats,
    /// min(p25) minus min(floor): the least noisy estimate of the net cost.
    pub net_of_mins_ns: f64,
    /// The kernel's own median figure for p25 (integer ns, a cross-check).
    pub kernel_p25_median_ns: f64,
    /// The kernel's own median figure for the floor.
    pub kernel_floor_median_ns: f64,
    /// Target for the net cost, if any.
    pub target_ns: Option<f64>,
    /// Whether the median net cost meets the target.
    pub met: Option<bool>,
}

/// The whole section.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Settings.
    pub options: Options,
    /// Results, XDP classes then TC classes.
    pub results: Vec<ClassResult>,
}

impl Report {
    /// The section as text: one line per class, XDP and TC side by side, each against its
    /// own floor and target.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nDataplane cost per packet (BPF_PROG_TEST_RUN, K={} rounds x {} packets, ns/pkt, medians over rounds; net = p25 - floor of the same hook, same round; x = p25 / floor)",
            self.options.rounds, self.options.repeat
        );
        let _ = writeln!(
            out,
            "{:<20} {:<4} | {:>6} {:>7} {:>7} {:>6} {:>10} | {:>6} {:>7} {:>7} {:>6} {:>10}",
            "class",
            "verd",
            "xdp fl",
            "net",
            "net min",
            "x",
            "xdp target",
            "tc fl",
            "net",
            "net min",
            "x",
            "tc target"
        );
        let target = |r: &ClassResult| match (r.target_ns, r.met) {
            (Some(t), Some(true)) => format!("<={t:.0} ok"),
            (Some(t), _) => format!("<={t:.0} MISS"),
            _ => "-".into(),
        };
        let xdp = self.results.iter().filter(|r| r.hook == Hook::Xdp);
        for x in xdp {
            let Some(t) = self
                .results
                .iter()
                .find(|r| r.hook == Hook::Tc && r.class == x.class)
            else {
                continue;
            };
            let _ = writeln!(
                out,
                "{:<20} {:<4} | {:>6.1} {:>7.1} {:>7.1} {:>6.2} {:>10} | {:>6.1} {:>7.1} {:>7.1} {:>6.2} {:>10}",
                x.class,
                x.verdict,
                x.floor_ns.median,
                x.net_ns.median,
                x.net_ns.min,
                x.ratio_over_floor.median,
                target(x),
                t.floor_ns.median,
                t.net_ns.median,
                t.net_ns.min,
                t.ratio_over_floor.median,
                target(t),
            );
        }
        out
    }
}

/// One timed test run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    cpu_ns: f64,
    kernel_ns: f64,
    retval: u32,
}

fn time<P>(prog: &P, frame: &[u8], repeat: u32) -> Result<Sample>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    };
    let before = sys::thread_cpu_ns();
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let after = sys::thread_cpu_ns();
    Ok(Sample {
        cpu_ns: after.saturating_sub(before) as f64 / f64::from(repeat.max(1)),
        kernel_ns: result.duration.as_nanos() as f64,
        retval: result.return_value,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    P25Xdp,
    FloorXdp,
    P25Tc,
    FloorTc,
}

const PROGS: [Prog; 4] = [Prog::P25Xdp, Prog::FloorXdp, Prog::P25Tc, Prog::FloorTc];

fn run_one(
    prog: Prog,
    dataplane: &mut Dataplane,
    bench: &mut BenchObject,
    frame: &[u8],
    repeat: u32,
) -> Result<Sample> {
    match prog {
        Prog::P25Xdp => time(&*dataplane.xdp()?, frame, repeat),
        Prog::FloorXdp => time(&*bench.xdp(XDP_PASS_FLOOR)?, frame, repeat),
        Prog::P25Tc => time(&*dataplane.tc()?, frame, repeat),
        Prog::FloorTc => time(&*bench.tc_floor()?, frame, repeat),
    }
}

fn expected_retval(prog: Prog, drop: bool) -> u32 {
    match (prog, drop) {
        (Prog::P25Xdp, true) => XDP_DROP,
        (Prog::P25Xdp, false) | (Prog::FloorXdp, _) => XDP_PASS,
        (Prog::P25Tc, true) => TC_ACT_SHOT,
        (Prog::P25Tc, false) => TC_ACT_PIPE,
        (Prog::FloorTc, _) => TC_ACT_OK,
    }
}

/// Runs the section. The maps behind `dataplane` must already hold the policy.
pub fn run(
    opts: Options,
    dataplane: &mut Dataplane,
    bench: &mut BenchObject,
    set: &PolicySet,
) -> Result<Report> {
    let classes = classes(set)?;
    // The spare veth: both timed XDP programs attached (native mode), one per end.
    let ns = Netns::new("tr")?;
    veth(&ns, "spa", &ns, "spb")?;
    ns.enter(|| -> Result<()> {
        dataplane
            .attach_xdp("spa", XdpMode::Driver)
            .context("attaching p25_xdp to the spare veth")?;
        bench
            .xdp(XDP_PASS_FLOOR)?
            .attach("spb", XdpMode::Driver)
            .context("attaching the XDP floor to the spare veth")?;
        Ok(())
    })??;

    // Sanity: every program returns what it must for every class, or the benchmark
    // would time a path other than the one it names. Doubles as the warm-up.
    for class in &classes {
        for prog in PROGS {
            let sample = run_one(prog, dataplane, bench, &class.frame, 10_000)?;
            let want = expected_retval(prog, class.drop);
            ensure!(
                sample.retval == want,
                "{prog:?} returned {} for {} (expected {want})",
                sample.retval,
                class.name
            );
        }
    }

    // samples[class][prog] over rounds
    let mut samples = vec![vec![Vec::with_capacity(opts.rounds); PROGS.len()]; classes.len()];
    for round in 0..opts.rounds {
        for (ci, class) in classes.iter().enumerate() {
            for k in 0..PROGS.len() {
                let pi = (k + round) % PROGS.len();
                let prog = *PROGS.get(pi).context("program index")?;
                let sample = run_one(prog, dataplane, bench, &class.frame, opts.repeat)?;
                samples
                    .get_mut(ci)
                    .and_then(|c| c.get_mut(pi))
                    .context("sample slot")?
                    .push(sample);
            }
        }
        eprint!("\r  dataplane: round {}/{}", round + 1, opts.rounds);
    }
    eprintln!();
    drop(ns);

    let mut results = Vec::new();
    for (hook, p25, floor) in [(Hook::Xdp, 0, 1), (Hook::Tc, 2, 3)] {
        for (ci, class) in classes.iter().enumerate() {
            let per_prog = samples.get(ci).context("class samples")?;
            let (Some(p), Some(f)) = (per_prog.get(p25), per_prog.get(floor)) else {
                bail!("missing samples");
            };
            let cpu = |s: &[Sample]| s.iter().map(|x| x.cpu_ns).collect::<Vec<_>>();
            let kernel = |s: &[Sample]| s.iter().map(|x| x.kernel_ns).collect::<Vec<_>>();
            let net: Vec<f64> = p.iter().zip(f).map(|(a, b)| a.cpu_ns - b.cpu_ns).collect();
            let p25_ns = Stats::of(&cpu(p)).context("no p25 samples")?;
            let floor_ns = Stats::of(&cpu(f)).context("no floor samples")?;
            let net_ns = Stats::of(&net).context("no net samples")?;
            let ratio: Vec<f64> = p.iter().zip(f).map(|(a, b)| a.cpu_ns / b.cpu_ns).collect();
            let ratio_over_floor = Stats::of(&ratio).context("no samples")?;
            results.push(ClassResult {
                hook,
                class: class.name,
                description: class.description,
                verdict: if class.drop { "drop" } else { "pass" },
                p25_ns,
                floor_ns,
                net_ns,
                ratio_over_floor,
                net_of_mins_ns: p25_ns.min - floor_ns.min,
                kernel_p25_median_ns: Stats::of(&kernel(p)).map_or(f64::NAN, |s| s.median),
                kernel_floor_median_ns: Stats::of(&kernel(f)).map_or(f64::NAN, |s| s.median),
                target_ns: class.target_ns,
                met: class.target_ns.map(|t| net_ns.median <= t),
            });
        }
    }
    Ok(Report {
        options: opts,
        results,
    })
}
