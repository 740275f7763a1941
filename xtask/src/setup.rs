//! `cargo xtask setup`: installs everything building and testing p25 needs.
//!
//! Every step first checks whether its work is already done and only acts when it is not,
//! so setup is safe (and fast) to run before every build and test.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// Debian packages the privileged tests call into: bpftool inspects loaded programs and
/// maps, iproute2 builds the network namespaces and veths, nftables is the comparison
/// filter for the differential tests, tcpdump captures traffic, swaks speaks SMTP, ping
/// checks reachability and procps provides sysctl.
///
/// The SMTP lab (`cargo xtask demo`, tests/tests/e2e.rs) adds: python3-aiosmtpd, the real
/// SMTP server on the lab's "internet" (a library, so no mail service is installed or left
/// listening on the host); the Perl modules swaks needs for TLS (465, STARTTLS) and IPv6;
/// openssl for the lab's throwaway certificate; ethtool to put VLAN tags into frames.
///
/// prometheus provides promtool (checks and unit-tests deploy/prometheus/alerts.yml) and
/// the server the tests start on a free loopback port to scrape p25d; the service its
/// package starts is stopped again, see [`SERVICES_TO_STOP`].
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "nftables",
    "tcpdump",
    "swaks",
    "iputils-ping",
    "procps",
    "python3-aiosmtpd",
    "libnet-ssleay-perl",
    "libio-socket-ssl-perl",
    "libio-socket-inet6-perl",
    "openssl",
    "ethtool",
    "prometheus",
    // systemd-analyze verify/security and systemd-sysusers check deploy/ (tests/tests/
    // unit_file.rs); setpriv and unshare run p25d unprivileged (tests/tests/privileges.rs).
    "systemd",
    "util-linux",
    // `cargo xtask package` and its test: lintian checks the .deb, dpkg-dev provides
    // dpkg-architecture and dpkg-shlibdeps for cargo-deb's `$auto` dependencies, man-db
    // lets lintian check the man pages.
    "lintian",
    "dpkg-dev",
    "man-db",
    // Fleet mode (docs/fleet.md): the etcd server and etcdctl the fleet tests and
    // `cargo xtask demo --fleet` run on loopback, and protoc, which the etcd-client crate's
    // build script needs to compile etcd's gRPC definitions.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
];

/// cargo-deb builds the Debian package; this release builds with the workspace's stable
/// rustc (1.95; cargo-deb 3.8 needs 1.85).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Services that installing a package of [`DEBIAN_PACKAGES`] starts (package, service).
/// Nothing of ours may be left running on the host: the tests start their own servers,
/// and a system Prometheus would listen on :9090 and scrape on its own (a system etcd on
/// :2379 likewise). Recommends (such as prometheus-node-exporter) are not installed at all.
const SERVICES_TO_STOP: &[(&str, &str)] = &[("prometheus", "prometheus"), ("etcd-server", "etcd")];

/// LLVM major version bpf-linker is built against; must match the `llvm-NN` cargo feature
/// and the LLVM that ships inside the nightly toolchain (rustc and bpf-linker have to agree
/// on the bitcode format).
const LLVM_MAJOR: u32 = 22;

/// Where the BPF filesystem must be mounted for aya to pin maps and programs.
const BPFFS: &str = "/sys/fs/bpf";

/// Runs every setup step in order, printing one status line per step.
pub fn run() -> Result<()> {
    check_root()?;
    println!("setup: root: ok");
    println!("setup: rust-src (nightly): {}", ensure_rust_src()?);
    println!("setup: bpf-linker: {}", ensure_bpf_linker()?);
    println!("setup: debian packages: {}", ensure_debian_packages()?);
    println!("setup: cargo-deb: {}", ensure_cargo_deb()?);
    println!("setup: bpffs: {}", ensure_bpffs()?);
    Ok(())
}

/// Fails early, with the reason, unless we run as root.
///
/// This check and [`bpffs_mounted`] are xtask's own copies of what the library offers
/// (`p25_tests::effective_uid`, `p25_tests::bpffs_mounted`): xtask must build on a fresh
/// machine before bpf-linker exists, and filter-user (which p25-tests depends on) builds
/// the eBPF object in its build script, so xtask cannot depend on either.
fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "setup must run as root (effective uid is {euid}): it installs Debian packages \
             and mounts the BPF filesystem at {BPFFS}, and the tests load eBPF programs; \
             re-run as root, e.g. `sudo -E cargo xtask setup`"
        );
    }
    Ok(())
}

