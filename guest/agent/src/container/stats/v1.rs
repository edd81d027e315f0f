//! The cgroup figures of a v1 cgroup (native pods on legacy or hybrid hosts), mapped to the fields the v2
//! path fills. v1 has no PSI (pressure stays None) and no memory.min (memory_reservation_bytes is the soft
//! limit instead); everything else has a v1 counterpart, 0 when its controller is not mounted.

use std::path::Path;

use podvisor_proto as pb;

use super::{device_name, keyed, Cgroup};

/// v1 limit files hold "unlimited" as the page-rounded largest long (9223372036854771712 with 4 KiB pages);
/// anything above this (or -1, as in cpu.cfs_quota_us) is no limit.
const UNLIMITED_ABOVE: u64 = 1 << 62;

/// The file `name` of the `controller` hierarchy, "" when missing.
type Files<'a> = dyn Fn(&str, &str) -> String + 'a;

/// The cgroup figures of `cgroup` (v1), block devices named from `sys`.
pub fn read(cgroup: &Cgroup, sys: &Path) -> pb::StatsContainerResponse {
    let file = |controller: &str, name: &str| {
        cgroup
            .controller_dir(controller)
            .and_then(|d| std::fs::read_to_string(d.join(name)).ok())
            .unwrap_or_default()
    };
    let mut s = pb::StatsContainerResponse::default();
    cpu(&mut s, &file);
    memory(&mut s, &file);
    s.pids = number(&file("pids", "pids.current"));
    s.pids_limit = limit(&file("pids", "pids.max"));
    // The _recursive files count the descendants too, like v2's io.stat (older kernels only have the others).
    let blkio = |name: &str| {
        let recursive = file("blkio", &format!("{name}_recursive"));
        if recursive.is_empty() {
            file("blkio", name)
        } else {
            recursive
        }
    };
    s.block_io = block_io(
        &blkio("blkio.throttle.io_service_bytes"),
        &blkio("blkio.throttle.io_serviced"),
        sys,
    );
    s.io_read_bytes = s.block_io.iter().map(|d| d.read_bytes).sum();
    s.io_write_bytes = s.block_io.iter().map(|d| d.write_bytes).sum();
    s
}

/// A single-number file (0 when missing or not a number).
fn number(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// A limit file: 0 for "no limit" (-1, "max", the huge v1 value) like the v2 path, else the limit.
fn limit(text: &str) -> u64 {
    match text.trim().parse::<u64>() {
        Ok(v) if v <= UNLIMITED_ABOVE => v,
        _ => 0,
    }
}

/// cpuacct (usage, user and system time) and cpu (CFS throttling, quota, period, shares as a v2 weight).
fn cpu(s: &mut pb::StatsContainerResponse, file: &Files<'_>) {
    s.cpu_usage_ns = number(&file("cpuacct", "cpuacct.usage"));
    // cpuacct.usage_user/_sys (ns, Linux 4.7+), else cpuacct.stat in clock ticks.
    let stat = file("cpuacct", "cpuacct.stat");
    let tick_ns = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(10_000_000, |t| 1_000_000_000 / t as u64);
    let ns = |precise: &str, ticks: &str| {
        file("cpuacct", precise)
            .trim()
            .parse()
            .ok()
            .unwrap_or_else(|| keyed(&stat, ticks).unwrap_or(0).saturating_mul(tick_ns))
    };
    s.cpu_user_ns = ns("cpuacct.usage_user", "user");
    s.cpu_system_ns = ns("cpuacct.usage_sys", "system");
    let stat = file("cpu", "cpu.stat");
    let k = |key: &str| keyed(&stat, key).unwrap_or(0);
    s.cpu_periods = k("nr_periods");
    s.cpu_throttled_periods = k("nr_throttled");
    s.cpu_throttled_ns = k("throttled_time");
    s.cpu_quota_us = limit(&file("cpu", "cpu.cfs_quota_us"));
    s.cpu_period_us = number(&file("cpu", "cpu.cfs_period_us"));
    s.cpu_weight = shares_to_weight(number(&file("cpu", "cpu.shares")));
}

/// cpu.shares [2, 262144] as the cgroup v2 cpu.weight [1, 10000] it corresponds to (the conversion runc,
/// crun and libcgroups use when they write a weight); 0 when unknown.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// The memory controller's files. memory.stat's `total_*` keys count the descendants too (like v2's
/// memory.stat); the local keys stand in when a kernel lacks them.
fn memory(s: &mut pb::StatsContainerResponse, file: &Files<'_>) {
    let m = |name: &str| file("memory", name);
    let stat = m("memory.stat");
    let k = |key: &str| {
        keyed(&stat, &format!("total_{key}"))
            .or_else(|| keyed(&stat, key))
            .unwrap_or(0)
    };
    s.memory_usage_bytes = number(&m("memory.usage_in_bytes"));
    s.memory_working_set_bytes = s.memory_usage_bytes.saturating_sub(k("inactive_file"));
    s.memory_rss_bytes = k("rss");
    s.memory_cache_bytes = k("cache");
    s.memory_mapped_file_bytes = k("mapped_file");
    s.memory_swap_bytes = k("swap");
    s.page_faults = k("pgfault");
    s.major_page_faults = k("pgmajfault");
    s.memory_kernel_bytes = number(&m("memory.kmem.usage_in_bytes"));
    s.memory_limit_bytes = limit(&m("memory.limit_in_bytes"));
    // memsw counts memory plus swap; v2's swap.max is swap alone. 0 (no limit) when memsw is unlimited.
    let memsw = limit(&m("memory.memsw.limit_in_bytes"));
    s.memory_swap_limit_bytes = memsw.saturating_sub(s.memory_limit_bytes);
    s.memory_max_usage_bytes = number(&m("memory.max_usage_in_bytes"));
    s.memory_reservation_bytes = limit(&m("memory.soft_limit_in_bytes"));
    s.memory_failcnt = number(&m("memory.failcnt"));
    s.oom_kills = keyed(&m("memory.oom_control"), "oom_kill").unwrap_or(0);
}

/// blkio.throttle.io_service_bytes and io_serviced ("MAJ:MIN Read|Write|Sync|Async|Discard|Total N" lines
/// and a last "Total N"), per device in first-seen order, devices named from sysfs.
fn block_io(bytes: &str, serviced: &str, sys: &Path) -> Vec<pb::BlockIoStats> {
    let mut devices: Vec<pb::BlockIoStats> = Vec::new();
    for (text, is_bytes) in [(bytes, true), (serviced, false)] {
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(dev), Some(op), Some(value)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Some((Ok(major), Ok(minor))) = dev
                .split_once(':')
                .map(|(a, b)| (a.parse::<u32>(), b.parse::<u32>()))
            else {
                continue;
            };
            let value = value.parse().unwrap_or(0);
            let i = match devices
                .iter()
                .position(|d| (d.major, d.minor) == (major, minor))
            {
                Some(i) => i,
                None => {
                    devices.push(pb::BlockIoStats {
                        major,
                        minor,
                        device: device_name(sys, major, minor),
                        ..Default::default()
                    });
                    devices.len() - 1
                }
            };
            let d = &mut devices[i];
            match (op, is_bytes) {
                ("Read", true) => d.read_bytes = value,
                ("Write", true) => d.write_bytes = value,
                ("Read", false) => d.reads = value,
                ("Write", false) => d.writes = value,
                _ => {}
            }
        }
    }
    devices
}
