//! What the two demo binaries (`p25-demo`, `p25-fleet-demo`) share: the tally of the
//! checks they make along the way, and their section headings.

/// Tallies the checks a demo makes along the way.
#[derive(Debug, Default)]
pub struct Checks {
    /// Checks that held.
    pub passed: usize,
    /// What each failed check was about, in order.
    pub failed: Vec<String>,
}

impl Checks {
    /// Records one check; returns the word to print beside it.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) -> &'static str {
        if ok {
            self.passed += 1;
            "ok"
        } else {
            self.failed.push(what.into());
            "UNEXPECTED"
        }
    }
}

/// Prints a section heading.
#[expect(
    clippy::print_stdout,
    reason = "the demos talk to the operator on stdout"
)]
pub fn heading(title: &str) {
    println!();
    println!("== {title} ==");
}
