//! What a native pod holds on the node: processes, mounts, loop devices, cgroups, its directory.

use std::path::{Path, PathBuf};

/// A native pod's traces on the node.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Processes in its cgroups or started for it (its agent and what it forked): `pid comm`.
    pub processes: Vec<String>,
    /// Mount points under its directory.
    pub mounts: Vec<String>,
    /// Loop devices mounted under its directory (`loopN`).
    pub loops: Vec<String>,
    /// Its cgroup directories.
    pub cgroups: Vec<PathBuf>,
    /// Its directory exists.
    pub dir: bool,
}

impl Leftovers {
    /// Nothing at all.
    pub fn is_clean(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.loops.is_empty()
            && self.cgroups.is_empty()
            && !self.dir
    }

    /// Panics with what is left.
    pub fn assert_clean(&self, when: &str) {
        assert!(self.is_clean(), "{when}: {self:?}");
    }
}

/// The traces of pod `id` of the daemon whose directory is `d` (run dir `d/run`).
pub fn of_pod(d: &Path, id: &str) -> Leftovers {
    let dir = d.join("run/native").join(id);
    let dir_text = dir.display().to_string();
    let cgroup_name = format!("podvisor-{id}");
    let mut left = Leftovers {
        dir: dir.exists(),
        ..Default::default()
    };
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
        let cgroup = String::from_utf8_lossy(&read("cgroup")).into_owned();
        let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
        if cgroup.contains(&cgroup_name) || cmdline.contains(&dir_text) {
            let comm = String::from_utf8_lossy(&read("comm")).trim().to_string();
            left.processes.push(format!("{pid} {comm}"));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4) else { continue };
        if !point.starts_with(&dir_text) {
            continue;
        }
        left.mounts.push(point.to_string());
        let source = line.split(" - ").nth(1).and_then(|r| r.split(' ').nth(1));
        if let Some(device) = source.and_then(|s| s.strip_prefix("/dev/")) {
            if device.starts_with("loop") {
                left.loops.push(device.to_string());
            }
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for candidate in [
            hierarchy.path().join("podvisor").join(&cgroup_name),
            PathBuf::from("/sys/fs/cgroup/podvisor").join(&cgroup_name),
        ] {
            if candidate.is_dir() && !left.cgroups.contains(&candidate) {
                left.cgroups.push(candidate);
            }
        }
    }
    left
}

/// The loop devices of `loops` that are still bound to a file under `d`.
pub fn still_bound(loops: &[String], d: &Path) -> Vec<String> {
    loops
        .iter()
        .filter(|l| {
            std::fs::read_to_string(format!("/sys/block/{l}/loop/backing_file"))
                .is_ok_and(|f| Path::new(f.trim()).starts_with(d))
        })
        .cloned()
        .collect()
}
