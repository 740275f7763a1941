//! Rebuild when bpf-linker changes: the eBPF object depends on it, but cargo cannot see
//! that dependency (aya-template does the same).
fn main() {
    // Only the BPF build links with bpf-linker; the host build (this crate is a
    // build-dependency of p25-bench) must not require it.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf")
        && let Ok(linker) = which::which("bpf-linker")
    {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
