//! Small OS helpers: root check, CPU pinning, per-thread CPU time, command running.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail, ensure};

/// Fails unless running as root (the benchmarks load BPF programs and create netns).
pub fn require_root() -> Result<()> {
    let euid = p25_tests::effective_uid();
    ensure!(
        euid == 0,
        "p25-bench loads eBPF programs and creates network namespaces: run it as root \
         (`cargo xtask bench` as root); euid is {euid}"
    );
    Ok(())
}

/// Number of CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Pins the calling thread (`tid` 0) or another task to one CPU.
pub fn pin_to_cpu(tid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is bounds-checked by the macro's
    // implementation against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &raw const set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning task {tid} to CPU {cpu}"));
    }
    Ok(())
}

/// CPU time consumed by the calling thread, in nanoseconds (user + system). Time the
/// thread spends preempted by other work does not count, which is what a per-packet
/// figure on a shared machine needs.
pub fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    if rc != 0 {
        return 0;
    }
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Runs a command, returns its stdout; the error names the command and carries stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a shell-free command line given as words.
pub fn cmd(words: &[&str]) -> Result<String> {
    let Some((program, args)) = words.split_first() else {
        bail!("empty command");
    };
    run(Command::new(program).args(args))
}

/// Makes SIGINT, SIGTERM and SIGHUP run `cleanup` and exit with 128 + the signal, instead
/// of killing the process with nothing removed (no destructor runs on a signal).
///
/// Call it first, before any thread starts: the signals are blocked in the calling thread
/// and so in every thread started after it, and one thread waits for them. Children do
/// not inherit the block (std's `Command` clears the signal mask before exec).
pub fn on_signal_exit(cleanup: fn()) -> Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&raw mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&raw mut set, sig);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    ensure!(rc == 0, "pthread_sigmask failed ({rc})");
    std::thread::Builder::new()
        .name("p25b-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid; sigwait only fails for an invalid set.
            let rc = unsafe { libc::sigwait(&raw const set, &raw mut sig) };
            if rc != 0 {
                eprintln!("p25-bench: sigwait failed ({rc}); signals stay blocked");
                return;
            }
            eprintln!("p25-bench: signal {sig}: removing what this run created");
            cleanup();
            // SAFETY: _exit ends the process at once; p25d children die with it
            // (PR_SET_PDEATHSIG).
            unsafe { libc::_exit(128 + sig) }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// SIGKILLs and reaps every child process of this one (from a signal handler's thread:
/// no destructor runs after it, so children not tracked elsewhere, such as the fleet
/// section's etcd and p25d, would outlive the benchmark).
pub fn kill_children() {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // /proc/PID/stat: "PID (COMM) STATE PPID ..."; COMM may hold spaces and parens.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) {
            // SAFETY: plain syscalls on our own child, which nothing else reaps now.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
