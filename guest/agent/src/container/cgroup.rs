//! A container's guest cgroup (v2): OOM kill count, its processes, resource updates (usage: `stats`).

use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupManager, ControllerOpt};
use oci_spec::runtime::LinuxResources;
use podvisor_proto as pb;

use super::ContainerError;

/// Where the guest's cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup of one container.
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    /// Path relative to the root, e.g. `podvisor/<id>`.
    relative: PathBuf,
}

impl Cgroup {
    /// The cgroup `relative` (no leading slash) under `root`.
    pub fn new(root: &Path, relative: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            relative: PathBuf::from(relative.trim_start_matches('/')),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.relative)
    }

    fn manager(&self) -> Result<libcgroups::v2::manager::Manager, ContainerError> {
        libcgroups::v2::manager::Manager::new(self.root.clone(), self.relative.clone()).map_err(
            |e| ContainerError::Internal(format!("cgroup {}: {e}", self.relative.display())),
        )
    }

    /// `oom_kill` from memory.events (0 when unreadable).
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir().join("memory.events"))
            .ok()
            .and_then(|s| keyed(&s, "oom_kill"))
            .unwrap_or(0)
    }

    /// The PIDs in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir().join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Applies new resources (memory, cpu, pids, io, cpuset limits).
    pub fn update(&self, resources: &LinuxResources) -> Result<(), ContainerError> {
        self.manager()?
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| ContainerError::InvalidArgument(format!("resources_json: {e}")))
    }

    /// Kills every process in the cgroup (cgroup.kill, or SIGKILL one by one on older kernels).
    pub fn kill_all(&self) {
        if std::fs::write(self.dir().join("cgroup.kill"), "1").is_err() {
            for pid in self.pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The value of `key` in a "key value" per line file.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Describes `pid` from /proc.
pub fn process_info(proc_root: &Path, pid: i32) -> Option<pb::ProcessInfo> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // "pid (comm) S ppid ..." where comm may contain spaces and parentheses.
    let close = stat.rfind(')')?;
    let comm = stat.get(stat.find('(')? + 1..close)?.to_string();
    let mut rest = stat.get(close + 2..)?.split(' ');
    let state = rest.next()?.to_string();
    let ppid = rest.next()?.parse().ok()?;
    let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
    let cmdline = if cmdline.is_empty() {
        format!("[{comm}]")
    } else {
        cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let uid = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    Some(pb::ProcessInfo {
        pid: pid as u32,
        ppid,
        cmdline,
        uid,
        state,
    })
}

/// Whether `pid` has a handler for `signal` (SigCgt in /proc/<pid>/status).
pub fn catches(proc_root: &Path, pid: i32, signal: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| (1..=64).contains(&signal) && mask & (1u64 << (signal - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_events_and_proc() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(2));
        assert_eq!(keyed(events, "nope"), None);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("42");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("stat"), "42 (my (odd) cmd) S 7 42 42 0 -1").unwrap();
        std::fs::write(p.join("cmdline"), b"sleep\x0010\x00").unwrap();
        std::fs::write(
            p.join("status"),
            "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nSigCgt:\t0000000000004002\n",
        )
        .unwrap();
        let info = process_info(dir.path(), 42).unwrap();
        assert_eq!(
            (
                info.pid,
                info.ppid,
                info.cmdline.as_str(),
                info.uid,
                info.state.as_str()
            ),
            (42, 7, "sleep 10", 1000, "S")
        );
        // 0x4002: SIGINT (2) and SIGTERM (15).
        assert!(catches(dir.path(), 42, 15));
        assert!(catches(dir.path(), 42, 2));
        assert!(!catches(dir.path(), 42, 9));
        assert!(!catches(dir.path(), 43, 15));
        std::fs::write(p.join("cmdline"), b"").unwrap();
        assert_eq!(
            process_info(dir.path(), 42).unwrap().cmdline,
            "[my (odd) cmd]"
        );
    }

    #[test]
    fn cgroup_paths() {
        let cg = Cgroup::new(Path::new("/sys/fs/cgroup"), "/podvisor/c1");
        assert_eq!(cg.dir(), Path::new("/sys/fs/cgroup/podvisor/c1"));
        assert!(cg.pids().is_empty() || Path::new("/sys/fs/cgroup/podvisor/c1").exists());
    }
}