/// The eBPF crate is built with `-Z build-std=core`, which needs the nightly `rust-src`.
fn ensure_rust_src() -> Result<String> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "could not list the components of the nightly toolchain \
         (is it installed? `rustup toolchain install nightly`)",
    )?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok("ok".to_owned());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("could not install rust-src for the nightly toolchain")?;
    Ok("installed rust-src".to_owned())
}

/// Makes sure a *working* bpf-linker is in PATH, building it against nightly's LLVM if not.
fn ensure_bpf_linker() -> Result<String> {
    let reason = match probe_version("bpf-linker") {
        Ok(version) => return Ok(format!("ok ({version})")),
        Err(reason) => reason,
    };
    println!("setup: bpf-linker: {reason}; building it against nightly's LLVM (takes ~1 min)");
    install_bpf_linker()?;
    let version = probe_version("bpf-linker").map_err(|reason| {
        anyhow::anyhow!(
            "bpf-linker was installed but still does not run: {reason}; \
             make sure {} is in PATH",
            cargo_home().map_or_else(
                |_| "$CARGO_HOME/bin".to_owned(),
                |home| { home.join("bin").display().to_string() }
            )
        )
    })?;
    Ok(format!("built and installed ({version})"))
}

/// Runs `<program> --version` and returns its first output line, or why it did not run.
///
/// A binary that merely exists is not enough: after a nightly update the libLLVM it was
/// linked against is gone and the dynamic loader refuses to start it.
fn probe_version(program: &str) -> Result<String, String> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|err| format!("`{program} --version` could not be started ({err})"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`{program} --version` failed ({}): {}",
            out.status,
            stderr.trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout.lines().next().unwrap_or_default().trim().to_owned())
}

/// Builds bpf-linker with `cargo install`, dynamically linked to the nightly toolchain's own
/// libLLVM so that it speaks exactly the LLVM version rustc nightly emits.
fn install_bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let sysroot_lib = sysroot.join("lib");
    let libllvm = find_nightly_libllvm(&sysroot_lib)?;

    // llvm-sys looks for `<LLVM_PREFIX>/lib/libLLVM.so`; the toolchain only ships the
    // versioned file, so give it a prefix dir holding just that symlink. It lives under
    // CARGO_HOME, not /tmp, because the built binary keeps the prefix in its RUNPATH.
    let prefix = cargo_home()?.join("p25-llvm");
    ensure_symlink(&prefix.join("lib").join("libLLVM.so"), &libllvm)?;

    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
            "--force",
        ])
        // Outside the workspace so its .cargo/config.toml and any toolchain file do not
        // apply: this is a plain stable build of a tool.
        .current_dir(&prefix)
        .env("LLVM_PREFIX", &prefix)
        // The rpath lets the installed binary find libLLVM.so.NN-rust-*-nightly at run time
        // without LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display()),
        );
    // `cargo run` (and rustup) hand these to us; they would pin the toolchain, redirect the
    // target dir or inject flags meant for the workspace into this unrelated build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        install.env_remove(var);
    }
    cmd::run(&mut install).context("building bpf-linker failed")
}

/// The nightly toolchain's sysroot, where its libLLVM lives.
fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd::output(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("could not find the nightly toolchain's sysroot")?;
    let sysroot = PathBuf::from(out.trim());
    ensure!(
        sysroot.is_dir(),
        "`rustc +nightly --print sysroot` printed {}, which is not a directory",
        sysroot.display()
    );
    Ok(sysroot)
}

/// Finds `libLLVM.so.NN.M-rust-*-nightly` in `lib_dir` and checks that NN is [`LLVM_MAJOR`].
fn find_nightly_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("could not list {}", lib_dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", lib_dir.display()))?;
        let name = entry.file_name();
        if let Some(major) = name.to_str().and_then(libllvm_major) {
            found.push((major, entry.path()));
        }
    }
    // Sorted so that the choice is deterministic should several ever be present.
    found.sort();
    if let Some((_, path)) = found.iter().rev().find(|(major, _)| *major == LLVM_MAJOR) {
        return Ok(path.clone());
    }
    if found.is_empty() {
        bail!(
            "no libLLVM.so.*-rust-*-nightly in {}: the nightly toolchain looks incomplete \
             (try `rustup toolchain install nightly --force`)",
            lib_dir.display()
        );
    }
    let names: Vec<String> = found.iter().map(|(_, p)| p.display().to_string()).collect();
    bail!(
        "nightly ships LLVM {} but bpf-linker is built with feature llvm-{LLVM_MAJOR}: found {}; \
         update LLVM_MAJOR in xtask/src/setup.rs (and check bpf-linker supports that LLVM)",
        found
            .iter()
            .map(|(major, _)| major.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        names.join(", ")
    )
}

