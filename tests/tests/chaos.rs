//! The reliability suite, reduced (`cargo xtask chaos` runs the full one): every fault of
//! `p25_tests::chaos` injected a few times under a SYN stream, so CI checks the
//! invariants (0 lost, 0 leaked, the old policy in force after an invalid reload, recovery
//! within bounds) on every run.

use anyhow::{Result, ensure};
use p25_tests::chaos::{self, FaultReport, Plan};

#[test]
fn every_fault_under_a_syn_stream_loses_and_leaks_nothing() -> Result<()> {
    let report = chaos::run(&Plan::reduced(), &mut |_: &FaultReport| {})?;
    p25_tests::summary!("{}", report.table());
    ensure!(
        report.passed(),
        "chaos invariants failed:\n{}",
        report.table()
    );
    Ok(())
}
