use super::*;

/// memory.stat of a Linux 6.1 cgroup v2 container (busybox sh running `sleep`).
const MEMORY_STAT: &str = "anon 1191936
file 3530752
kernel 749568
kernel_stack 32768
pagetables 57344
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 122880
zswap 0
zswapped 0
file_mapped 2433024
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 1298432
active_anon 16384
inactive_file 2809856
active_file 720896
unevictable 0
slab_reclaimable 469688
slab_unreclaimable 152744
slab 622432
workingset_refault_anon 0
workingset_refault_file 0
workingset_activate_anon 0
workingset_activate_file 0
workingset_restore_anon 0
workingset_restore_file 0
workingset_nodereclaim 0
pgscan 0
pgsteal 0
pgscan_kswapd 0
pgscan_direct 0
pgsteal_kswapd 0
pgsteal_direct 0
pgfault 2045
pgmajfault 31
pgrefill 0
pgactivate 176
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
thp_fault_alloc 0
thp_collapse_alloc 0
";

/// Writes `files` into a new cgroup directory `podvisor/c1` under a temporary root.
fn cgroup_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Cgroup) {
    let dir = tempfile::tempdir().unwrap();
    let cg = Cgroup::new(dir.path(), "podvisor/c1");
    std::fs::create_dir_all(cg.v2_dir().unwrap()).unwrap();
    for (f, v) in files {
        std::fs::write(cg.v2_dir().unwrap().join(f), v).unwrap();
    }
    (dir, cg)
}

fn roots(dir: &Path) -> Roots<'_> {
    Roots {
        proc: dir,
        sys: dir,
    }
}

#[test]
fn reads_cgroup_v2_files() {
    let (dir, cg) = cgroup_with(&[
        (
            "cpu.stat",
            "usage_usec 1503211\nuser_usec 1002114\nsystem_usec 501097\n\
             nr_periods 40\nnr_throttled 7\nthrottled_usec 350812\n",
        ),
        ("cpu.max", "20000 100000\n"),
        ("cpu.weight", "39\n"),
        ("memory.current", "4096000\n"),
        ("memory.max", "67108864\n"),
        ("memory.min", "0\n"),
        ("memory.peak", "5242880\n"),
        ("memory.stat", MEMORY_STAT),
        (
            "memory.events",
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
        ),
        ("pids.current", "3\n"),
        ("pids.max", "max\n"),
        (
            "io.stat",
            "254:0 rbytes=1052672 wbytes=0 rios=47 wios=0 dbytes=0 dios=0\n\
             254:16 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
        ),
    ]);
    let sys = dir.path().join("dev/block/254:0");
    std::fs::create_dir_all(&sys).unwrap();
    std::fs::write(
        sys.join("uevent"),
        "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
    )
    .unwrap();
    let s = read(&cg, Path::new("/nonexistent"), roots(dir.path())).unwrap();
    assert_eq!(
        (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns),
        (1_503_211_000, 1_002_114_000, 501_097_000)
    );
    assert_eq!(
        (s.cpu_periods, s.cpu_throttled_periods, s.cpu_throttled_ns),
        (40, 7, 350_812_000)
    );
    assert_eq!(
        (s.cpu_quota_us, s.cpu_period_us, s.cpu_weight),
        (20_000, 100_000, 39)
    );
    assert_eq!(
        (s.memory_usage_bytes, s.memory_working_set_bytes),
        (4_096_000, 4_096_000 - 2_809_856)
    );
    assert_eq!(
        (
            s.memory_rss_bytes,
            s.memory_cache_bytes,
            s.memory_mapped_file_bytes,
            s.memory_kernel_bytes
        ),
        (1_191_936, 3_530_752, 2_433_024, 749_568)
    );
    assert_eq!(
        (
            s.memory_limit_bytes,
            s.memory_max_usage_bytes,
            s.memory_failcnt,
            s.oom_kills
        ),
        (67_108_864, 5_242_880, 12, 1)
    );
    // No swap in the guest: no memory.swap.* files.
    assert_eq!((s.memory_swap_bytes, s.memory_swap_limit_bytes), (0, 0));
    assert_eq!((s.page_faults, s.major_page_faults), (2045, 31));
    assert_eq!((s.pids, s.pids_limit), (3, 0));
    assert_eq!(s.block_io.len(), 2);
    let vda = &s.block_io[0];
    assert_eq!(
        (vda.device.as_str(), vda.read_bytes, vda.reads, vda.writes),
        ("/dev/vda", 1_052_672, 47, 0)
    );
    assert_eq!(s.block_io[1].device, "254:16", "no sysfs entry");
    assert_eq!((s.io_read_bytes, s.io_write_bytes), (1_056_768, 8192));
    assert!(s.pressure.is_none(), "no *.pressure files: no PSI");
    assert!(s.timestamp_unix_ns > 0);
    std::fs::remove_dir_all(cg.v2_dir().unwrap()).unwrap();
    assert!(
        read(&cg, Path::new("/"), roots(dir.path())).is_err(),
        "cgroup gone"
    );
}