/// LLVM major version of a file named like `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn libllvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    if !version.contains("-rust-") || !version.ends_with("-nightly") {
        return None;
    }
    version.split(['.', '-']).next()?.parse().ok()
}

/// Makes `link` a symlink to `target`, replacing whatever else is there.
fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    if let Ok(meta) = fs::symlink_metadata(link) {
        ensure!(
            !meta.is_dir(),
            "{} is a directory; expected a symlink to {}",
            link.display(),
            target.display()
        );
        fs::remove_file(link)
            .with_context(|| format!("could not remove stale {}", link.display()))?;
    }
    if let Some(dir) = link.parent() {
        fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    }
    symlink(target, link).with_context(|| {
        format!(
            "could not symlink {} -> {}",
            link.display(),
            target.display()
        )
    })
}

/// `$CARGO_HOME`, defaulting like cargo itself to `$HOME/.cargo`.
fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither CARGO_HOME nor HOME is set; cannot tell where cargo installs tools")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Installs cargo-deb (for `cargo xtask package`) unless `cargo deb --version` works.
fn ensure_cargo_deb() -> Result<String> {
    if let Ok(version) = cmd::output(cmd::cargo()?.args(["deb", "--version"])) {
        return Ok(format!("ok ({})", version.trim()));
    }
    println!("setup: cargo-deb: missing; installing {CARGO_DEB_VERSION} (takes ~3 min)");
    let mut install = cmd::cargo()?;
    install
        .args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ])
        // A tool build of its own, not part of the workspace's target directory.
        .env_remove("CARGO_TARGET_DIR");
    cmd::run(&mut install).context("installing cargo-deb failed")?;
    let version = cmd::output(cmd::cargo()?.args(["deb", "--version"])).context(
        "cargo-deb was installed but `cargo deb --version` still fails (is ~/.cargo/bin in PATH?)",
    )?;
    Ok(format!("installed ({})", version.trim()))
}

/// Installs the Debian packages the tests need, touching apt only when one is missing.
fn ensure_debian_packages() -> Result<String> {
    let missing = missing_debian_packages();
    if missing.is_empty() {
        return Ok("ok".to_owned());
    }
    let list = missing.join(" ");
    if probe_version("apt-get").is_err() {
        bail!("these packages are missing and apt-get is not available to install them: {list}");
    }
    cmd::run(Command::new("apt-get").arg("update")).context("apt-get update failed")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {list}"))?;
    let still_missing = missing_debian_packages();
    ensure!(
        still_missing.is_empty(),
        "apt-get succeeded but these packages are still not installed: {}",
        still_missing.join(" ")
    );
    stop_services_started_by(&missing)?;
    Ok(format!("installed {list}"))
}

/// Stops and disables the [`SERVICES_TO_STOP`] of packages that were just installed.
///
/// Only right after installing them: a service that was already there is the operator's.
/// Under systemd the unit is also masked, so that a later package upgrade does not start
/// it again; without systemd (containers, CI) the init script is used, which is harmless
/// when the service never started (e.g. because policy-rc.d forbade it).
fn stop_services_started_by(installed: &[&str]) -> Result<()> {
    for &(package, service) in SERVICES_TO_STOP {
        if !installed.contains(&package) {
            continue;
        }
        if Path::new("/run/systemd/system").is_dir() {
            cmd::run(Command::new("systemctl").args(["disable", "--now", service]))
                .with_context(|| format!("could not stop the {service} service"))?;
            cmd::run(Command::new("systemctl").args(["mask", service]))
                .with_context(|| format!("could not mask the {service} service"))?;
        } else if Path::new("/etc/init.d").join(service).is_file() {
            cmd::run(Command::new(format!("/etc/init.d/{service}")).arg("stop"))
                .with_context(|| format!("could not stop the {service} service"))?;
            cmd::run(Command::new("update-rc.d").args([service, "disable"]))
                .with_context(|| format!("could not disable the {service} service"))?;
        }
    }
    Ok(())
}

