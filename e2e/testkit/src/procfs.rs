//! What /proc shows about processes: threads and their cgroups, memory (PSS), this process's threads
//! and fds (for leak checks). Std only: cri-server's cgroup unit tests use it too.

/// Threads of process `pid` whose name starts with `prefix`: (tid, name).
pub fn threads_named(pid: u32, prefix: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let tid = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        if comm.starts_with(prefix) {
            out.push((tid, comm.trim_end().to_string()));
        }
    }
    out
}

/// The cgroup v1 path of thread `tid` of `pid` in `controller` (from /proc/<pid>/task/<tid>/cgroup).
pub fn cgroup_of(pid: u32, tid: u32, controller: &str) -> String {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_default()
}

/// Proportional set size of process `pid` in KiB.
pub fn pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Number of entries in a /proc directory of this process (threads or fds).
pub fn proc_count(what: &str) -> usize {
    std::fs::read_dir(format!("/proc/self/{what}"))
        .unwrap()
        .count()
}

/// What each open fd of this process points at, sorted (for leak diagnostics).
pub fn fd_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

/// Whether the effective uid (the second field of `Uid:` in /proc/self/status) is 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
