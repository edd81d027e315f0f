//! A container's usage numbers, read straight from its cgroup files (v2, or v1 on hosts: `v1`), its processes'
//! /proc entries and its writable layer (libcgroups' stats also need PSI and hugetlb files, which the guest
//! kernel leaves out).

use std::path::Path;

use podvisor_proto as pb;

use super::cgroup::{keyed, Cgroup};
use super::ContainerError;

/// Where the stats come from: procfs and sysfs (for block device names).
#[derive(Debug, Clone, Copy)]
pub struct Roots<'a> {
    /// procfs.
    pub proc: &'a Path,
    /// sysfs.
    pub sys: &'a Path,
}

/// Everything StatsContainer reports for the container whose cgroup is `cgroup` and whose writable layer is
/// mounted at `layer`.
pub fn read(
    cgroup: &Cgroup,
    layer: &Path,
    roots: Roots<'_>,
) -> Result<pb::StatsContainerResponse, ContainerError> {
    if !cgroup.exists() {
        return Err(ContainerError::Internal(format!(
            "cgroup {} is gone",
            cgroup.relative().display()
        )));
    }
    let mut s = match cgroup.v2_dir() {
        Some(dir) => v2(&dir, roots.sys),
        None => v1::read(cgroup, roots.sys),
    };
    processes(&mut s, &cgroup.pids(), roots.proc);
    if let Ok(fs) = nix::sys::statvfs::statvfs(layer) {
        let frag = fs.fragment_size();
        s.writable_layer_capacity_bytes = fs.blocks().saturating_mul(frag);
        s.writable_layer_used_bytes = fs.blocks().saturating_sub(fs.blocks_free()) * frag;
        s.writable_layer_inodes_total = fs.files();
        s.writable_layer_inodes_free = fs.files_free();
        s.writable_layer_inodes_used = fs.files().saturating_sub(fs.files_free());
    }
    s.timestamp_unix_ns = super::process::unix_ns(std::time::SystemTime::now());
    Ok(s)
}

/// The cgroup figures of the v2 cgroup `dir`.
fn v2(dir: &Path, sys: &Path) -> pb::StatsContainerResponse {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let text = |f: &str| read(f).unwrap_or_default();
    // "max" (unlimited) and missing files parse as 0, which is what the response uses for "no limit".
    let single = |f: &str| text(f).trim().parse::<u64>().unwrap_or(0);
    let mut s = pb::StatsContainerResponse::default();
    cpu(
        &mut s,
        &text("cpu.stat"),
        &text("cpu.max"),
        single("cpu.weight"),
    );
    memory(&mut s, &text("memory.stat"), &text("memory.events"));
    s.memory_usage_bytes = single("memory.current");
    s.memory_working_set_bytes = s
        .memory_usage_bytes
        .saturating_sub(stat_or_0(&text("memory.stat"), "inactive_file"));
    s.memory_limit_bytes = single("memory.max");
    s.memory_swap_bytes = single("memory.swap.current");
    s.memory_max_usage_bytes = single("memory.peak");
    s.memory_reservation_bytes = single("memory.min");
    s.memory_swap_limit_bytes = single("memory.swap.max");
    s.pids = single("pids.current");
    s.pids_limit = single("pids.max");
    s.block_io = block_io(&text("io.stat"), sys);
    s.io_read_bytes = s.block_io.iter().map(|d| d.read_bytes).sum();
    s.io_write_bytes = s.block_io.iter().map(|d| d.write_bytes).sum();
    s.pressure = match (
        read("cpu.pressure"),
        read("io.pressure"),
        read("memory.pressure"),
    ) {
        (Some(c), Some(i), Some(m)) => Some(pressure(&c, &i, &m)),
        _ => None,
    };
    s
}

fn stat_or_0(text: &str, key: &str) -> u64 {
    keyed(text, key).unwrap_or(0)
}