#[test]
fn unlimited_cpu_and_kernel_memory_before_6_0() {
    let stat: String = MEMORY_STAT
        .lines()
        .filter(|l| !l.starts_with("kernel "))
        .map(|l| format!("{l}\n"))
        .collect();
    let (dir, cg) = cgroup_with(&[("cpu.max", "max 100000\n"), ("memory.stat", &stat)]);
    let s = read(&cg, Path::new("/nonexistent"), roots(dir.path())).unwrap();
    assert_eq!((s.cpu_quota_us, s.cpu_period_us), (0, 100_000));
    // kernel_stack + pagetables + slab.
    assert_eq!(s.memory_kernel_bytes, 32_768 + 57_344 + 622_432);
}

#[test]
fn pressure_totals() {
    let (dir, cg) = cgroup_with(&[
        (
            "cpu.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=567\n",
        ),
        (
            "io.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=89\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=10\n",
        ),
        (
            "memory.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        ),
    ]);
    let p = read(&cg, Path::new("/nonexistent"), roots(dir.path()))
        .unwrap()
        .pressure
        .unwrap();
    assert_eq!(
        (p.cpu_some_us, p.cpu_full_us, p.io_some_us, p.io_full_us),
        (1234, 567, 89, 10)
    );
}

#[test]
fn processes_fds_sockets_and_nofile() {
    // The test's own process stands in for a container process: its fds are real.
    let me = std::process::id() as i32;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_dir, cg) = cgroup_with(&[("cgroup.procs", &format!("{me}\n"))]);
    let roots = Roots {
        proc: Path::new("/proc"),
        sys: Path::new("/sys"),
    };
    let s = read(&cg, Path::new("/nonexistent"), roots).unwrap();
    assert_eq!(s.processes, 1);
    assert!(s.sockets >= 1, "{s:?}");
    assert!(s.file_descriptors > s.sockets, "{s:?}");
    assert!(s.nofile_soft_limit > 0);
    drop(listener);
    assert_eq!(
        nofile_soft(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max open files            1024                 524288               files     \n"
        ),
        Some(1024)
    );
    assert_eq!(
        nofile_soft("Max open files            unlimited            unlimited            files\n"),
        Some(u64::MAX)
    );
}

#[test]
fn writable_layer_figures() {
    let (dir, cg) = cgroup_with(&[]);
    let s = read(&cg, dir.path(), roots(dir.path())).unwrap();
    assert!(s.writable_layer_capacity_bytes >= s.writable_layer_used_bytes);
    assert!(s.writable_layer_capacity_bytes > 0);
    assert!(s.writable_layer_inodes_total >= s.writable_layer_inodes_free);
}

/// memory.stat of a cgroup v1 container (Linux 6.18): local and `total_` (hierarchical) figures.
const V1_MEMORY_STAT: &str = "cache 1000\nrss 2000\nmapped_file 300\nswap 0\npgfault 40\n\
pgmajfault 4\ninactive_file 100\ntotal_cache 3530752\ntotal_rss 1191936\ntotal_rss_huge 0\n\
total_shmem 0\ntotal_mapped_file 2433024\ntotal_swap 8192\ntotal_pgfault 2045\n\
total_pgmajfault 31\ntotal_inactive_anon 0\ntotal_inactive_file 2809856\n";

