//! Threads and their cgroups as /proc shows them (shared with the cgroup unit tests in
//! `src/cgroups/tests.rs`, so std only).
#![allow(dead_code)]

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
