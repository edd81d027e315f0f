//! A container's cgroup: OOM kill count, its processes, resource updates, killing and removal (usage:
//! `stats`). In the guest it is a cgroup v2 directory; on a host (native pods) it is either v2 (unified) or a
//! directory in every v1 hierarchy (legacy or hybrid setups, see `v1`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcgroups::common::{CgroupManager, ControllerOpt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use podvisor_proto as pb;

use super::ContainerError;

pub mod v1;

/// Where the guest's cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long `kill_all` keeps killing before giving up on processes that do not go away.
const KILL_DEADLINE: Duration = Duration::from_secs(2);

/// Where the hierarchies of a cgroup are mounted.
#[derive(Debug, Clone)]
enum Layout {
    /// One unified (v2) hierarchy mounted here.
    V2(PathBuf),
    /// cgroup v1: each controller's name ("memory", "cpu", ...) and its hierarchy's mount point.
    V1(BTreeMap<String, PathBuf>),
}

/// The cgroup of one container.
#[derive(Debug, Clone)]
pub struct Cgroup {
    layout: Layout,
    /// Path relative to the root(s), e.g. `podvisor/<id>`.
    relative: PathBuf,
}

impl Cgroup {
    /// The v2 cgroup `relative` (leading slashes ignored) under `root` (the guest's hierarchy).
    pub fn new(root: &Path, relative: &str) -> Self {
        Self {
            layout: Layout::V2(root.to_path_buf()),
            relative: PathBuf::from(relative.trim_start_matches('/')),
        }
    }

    /// The v1 cgroup `relative` in the hierarchies `mounts` (controller name, mount point).
    pub fn v1(mounts: impl IntoIterator<Item = (String, PathBuf)>, relative: &str) -> Self {
        Self {
            layout: Layout::V1(mounts.into_iter().collect()),
            relative: PathBuf::from(relative.trim_start_matches('/')),
        }
    }

    /// The cgroup `relative` on this host: v2 under /sys/fs/cgroup when it is unified, else (legacy or hybrid,
    /// where libcontainer also uses v1) in the v1 hierarchies found in /proc/self/mountinfo.
    pub fn host(relative: &str) -> Result<Cgroup, ContainerError> {
        use libcgroups::common::{get_cgroup_setup, CgroupSetup};
        let setup = get_cgroup_setup()
            .map_err(|e| ContainerError::Internal(format!("cgroup setup of the host: {e}")))?;
        Ok(match setup {
            CgroupSetup::Unified => Cgroup::new(Path::new(CGROUP_ROOT), relative),
            CgroupSetup::Legacy | CgroupSetup::Hybrid => Cgroup::v1(v1::host_mounts()?, relative),
        })
    }