/// A fake v1 host under a temporary directory with `files` (controller, name, content) in the cgroup
/// `kubepods/c1` of each controller's hierarchy.
fn v1_cgroup_with(files: &[(&str, &str, &str)]) -> (tempfile::TempDir, Cgroup) {
    let dir = tempfile::tempdir().unwrap();
    let mounts = ["memory", "cpu", "cpuacct", "pids", "blkio"]
        .map(|c| (c.to_string(), dir.path().join("cgroup").join(c)));
    let cg = Cgroup::v1(mounts, "/kubepods/c1");
    for d in cg.dirs() {
        std::fs::create_dir_all(d).unwrap();
    }
    for (controller, name, content) in files {
        let path = cg.controller_dir(controller).unwrap().join(name);
        std::fs::write(path, content).unwrap();
    }
    (dir, cg)
}

#[test]
fn reads_cgroup_v1_files() {
    let (dir, cg) = v1_cgroup_with(&[
        ("cpuacct", "cpuacct.usage", "1503211000\n"),
        ("cpuacct", "cpuacct.usage_user", "1002114000\n"),
        ("cpuacct", "cpuacct.usage_sys", "501097000\n"),
        ("cpuacct", "cpuacct.stat", "user 100\nsystem 50\n"),
        (
            "cpu",
            "cpu.stat",
            "nr_periods 40\nnr_throttled 7\nthrottled_time 350812000\n",
        ),
        ("cpu", "cpu.cfs_quota_us", "20000\n"),
        ("cpu", "cpu.cfs_period_us", "100000\n"),
        ("cpu", "cpu.shares", "1024\n"),
        ("memory", "memory.usage_in_bytes", "4096000\n"),
        ("memory", "memory.limit_in_bytes", "67108864\n"),
        ("memory", "memory.memsw.limit_in_bytes", "100663296\n"),
        ("memory", "memory.soft_limit_in_bytes", "33554432\n"),
        ("memory", "memory.max_usage_in_bytes", "5242880\n"),
        ("memory", "memory.failcnt", "12\n"),
        ("memory", "memory.kmem.usage_in_bytes", "749568\n"),
        ("memory", "memory.stat", V1_MEMORY_STAT),
        (
            "memory",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        ),
        ("pids", "pids.current", "3\n"),
        ("pids", "pids.max", "100\n"),
        (
            "blkio",
            "blkio.throttle.io_service_bytes_recursive",
            "254:0 Read 1052672\n254:0 Write 0\n254:0 Sync 1052672\n254:0 Async 0\n\
             254:0 Discard 0\n254:0 Total 1052672\n254:16 Read 4096\n254:16 Write 8192\n\
             254:16 Total 12288\nTotal 1064960\n",
        ),
        (
            "blkio",
            "blkio.throttle.io_serviced_recursive",
            "254:0 Read 47\n254:0 Write 0\n254:16 Read 1\n254:16 Write 2\nTotal 50\n",
        ),
        // Not read: the _recursive files win.
        ("blkio", "blkio.throttle.io_service_bytes", "254:0 Read 1\n"),
    ]);
    let sys = dir.path().join("dev/block/254:0");
    std::fs::create_dir_all(&sys).unwrap();
    std::fs::write(sys.join("uevent"), "MAJOR=254\nMINOR=0\nDEVNAME=vda\n").unwrap();
    let s = read(&cg, Path::new("/nonexistent"), roots(dir.path())).unwrap();
    assert_eq!(
        (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns),
        (1_503_211_000, 1_002_114_000, 501_097_000)
    );
    assert_eq!(
        (s.cpu_periods, s.cpu_throttled_periods, s.cpu_throttled_ns),
        (40, 7, 350_812_000)
    );
    // cpu.shares 1024 (the default) is cpu.weight 39, as a v2 container shows it.
    assert_eq!(
        (s.cpu_quota_us, s.cpu_period_us, s.cpu_weight),
        (20_000, 100_000, 39)
    );
    assert_eq!(
        (s.memory_usage_bytes, s.memory_working_set_bytes),
        (4_096_000, 4_096_000 - 2_809_856)
    );
    assert_eq!(
        (
            s.memory_rss_bytes,
            s.memory_cache_bytes,
            s.memory_mapped_file_bytes,
            s.memory_kernel_bytes
        ),
        (1_191_936, 3_530_752, 2_433_024, 749_568),
        "the hierarchical total_ figures"
    );
    assert_eq!(
        (
            s.memory_limit_bytes,
            s.memory_max_usage_bytes,
            s.memory_failcnt,
            s.oom_kills
        ),
        (67_108_864, 5_242_880, 12, 1)
    );
    assert_eq!(
        (
            s.memory_swap_bytes,
            s.memory_swap_limit_bytes,
            s.memory_reservation_bytes
        ),
        (8192, 100_663_296 - 67_108_864, 33_554_432),
        "swap alone, like v2's memory.swap.*"
    );
    assert_eq!((s.page_faults, s.major_page_faults), (2045, 31));
    assert_eq!((s.pids, s.pids_limit), (3, 100));
    assert_eq!(s.block_io.len(), 2, "{:?}", s.block_io);
    let vda = &s.block_io[0];
    assert_eq!(
        (vda.device.as_str(), vda.read_bytes, vda.reads, vda.writes),
        ("/dev/vda", 1_052_672, 47, 0)
    );
    let other = &s.block_io[1];
    assert_eq!(
        (other.device.as_str(), other.write_bytes, other.writes),
        ("254:16", 8192, 2)
    );
    assert_eq!((s.io_read_bytes, s.io_write_bytes), (1_056_768, 8192));
    assert!(s.pressure.is_none(), "v1 has no PSI");
    for d in cg.dirs() {
        std::fs::remove_dir_all(d).unwrap();
    }
    assert!(
        read(&cg, Path::new("/"), roots(dir.path())).is_err(),
        "cgroup gone"
    );
}

