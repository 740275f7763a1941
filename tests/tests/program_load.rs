//! p25d verifies up front only the programs its policy attaches
//! (`Dataplane::load_programs_wanted`); any other is verified on first use. This pins the
//! library half: what is not wanted stays unloaded, and asking for it loads it.

use anyhow::{Context as _, Result, ensure};
use filter_common::classify::Role;
use filter_user::{Dataplane, loader::Hook};

const ALL: [(Hook, Role); 4] = [
    (Hook::Xdp, Role::Subscriber),
    (Hook::Xdp, Role::Upstream),
    (Hook::Tc, Role::Subscriber),
    (Hook::Tc, Role::Upstream),
];

#[test]
fn unwanted_programs_are_verified_on_first_use() -> Result<()> {
    let pins = p25_tests::pins::TempPins::new("progload")?;
    let mut dataplane =
        Dataplane::open_pinned_maps(pins.layout()).context("creating the pinned maps")?;
    for (hook, role) in ALL {
        ensure!(
            !dataplane.is_loaded(hook, role),
            "{hook:?}/{role:?} loaded before anyone asked"
        );
    }
    dataplane.load_programs_wanted(|hook, role| hook == Hook::Xdp && role == Role::Subscriber)?;
    for (hook, role) in ALL {
        let want = hook == Hook::Xdp && role == Role::Subscriber;
        ensure!(
            dataplane.is_loaded(hook, role) == want,
            "{hook:?}/{role:?}: loaded {}, wanted {want}",
            dataplane.is_loaded(hook, role)
        );
    }
    // First use of a program not verified up front (an `attach: auto` falling back to TC).
    dataplane.tc_for(Role::Upstream)?;
    ensure!(dataplane.is_loaded(Hook::Tc, Role::Upstream));
    ensure!(!dataplane.is_loaded(Hook::Tc, Role::Subscriber));
    // Asking again does not load twice (aya refuses a second load of the same program).
    dataplane.tc_for(Role::Upstream)?;
    dataplane.load_programs()?;
    for (hook, role) in ALL {
        ensure!(
            dataplane.is_loaded(hook, role),
            "{hook:?}/{role:?} after load_programs"
        );
    }
    Ok(())
}