/// cpu.stat (usage and CFS throttling), cpu.max ("quota period" or "max period") and cpu.weight.
fn cpu(s: &mut pb::StatsContainerResponse, stat: &str, max: &str, weight: u64) {
    let usec = |k: &str| stat_or_0(stat, k).saturating_mul(1000);
    s.cpu_usage_ns = usec("usage_usec");
    s.cpu_user_ns = usec("user_usec");
    s.cpu_system_ns = usec("system_usec");
    s.cpu_throttled_ns = usec("throttled_usec");
    s.cpu_periods = stat_or_0(stat, "nr_periods");
    s.cpu_throttled_periods = stat_or_0(stat, "nr_throttled");
    let mut max = max.split_whitespace();
    s.cpu_quota_us = max.next().and_then(|q| q.parse().ok()).unwrap_or(0);
    s.cpu_period_us = max.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    s.cpu_weight = weight;
}

/// memory.stat and memory.events.
fn memory(s: &mut pb::StatsContainerResponse, stat: &str, events: &str) {
    let k = |key: &str| stat_or_0(stat, key);
    s.memory_rss_bytes = k("anon");
    s.memory_cache_bytes = k("file");
    s.memory_mapped_file_bytes = k("file_mapped");
    s.page_faults = k("pgfault");
    s.major_page_faults = k("pgmajfault");
    // `kernel` exists from Linux 6.0 on; before, its parts.
    s.memory_kernel_bytes = keyed(stat, "kernel").unwrap_or_else(|| {
        [
            "kernel_stack",
            "pagetables",
            "percpu",
            "sock",
            "vmalloc",
            "slab",
        ]
        .iter()
        .map(|key| k(key))
        .sum()
    });
    s.memory_failcnt = stat_or_0(events, "max");
    s.oom_kills = stat_or_0(events, "oom_kill");
}

/// io.stat lines (`MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`), devices named from sysfs.
fn block_io(text: &str, sys: &Path) -> Vec<pb::BlockIoStats> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut d = pb::BlockIoStats {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..Default::default()
            };
            for (k, v) in fields.filter_map(|f| f.split_once('=')) {
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => d.read_bytes = v,
                    "wbytes" => d.write_bytes = v,
                    "rios" => d.reads = v,
                    "wios" => d.writes = v,
                    _ => {}
                }
            }
            d.device = device_name(sys, d.major, d.minor);
            Some(d)
        })
        .collect()
}

/// `/dev/<DEVNAME>` from /sys/dev/block/MAJ:MIN/uevent, else "MAJ:MIN".
fn device_name(sys: &Path, major: u32, minor: u32) -> String {
    let uevent = sys.join(format!("dev/block/{major}:{minor}/uevent"));
    std::fs::read_to_string(uevent)
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME="))
                .map(|n| format!("/dev/{}", n.trim()))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

/// The `total=` of the `some` and `full` lines of a *.pressure file, microseconds.
fn psi_totals(text: &str) -> (u64, u64) {
    let total = |kind: &str| {
        text.lines()
            .find(|l| l.starts_with(kind))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (total("some "), total("full "))
}

fn pressure(cpu: &str, io: &str, memory: &str) -> pb::Pressure {
    let (cpu_some_us, cpu_full_us) = psi_totals(cpu);
    let (io_some_us, io_full_us) = psi_totals(io);
    let (memory_some_us, memory_full_us) = psi_totals(memory);
    pb::Pressure {
        cpu_some_us,
        cpu_full_us,
        io_some_us,
        io_full_us,
        memory_some_us,
        memory_full_us,
    }
}

/// Process count, open file descriptors and sockets of `pids`, and the first one's RLIMIT_NOFILE (as
/// cAdvisor counts them).
fn processes(s: &mut pb::StatsContainerResponse, pids: &[i32], proc_root: &Path) {
    s.processes = pids.len() as u64;
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(proc_root.join(format!("{pid}/fd"))) else {
            continue;
        };
        for fd in fds.flatten() {
            s.file_descriptors += 1;
            if std::fs::read_link(fd.path())
                .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
            {
                s.sockets += 1;
            }
        }
    }
    s.nofile_soft_limit = pids
        .iter()
        .min()
        .and_then(|pid| std::fs::read_to_string(proc_root.join(format!("{pid}/limits"))).ok())
        .and_then(|l| nofile_soft(&l))
        .unwrap_or(0);
}

/// The soft "Max open files" of a /proc/<pid>/limits text (u64::MAX for unlimited).
fn nofile_soft(limits: &str) -> Option<u64> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    match rest.split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

mod v1;

#[cfg(test)]
mod tests;
