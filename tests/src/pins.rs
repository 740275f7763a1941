//! A throwaway pin root on bpffs for tests that load the dataplane without p25d.

use filter_user::loader::{PinLayout, remove_all_pins};

/// A pin root unique to this test process and `tag`, removed with everything pinned under
/// it when dropped, also when the test fails.
#[derive(Debug)]
pub struct TempPins(PinLayout);

impl TempPins {
    /// Requires root, mounts bpffs if needed, and names `/sys/fs/bpf/p25-test-TAG-PID`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        crate::require_root();
        filter_user::loader::ensure_bpffs()?;
        Ok(Self(PinLayout::new(format!(
            "/sys/fs/bpf/p25-test-{tag}-{}",
            std::process::id()
        ))))
    }

    /// The layout under the root.
    pub fn layout(&self) -> &PinLayout {
        &self.0
    }
}

impl Drop for TempPins {
    fn drop(&mut self) {
        let _ = remove_all_pins(&self.0);
        let _ = std::fs::remove_dir_all(self.0.root());
    }
}