    /// Its path relative to the hierarchy root(s).
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// Its directory when it is a v2 cgroup.
    pub fn v2_dir(&self) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2(root) => Some(root.join(&self.relative)),
            Layout::V1(_) => None,
        }
    }

    /// The directory holding `controller`'s files ("memory", "cpuacct", ...): the v2 directory, or the
    /// cgroup's directory in that controller's v1 hierarchy (None when the host does not mount it).
    pub fn controller_dir(&self, controller: &str) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2(root) => Some(root.join(&self.relative)),
            Layout::V1(mounts) => mounts.get(controller).map(|m| m.join(&self.relative)),
        }
    }

    /// Its directory in each hierarchy (one for v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2(root) => vec![root.join(&self.relative)],
            Layout::V1(mounts) => {
                let unique: BTreeSet<_> = mounts.values().collect();
                unique.into_iter().map(|m| m.join(&self.relative)).collect()
            }
        }
    }

    /// Its directory in the hierarchy whose cgroup.procs lists its processes (v1: pids, memory, freezer,
    /// cpu, else any mounted one).
    fn procs_dir(&self) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2(_) => self.v2_dir(),
            Layout::V1(mounts) => ["pids", "memory", "freezer", "cpu"]
                .iter()
                .find_map(|c| self.controller_dir(c))
                .or_else(|| mounts.values().next().map(|m| m.join(&self.relative))),
        }
    }

    /// Whether the cgroup exists (in the hierarchy listing its processes).
    pub fn exists(&self) -> bool {
        self.procs_dir().is_some_and(|d| d.is_dir())
    }

    /// The v2 memory.events file, whose changes signal OOM kills (inotify); None for v1, which has no such
    /// file (poll `oom_kills` instead).
    pub fn memory_events_path(&self) -> Option<PathBuf> {
        self.v2_dir().map(|d| d.join("memory.events"))
    }

    /// The OOM kills in the cgroup: `oom_kill` of v2 memory.events or of v1 memory.oom_control (Linux 4.13+);
    /// 0 when unreadable.
    pub fn oom_kills(&self) -> u64 {
        let file = match &self.layout {
            Layout::V2(_) => self.memory_events_path(),
            Layout::V1(_) => self
                .controller_dir("memory")
                .map(|d| d.join("memory.oom_control")),
        };
        file.and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| keyed(&s, "oom_kill"))
            .unwrap_or(0)
    }

    /// The PIDs in the cgroup (not in its children).
    pub fn pids(&self) -> Vec<i32> {
        self.procs_dir().map(|d| procs(&d)).unwrap_or_default()
    }

    /// The PIDs in the cgroup and its descendants.
    fn tree_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        if let Some(dir) = self.procs_dir() {
            walk(&dir, &mut |d| pids.extend(procs(d)));
        }
        pids
    }

    /// Applies new resources (memory, cpu, pids, io, cpuset limits) through libcgroups' manager of the
    /// cgroup's version.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), ContainerError> {
        let opt = ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        let invalid = |e: &dyn std::fmt::Display| {
            ContainerError::InvalidArgument(format!("resources_json: {e}"))
        };
        match &self.layout {
            Layout::V2(root) => {
                libcgroups::v2::manager::Manager::new(root.clone(), self.relative.clone())
                    .map_err(|e| self.internal(&e))?
                    .apply(&opt)
                    .map_err(|e| invalid(&e))
            }
            Layout::V1(_) => v1::manager(&self.relative)
                .map_err(|e| self.internal(&e))?
                .apply(&opt)
                .map_err(|e| invalid(&e)),
        }
    }

    fn internal(&self, e: &dyn std::fmt::Display) -> ContainerError {
        ContainerError::Internal(format!("cgroup {}: {e}", self.relative.display()))
    }

    /// Kills every process in the cgroup and its descendants. v2: cgroup.kill, or (kernels before 5.14)
    /// SIGKILL until none is left; v1: freeze (when the freezer is mounted), SIGKILL all, thaw, until none is
    /// left. Gives up after two seconds.
    pub fn kill_all(&self) {
        let freezer = match &self.layout {
            Layout::V2(root) => {
                if std::fs::write(root.join(&self.relative).join("cgroup.kill"), "1").is_ok() {
                    return;
                }
                None
            }
            Layout::V1(_) => self
                .controller_dir("freezer")
                .filter(|d| d.join(v1::FREEZER_STATE).exists()),
        };
        let deadline = Instant::now() + KILL_DEADLINE;
        loop {
            if self.tree_pids().is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(cgroup = %self.relative.display(), "processes survive SIGKILL");
                return;
            }
            if let Some(dir) = &freezer {
                // Frozen, nothing forks while the PIDs are read and killed; SIGKILL lands at the thaw.
                v1::freeze(dir, deadline);
            }
            for pid in self.tree_pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if let Some(dir) = &freezer {
                v1::thaw(dir);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the cgroup and its descendants from every hierarchy, deepest first (missing directories are
    /// fine; cgroups still holding processes stay, with a warning). For clean-up after a crash.
    pub fn remove_tree(&self) {
        for dir in self.dirs() {
            walk_post(&dir, &mut |d| {
                if let Err(e) = rmdir_retrying(d) {
                    tracing::warn!(dir = %d.display(), "removing cgroup: {e}");
                }
            });
        }
    }
}

/// The PIDs listed in `dir`/cgroup.procs.
fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Calls `f` on `dir` and then on each descendant directory (parents first).
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    for child in subdirs(dir) {
        walk(&child, f);
    }
}

/// Calls `f` on each descendant directory of `dir` and then on `dir` (children first).
fn walk_post(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    for child in subdirs(dir) {
        walk_post(&child, f);
    }
    f(dir);
}

/// The directories directly in `dir` (not following symlinks).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// rmdir, retried for up to half a second while the kernel still counts exiting tasks (EBUSY); a missing
/// directory is success.
fn rmdir_retrying(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
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
mod host_tests;

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

    /// A fake v1 host under a temporary directory: memory, pids and a co-mounted cpu,cpuacct hierarchy.
    fn fake_v1() -> (tempfile::TempDir, Cgroup) {
        let root = tempfile::tempdir().unwrap();
        let mounts: Vec<_> = [
            ("memory", "memory"),
            ("pids", "pids"),
            ("cpu", "cpu,cpuacct"),
            ("cpuacct", "cpu,cpuacct"),
        ]
        .iter()
        .map(|(c, m)| (c.to_string(), root.path().join(m)))
        .collect();
        (root, Cgroup::v1(mounts, "/kubepods/pod1/c1"))
    }

    #[test]
    fn v1_paths_oom_control_and_procs() {
        let (root, cg) = fake_v1();
        let r = root.path();
        assert_eq!(cg.v2_dir(), None);
        assert_eq!(cg.memory_events_path(), None, "v1 OOM kills are polled");
        assert_eq!(
            cg.controller_dir("cpuacct").unwrap(),
            r.join("cpu,cpuacct/kubepods/pod1/c1")
        );
        assert_eq!(cg.controller_dir("freezer"), None, "not mounted");
        // cpu and cpuacct share one hierarchy: three directories.
        assert_eq!(cg.dirs().len(), 3, "{:?}", cg.dirs());
        assert!(!cg.exists());
        assert_eq!((cg.oom_kills(), cg.pids()), (0, vec![]));
        for d in cg.dirs() {
            std::fs::create_dir_all(d).unwrap();
        }
        assert!(cg.exists());
        let memory = cg.controller_dir("memory").unwrap();
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 3);
        // Before Linux 4.13 there is no oom_kill line.
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 1\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 0);
        // The pids hierarchy's list wins over memory's, which serves without pids.
        std::fs::write(memory.join("cgroup.procs"), "7\n").unwrap();
        assert_eq!(cg.pids(), Vec::<i32>::new());
        let memory_only = Cgroup::v1([("memory".into(), r.join("memory"))], "kubepods/pod1/c1");
        assert_eq!(memory_only.pids(), vec![7]);
        let pids = cg.controller_dir("pids").unwrap();
        std::fs::write(pids.join("cgroup.procs"), "12\n34\n").unwrap();
        assert_eq!(cg.pids(), vec![12, 34]);
        let nested = pids.join("sub/inner");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(nested.join("cgroup.procs"), "56\n").unwrap();
        assert_eq!(cg.pids(), vec![12, 34], "the cgroup's own processes");
        assert_eq!(cg.tree_pids(), vec![12, 34, 56], "with its descendants'");
    }

    #[test]
    fn remove_tree_removes_children_first_in_every_hierarchy() {
        let (root, cg) = fake_v1();
        // Empty directories stand in for cgroups (whose control files do not stop rmdir).
        for d in cg.dirs() {
            std::fs::create_dir_all(d.join("child/grandchild")).unwrap();
            std::fs::create_dir_all(d.join("other")).unwrap();
        }
        // Missing in one hierarchy: fine.
        std::fs::remove_dir_all(cg.controller_dir("pids").unwrap()).unwrap();
        cg.remove_tree();
        for d in cg.dirs() {
            assert!(!d.exists(), "{} left", d.display());
            assert!(d.parent().unwrap().is_dir(), "the parent stays");
        }
        cg.remove_tree();
        assert!(root.path().join("memory/kubepods/pod1").is_dir());
        let v2 = Cgroup::new(root.path(), "v2/c1");
        std::fs::create_dir_all(root.path().join("v2/c1/x")).unwrap();
        v2.remove_tree();
        assert!(!root.path().join("v2/c1").exists());
        assert!(root.path().join("v2").is_dir());
    }

    #[test]
    fn cgroup_paths() {
        let cg = Cgroup::new(Path::new("/sys/fs/cgroup"), "/podvisor/c1");
        assert_eq!(
            cg.v2_dir().unwrap(),
            Path::new("/sys/fs/cgroup/podvisor/c1")
        );
        assert!(cg.pids().is_empty() || Path::new("/sys/fs/cgroup/podvisor/c1").exists());
    }
}
