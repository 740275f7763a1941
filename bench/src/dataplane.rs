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

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, TestRunResult, XdpMode};
use filter_user::Dataplane;
use p25_tests::packet::{Pkt, Pppoe, TPID_8021AD, TPID_8021Q};

use crate::{
    floors::{BenchObject, XDP_PASS_FLOOR},
    netns::{Netns, veth},
    scale::Probes,
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

/// The packet classes of the issue.
pub fn classes(p: &Probes) -> Vec<Class> {
    let v4 = |src, dport| Pkt::v4(src, 40_000, p.mx_v4, dport);
    let sub25 = v4(p.sub_v4, 25);
    let mut truncated = sub25.build();
    // Ethernet + IPv4 header + 2 bytes of TCP: the ports are cut off (parse outcome
    // `truncated`). Long enough for the kernel's skb test run (34 bytes).
    truncated.truncate(14 + 20 + 2);
    vec![
        Class {
            name: "v4_syn_443",
            description: "IPv4 SYN to 443 from a subscriber (the common case)",
            frame: v4(p.sub_v4, 443).build(),
            drop: false,
            target_ns: Some(TARGET_NON25_NS),
        },
        Class {
            name: "v4_syn_25_sub",
            description: "IPv4 SYN to 25 from a subscriber (drop)",
            frame: sub25.build(),
            drop: true,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "v4_syn_25_allow",
            description: "IPv4 SYN to 25 from an allowlisted source (pass)",
            frame: v4(p.allowed_v4, 25).build(),
            drop: false,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "v4_syn_25_outside",
            description: "IPv4 SYN to 25 from outside subscriber space (pass)",
            frame: v4(p.outside_v4, 25).build(),
            drop: false,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "v6_syn_25_sub",
            description: "IPv6 SYN to 25 from a subscriber (drop)",
            frame: Pkt::tcp(IpAddr::V6(p.sub_v6), 40_000, IpAddr::V6(p.mx_v6), 25).build(),
            drop: true,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "vlan_syn_25_sub",
            description: "802.1Q-tagged IPv4 SYN to 25 from a subscriber (drop)",
            frame: sub25.clone().tags(&[TPID_8021Q]).build(),
            drop: true,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "qinq_syn_25_sub",
            description: "QinQ (802.1ad + 802.1Q) IPv4 SYN to 25 from a subscriber (drop)",
            frame: sub25.clone().tags(&[TPID_8021AD, TPID_8021Q]).build(),
            drop: true,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "pppoe_syn_25_sub",
            description: "PPPoE session IPv4 SYN to 25 from a subscriber (drop)",
            frame: sub25.clone().pppoe(Pppoe::default()).build(),
            drop: true,
            target_ns: Some(TARGET_PORT25_NS),
        },
        Class {
            name: "truncated",
            description: "truncated frame: IPv4 header, TCP cut before the ports (pass)",
            frame: truncated,
            drop: false,
            target_ns: None,
        },
    ]
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
    probes: &Probes,
) -> Result<Report> {
    let classes = classes(probes);
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
            results.push(ClassResult {
                hook,
                class: class.name,
                description: class.description,
                verdict: if class.drop { "drop" } else { "pass" },
                p25_ns,
                floor_ns,
                net_ns,
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