/// Which of [`DEBIAN_PACKAGES`] dpkg does not report as "install ok installed".
///
/// One dpkg-query call for all of them keeps a no-op setup fast. It exits non-zero when
/// some package is unknown to dpkg, which just means "missing", so its status is ignored;
/// if it cannot run at all, everything counts as missing.
fn missing_debian_packages() -> Vec<&'static str> {
    let installed: Vec<String> = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(DEBIAN_PACKAGES)
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| line.strip_suffix(" install ok installed"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !installed.iter().any(|name| name == pkg))
        .collect()
}

/// Mounts the BPF filesystem at [`BPFFS`] unless it already is.
fn ensure_bpffs() -> Result<String> {
    if bpffs_mounted()? {
        return Ok(format!("ok ({BPFFS})"));
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("could not create {BPFFS}"))?;
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("could not mount the BPF filesystem at {BPFFS}"))?;
    ensure!(
        bpffs_mounted()?,
        "mount succeeded but {BPFFS} is still not a bpf filesystem"
    );
    Ok(format!("mounted bpf filesystem at {BPFFS}"))
}

/// Whether /proc/self/mounts lists a bpf filesystem mounted at [`BPFFS`].
fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .context("could not read /proc/self/mounts to check the BPF filesystem")?;
    Ok(mounts_have_bpffs(&mounts))
}

/// Parses the mounts table: fields are `device mountpoint fstype options ...`.
fn mounts_have_bpffs(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn libllvm_major_parses_nightly_names_only() {
        assert_eq!(
            libllvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(
            libllvm_major("libLLVM.so.23.0-rust-1.99.0-nightly"),
            Some(23)
        );
        // The unversioned alias and stable builds must not be picked.
        assert_eq!(libllvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(libllvm_major("libLLVM.so.22.1-rust-1.95.0-stable"), None);
        assert_eq!(libllvm_major("libLLVM.so"), None);
    }

    #[test]
    fn mounts_parsing_needs_bpf_type_at_bpffs() {
        assert!(mounts_have_bpffs(
            "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,nosuid 0 0\n"
        ));
        assert!(!mounts_have_bpffs("sysfs /sys sysfs rw 0 0\n"));
        assert!(!mounts_have_bpffs("none /sys/fs/bpf tmpfs rw 0 0\n"));
    }

    /// A missing bpf-linker must trigger the rebuild path.
    #[test]
    fn probe_rejects_missing_binary() {
        let err = probe_version("p25-no-such-binary-xyz")
            .err()
            .unwrap_or_default();
        assert!(err.contains("could not be started"), "{err}");
    }

    /// A stale bpf-linker exists but cannot load its libLLVM: the loader exits 127 with an
    /// error on stderr. Exercised with a script that behaves the same way.
    #[test]
    fn probe_rejects_binary_that_fails_to_run() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("p25-xtask-probe-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let script = dir.join("stale-bpf-linker");
        fs::write(
            &script,
            "#!/bin/sh\necho 'error while loading shared libraries: libLLVM.so.22.1' >&2\nexit 127\n",
        )?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
        let result = probe_version(&script.to_string_lossy());
        fs::remove_dir_all(&dir)?;
        let err = result.err().unwrap_or_default();
        assert!(err.contains("exit status: 127"), "{err}");
        assert!(
            err.contains("error while loading shared libraries"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn probe_accepts_working_binary() {
        // `sh --version` is not portable, so use a tool whose --version surely works here.
        let version = probe_version("cargo");
        assert!(
            version.as_deref().is_ok_and(|v| v.starts_with("cargo ")),
            "{version:?}"
        );
    }

    #[test]
    fn ensure_symlink_replaces_wrong_target() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("p25-xtask-link-{}", std::process::id()));
        let link = dir.join("lib").join("libLLVM.so");
        ensure_symlink(&link, Path::new("/wrong"))?;
        ensure_symlink(&link, Path::new("/right"))?;
        let target = fs::read_link(&link)?;
        // Idempotent when already right.
        ensure_symlink(&link, Path::new("/right"))?;
        fs::remove_dir_all(&dir)?;
        assert_eq!(target, PathBuf::from("/right"));
        Ok(())
    }
}
