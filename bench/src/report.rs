//! The report: machine, settings, every section's results; printed as a table and written
//! as JSON.

use std::{fmt::Write as _, fs, path::Path, time::SystemTime};

use anyhow::{Context as _, Result};

use crate::{control, dataplane, fleet, scale::Scale, throughput};

/// What the machine was.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus: usize,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// The load average when the run started (the machine is shared).
    pub loadavg_at_start: String,
}

impl Machine {
    fn probe() -> Self {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_owned());
        let memory_mib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            cpus: crate::sys::online_cpus(),
            memory_mib,
            loadavg_at_start: loadavg(),
        }
    }
}

/// `/proc/loadavg`.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The whole run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// When the run started (UTC).
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// Command-line settings, as parsed.
    pub settings: String,
    /// Policy size used by every section.
    pub scale: Scale,
    /// Seconds from spawning p25d to "policy in force", for the dataplane sections (p25d
    /// fills the maps the benchmark measures).
    pub policy_load_seconds: Option<f64>,
    /// The p25 dataplane ABI version measured.
    pub abi_version: u32,
    /// Per-packet cost.
    pub dataplane: Option<dataplane::Report>,
    /// Drop throughput.
    pub throughput: Option<throughput::Report>,
    /// Control plane.
    pub control: Option<control::Report>,
    /// Fleet propagation.
    pub fleet: Option<fleet::Report>,
    /// The load average when the run ended.
    pub loadavg_at_end: String,
}

impl Report {
    /// An empty report for this machine and settings.
    pub fn new(settings: &str, scale: Scale) -> Result<Self> {
        Ok(Self {
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            machine: Machine::probe(),
            settings: settings.to_owned(),
            scale,
            policy_load_seconds: None,
            abi_version: filter_common::abi::ABI_VERSION,
            loadavg_at_end: String::new(),
            dataplane: None,
            throughput: None,
            control: None,
            fleet: None,
        })
    }

    /// Writes the JSON report, creating the directory.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Records the load average at the end of the run.
    pub fn finish(&mut self) {
        self.loadavg_at_end = loadavg();
    }

    /// Prints the tables to stdout.
    pub fn print(&self) {
        println!("{}", self.render());
    }

    /// The tables as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "p25 benchmark, {} | kernel {} | {} x {} | {} MiB | load at start {}",
            self.date, m.kernel, m.cpus, m.cpu_model, m.memory_mib, m.loadavg_at_start
        );
        let _ = writeln!(
            out,
            "policy: {} subscriber prefixes, {} allowlist entries (IPv4 and IPv6 mixed); dataplane ABI v{}",
            self.scale.subscribers(),
            self.scale.allow(),
            self.abi_version
        );
        if let Some(seconds) = self.policy_load_seconds {
            let _ = writeln!(
                out,
                "policy loaded through p25d (spawn to policy in force) in {seconds:.2} s"
            );
        }
        if let Some(d) = &self.dataplane {
            out.push_str(&d.render());
        }
        if let Some(t) = &self.throughput {
            out.push_str(&t.render());
        }
        if let Some(c) = &self.control {
            out.push_str(&c.render());
        }
        if let Some(f) = &self.fleet {
            out.push_str(&f.render());
        }
        let _ = writeln!(out, "\nload average at the end: {}", self.loadavg_at_end);
        out
    }
}
