//! Builds the eBPF object (filter-ebpf) for bpfel-unknown-none with the nightly toolchain
//! and `-Z build-std=core`, via aya-build; the loader embeds the result.
//!
//! Needs rust-src on nightly and bpf-linker on PATH: `cargo xtask setup` provides both.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("filter-user has no parent directory"))?
        .join("filter-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "filter-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object failed; is `cargo xtask setup` done (rust-src on nightly, bpf-linker on PATH)?")
}
