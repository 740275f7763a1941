//! Builds the benchmark-only eBPF object (bench-ebpf: floors and the traffic generator) for
//! bpfel-unknown-none with nightly and `-Z build-std=core`, via aya-build, exactly like
//! filter-user/build.rs builds the production object. The two objects stay separate so
//! nothing benchmark-only ever ships in p25.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("bench has no parent directory"))?
        .join("bench-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bench-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the benchmark eBPF object failed; is `cargo xtask setup` done (rust-src on nightly, bpf-linker on PATH)?")
}
