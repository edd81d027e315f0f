use std::os::unix::fs::MetadataExt;

use k8s_cri::v1::LinuxPodSandboxConfig;
use podvisor_testkit::procfs;

use super::*;

fn pod(parent: &str, resources: Option<LinuxContainerResources>) -> PodSandboxConfig {
    PodSandboxConfig {
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: parent.into(),
            resources,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn parents_are_cgroupfs_paths_or_systemd_slices() {
    assert_eq!(
        parent_path("/kubepods/burstable/pod1").unwrap(),
        "/kubepods/burstable/pod1"
    );
    assert_eq!(parent_path("/kubepods/").unwrap(), "/kubepods");
    assert_eq!(parent_path("/").unwrap(), "");
    assert_eq!(
        parent_path("kubepods-burstable-pod1_2.slice").unwrap(),
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice"
    );
    assert_eq!(parent_path("system.slice").unwrap(), "/system.slice");
    assert_eq!(parent_path("-.slice").unwrap(), "/");
    for (bad, why) in [
        ("kubepods", "absolute"),
        ("/kubepods/../etc", ".."),
        ("/a/./b", ".."),
        ("a--b.slice", "slice name"),
        ("-a.slice", "slice name"),
        ("/x/a.slice", "not a path"),
        ("/a\0b", "NUL"),
    ] {
        let e = parent_path(bad).unwrap_err().to_string();
        assert!(
            e.starts_with("linux.cgroup_parent") && e.contains(why),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn plans_follow_the_settings() {
    let c = CgroupConfig::default();
    let id = "ab12";
    assert_eq!(
        c.plan(id, &pod("", None)).unwrap(),
        Some(PodCgroups {
            sandbox: "/podvisor/podvisor-ab12".into(),
            overhead: Some("/podvisor_overhead/ab12".into()),
        })
    );
    let only = CgroupConfig {
        sandbox_cgroup_only: true,
        ..c.clone()
    };
    assert_eq!(
        only.plan(id, &pod("kubepods-pod9.slice", None)).unwrap(),
        Some(PodCgroups {
            sandbox: "/kubepods.slice/kubepods-pod9.slice/podvisor-ab12".into(),
            overhead: None,
        })
    );
    let off = CgroupConfig {
        enabled: false,
        ..c.clone()
    };
    assert_eq!(off.plan(id, &pod("relative", None)).unwrap(), None);
    assert!(c.plan(id, &pod("relative", None)).is_err());
    assert!(CgroupConfig {
        overhead_parent: "x".into(),
        ..c
    }
    .validate()
    .is_err());
}

#[test]
fn limits_add_the_overhead_to_the_resources() {
    let with = |res: LinuxContainerResources, overhead: Option<LinuxContainerResources>| {
        let mut config = pod("", Some(res));
        config.linux.as_mut().unwrap().overhead = overhead;
        limits(&config)
    };
    let cpu = |period, quota, shares| LinuxContainerResources {
        cpu_period: period,
        cpu_quota: quota,
        cpu_shares: shares,
        ..Default::default()
    };
    let r = with(
        LinuxContainerResources {
            cpuset_cpus: "0-1".into(),
            ..cpu(100_000, 150_000, 1536)
        },
        Some(cpu(50_000, 12_500, 256)),
    );
    assert_eq!((r.cpu.period, r.cpu.quota), (Some(100_000), Some(175_000)));
    assert_eq!(r.cpu.shares, Some(1792));
    assert_eq!(r.cpu.cpus.as_deref(), Some("0-1"));
    assert_eq!(r.cpu.mems, None);
    // Integer sums, never above what kubelet computes for the same pod: 17m is 1700 us, and
    // 300m + the RuntimeClass's 250m is 55000 us (floating point would make them 1701 and 55001).
    assert_eq!(with(cpu(100_000, 1_700, 17), None).cpu.quota, Some(1_700));
    assert_eq!(
        with(cpu(100_000, 30_000, 307), Some(cpu(100_000, 25_000, 256)))
            .cpu
            .quota,
        Some(55_000)
    );
    // Shares stay in the kernel's range.
    assert_eq!(
        with(cpu(0, 0, 200_000), Some(cpu(0, 0, 200_000)))
            .cpu
            .shares,
        Some(262_144)
    );
    assert_eq!(with(cpu(0, 0, 1), None).cpu.shares, Some(2));
    // No limits: nothing is set.
    let r = limits(&pod("", None));
    assert_eq!((r.cpu.quota, r.cpu.shares, r.cpu.cpus), (None, None, None));
    // Under kubelet's pod cgroup the parent carries the limits: none on the sandbox cgroup.
    let r = limits(&pod("/kubepods/pod1", Some(cpu(100_000, 150_000, 1536))));
    assert_eq!(
        (r.cpu.quota, r.cpu.shares, r.cpu.period),
        (None, None, None)
    );
}

fn skipped(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let why = unsupported();
    if !root || why.is_some() {
        println!("SKIPPED {test}: needs root and cgroup v1 controllers (root: {root}, {why:?})");
    }
    !root || why.is_some()
}

/// The cgroup of thread `tid` of this process in `controller`.
fn cgroup_of(tid: i32, controller: &str) -> String {
    procfs::cgroup_of(std::process::id(), tid as u32, controller)
}

/// Real threads placed in real cgroups: vCPU-kind threads in the sandbox cgroup with the limits,
/// device-kind threads in the overhead cgroup, usage read back, removal after the threads end and
/// after a thread is left behind.
#[test]
fn threads_are_placed_limited_accounted_and_removed() {
    if skipped("threads_are_placed_limited_accounted_and_removed") {
        return;
    }
    let base = format!("/podvisor-test-{}", std::process::id());
    let c = CgroupConfig {
        default_parent: format!("{base}/kubepods"),
        overhead_parent: format!("{base}/overhead"),
        ..Default::default()
    };
    let config = pod(
        "",
        Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            ..Default::default()
        }),
    );
    let cgroups = c.plan("p1", &config).unwrap().unwrap();
    cgroups.create(&limits(&config)).unwrap();
    // Creating again (a retried RunPodSandbox) is harmless.
    cgroups.create(&limits(&config)).unwrap();
    let cpu_dir = format!("/sys/fs/cgroup/cpu{}", cgroups.sandbox);
    let read = |f: &str| std::fs::read_to_string(format!("{cpu_dir}/{f}")).unwrap();
    assert_eq!(read("cpu.cfs_quota_us").trim(), "50000");
    assert_eq!(read("cpu.shares").trim(), "512");

    // Threads that burn a little CPU until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    for (name, kind) in [
        ("vcpu0", ThreadKind::Vcpu),
        ("virtio-blk0", ThreadKind::Device),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let mut x = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = x.wrapping_mul(31).wrapping_add(7);
                std::hint::black_box(x);
            }
        }));
        threads.push(VmThread {
            name: name.into(),
            tid: rx.recv().unwrap(),
            kind,
        });
    }
    cgroups.place(&threads).unwrap();
    for controller in ["cpu", "cpuacct", "cpuset"] {
        assert_eq!(cgroup_of(threads[0].tid, controller), cgroups.sandbox);
        assert_eq!(
            Some(cgroup_of(threads[1].tid, controller)),
            cgroups.overhead
        );
    }
    // The test's own thread did not move.
    assert_ne!(
        cgroup_of(nix::unistd::gettid().as_raw(), "cpu"),
        cgroups.sandbox
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let used = cgroups.cpu_usage_ns().unwrap();
    assert!(used > 10_000_000, "{used} ns");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    // A thread still inside at removal (a vCPU that did not stop) is moved out; the cgroups go.
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let stuck = std::thread::spawn(move || {
        tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
        let _ = wait.recv();
    });
    let tid = tid_rx.recv().unwrap();
    let vcpu1 = VmThread {
        name: "vcpu1".into(),
        tid,
        kind: ThreadKind::Vcpu,
    };
    cgroups.place(&[vcpu1]).unwrap();
    assert_eq!(cgroup_of(tid, "cpu"), cgroups.sandbox);
    cgroups.remove().unwrap();
    cgroups.remove().unwrap();
    assert!(!std::path::Path::new(&cpu_dir).exists());
    let own = cgroup_of(nix::unistd::gettid().as_raw(), "cpu");
    assert_eq!(cgroup_of(tid, "cpu"), own);
    drop(release);
    stuck.join().unwrap();
    for controller in CONTROLLERS {
        for dir in [
            format!("/sys/fs/cgroup/{controller}{base}/kubepods"),
            format!("/sys/fs/cgroup/{controller}{base}/overhead"),
            format!("/sys/fs/cgroup/{controller}{base}"),
        ] {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}
