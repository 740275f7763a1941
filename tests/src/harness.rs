//! The real programs under BPF_PROG_TEST_RUN, next to the reference model.

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use filter_common::classify::{Action, Role};
use filter_user::{Dataplane, KernelTables, loader::Capacity};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;

/// Which entry point to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `p25_xdp`.
    Xdp,
    /// `p25_tc`.
    Tc,
}

impl Hook {
    /// Both hooks, in the order tests run them.
    pub const ALL: [Self; 2] = [Self::Xdp, Self::Tc];
}

/// Whether the kernel will BPF_PROG_TEST_RUN `frame` through a TC program at all.
///
/// For skb programs the kernel refuses (EINVAL) a frame whose outer ethertype is IPv4 or
/// IPv6 but which is shorter than the fixed IP header (34 and 54 bytes), and anything
/// shorter than 15 bytes. XDP has no such rule, so such frames are still compared on XDP
/// and the model; callers count how many TC runs were impossible rather than hide them.
pub fn tc_can_run(frame: &[u8]) -> bool {
    let min = match frame.get(12..14) {
        Some([0x08, 0x00]) => 34,
        Some([0x86, 0xDD]) => 54,
        _ => 15,
    };
    frame.len() >= min
}

/// A freshly loaded, private copy of the dataplane (its maps are not shared with any other
/// test) and typed handles on its maps.
#[derive(Debug)]
pub struct Harness {
    /// The loaded programs.
    pub dataplane: Dataplane,
    /// Its maps.
    pub tables: KernelTables,
    /// Which entry points [`Harness::run`] uses: `p25_xdp` / `p25_tc` for
    /// [`Role::Subscriber`] (the default), `p25_xdp_upstream` / `p25_tc_upstream` for
    /// [`Role::Upstream`].
    pub role: Role,
}

impl Harness {
    /// Loads with default map capacities.
    pub fn new() -> Result<Self> {
        Self::with_capacity(Capacity::default())
    }

    /// Loads with the given map capacities.
    pub fn with_capacity(capacity: Capacity) -> Result<Self> {
        crate::require_root();
        let mut dataplane = Dataplane::load_with(capacity).context("loading the dataplane")?;
        let tables = dataplane.take_tables()?;
        Ok(Self {
            dataplane,
            tables,
            role: Role::Subscriber,
        })
    }

    /// Runs `frame` through one hook once and maps its return code to an [`Action`]
    /// (XDP_TX is [`Action::Reject`]: an RST was sent). Any other return code is an
    /// error: the hooks must only ever pass, drop or (XDP) transmit.
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> Result<Action> {
        Ok(self.run_out(hook, frame)?.0)
    }

    /// As [`Harness::run`], also returning the frame as the program left it (for XDP_TX:
    /// the frame transmitted).
    pub fn run_out(&mut self, hook: Hook, frame: &[u8]) -> Result<(Action, Vec<u8>)> {
        // Room for the frame and then some: the programs only ever shrink it.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let (code, pass, drop) = match hook {
            Hook::Xdp => (
                self.dataplane.xdp_for(self.role)?.test_run(opts),
                XDP_PASS,
                XDP_DROP,
            ),
            Hook::Tc => (
                self.dataplane.tc_for(self.role)?.test_run(opts),
                TC_ACT_PIPE,
                TC_ACT_SHOT,
            ),
        };
        let result = code.with_context(|| {
            format!(
                "BPF_PROG_TEST_RUN of {hook:?} on a {}-byte frame",
                frame.len()
            )
        })?;
        let len = usize::try_from(result.data_size_out)?.min(out.len());
        out.truncate(len);
        let action = match result.return_value {
            c if c == pass => Action::Pass,
            c if c == drop => Action::Drop,
            XDP_TX if hook == Hook::Xdp => Action::Reject,
            other => bail!("{hook:?} returned unexpected code {other}"),
        };
        Ok((action, out))
    }
}

/// `text` checked as a policy named `file`, which the test needs to be valid.
pub fn valid_policy(text: &str, file: &str) -> Result<filter_user::policy::Checked> {
    filter_user::policy::parse(text, file)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the test policy must be valid")
}

/// The CONFIG entry for `policy` at `generation`, as a daemon with the event log off on a
/// one-CPU machine would write it.
pub fn config_of(
    policy: &filter_user::policy::Policy,
    generation: u32,
) -> filter_common::abi::Config {
    let settings = filter_user::desired::Settings {
        offender_v6_prefix: 64,
        events_rate: 0,
        events_burst: 0,
        cpus: 1,
    };
    filter_user::desired::config(policy, &settings, generation)
}