#[test]
fn v1_unlimited_is_0_and_clock_ticks_without_usage_user() {
    let unlimited = "9223372036854771712\n";
    let (dir, cg) = v1_cgroup_with(&[
        ("cpuacct", "cpuacct.stat", "user 100\nsystem 50\n"),
        ("cpu", "cpu.cfs_quota_us", "-1\n"),
        ("cpu", "cpu.cfs_period_us", "100000\n"),
        ("cpu", "cpu.shares", "2\n"),
        ("memory", "memory.limit_in_bytes", unlimited),
        ("memory", "memory.memsw.limit_in_bytes", unlimited),
        ("memory", "memory.soft_limit_in_bytes", unlimited),
        (
            "memory",
            "memory.stat",
            "cache 10\nrss 20\ninactive_file 5\n",
        ),
        ("memory", "memory.usage_in_bytes", "30\n"),
        (
            "memory",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\n",
        ),
        ("pids", "pids.max", "max\n"),
    ]);
    let s = read(&cg, Path::new("/nonexistent"), roots(dir.path())).unwrap();
    assert_eq!(
        (
            s.cpu_quota_us,
            s.memory_limit_bytes,
            s.memory_swap_limit_bytes,
            s.memory_reservation_bytes,
            s.pids_limit
        ),
        (0, 0, 0, 0, 0)
    );
    assert_eq!((s.cpu_period_us, s.cpu_weight), (100_000, 1));
    // 100 and 50 ticks of 1/CLK_TCK s (100 on Linux).
    assert_eq!(
        (s.cpu_user_ns, s.cpu_system_ns),
        (1_000_000_000, 500_000_000)
    );
    // No total_ keys (a kernel without hierarchy figures): the local ones.
    assert_eq!(
        (
            s.memory_rss_bytes,
            s.memory_cache_bytes,
            s.memory_working_set_bytes
        ),
        (20, 10, 25)
    );
    assert_eq!(s.oom_kills, 0, "no oom_kill line before Linux 4.13");
    assert!(s.block_io.is_empty());
}
