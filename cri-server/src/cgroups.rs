//! Host cgroups of pod VMs (cgroups-rs).
//!
//! A pod VM is a set of threads of this daemon, so its host cgroups hold threads, not processes:
//! the vCPU threads go into the *sandbox cgroup* `<cgroup_parent>/podvisor-<id>` (the parent kubelet
//! gives, which carries the pod's limits), the device threads into the *overhead cgroup*
//! `<overhead>/<id>` (Kata's `sandbox_cgroup_only=false`), or into the sandbox cgroup too with
//! `--sandbox-cgroup-only`. Controllers: `cpu` (limits: kubelet's on the parent, or the pod's own
//! without one, see [`limits`]), `cpuacct` (usage for stats) and `cpuset`.
//!
//! Thread placement needs cgroup v1 controllers (v1 or hybrid hosts): cgroup v2 only lets threads of
//! one process live in different cgroups inside that process's own threaded subtree, which is never
//! kubelet's pod cgroup. Memory is not a thread property in either version (pages are charged to
//! the process), so a pod's memory bound is its VM size.

use cgroups_rs::fs::cgroup::get_cgroups_relative_paths;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::{hierarchies, Cgroup, Hierarchy, Resources};
use cgroups_rs::CgroupPid;
use k8s_cri::v1::{LinuxContainerResources, PodSandboxConfig};
use serde::{Deserialize, Serialize};
use vmm::{ThreadKind, VmThread};

/// The v1 controllers a pod's threads are placed in.
const CONTROLLERS: [&str; 3] = ["cpu", "cpuacct", "cpuset"];

/// Errors of the host cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The pod's `linux.cgroup_parent` is not a cgroup path or a systemd slice.
    #[error("linux.cgroup_parent {parent:?}: {why}")]
    InvalidParent {
        /// The value given.
        parent: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A cgroup could not be created, configured, joined or removed.
    #[error("host cgroup {path}: {what}: {source}")]
    Host {
        /// The cgroup (relative to the hierarchy roots).
        path: String,
        /// The operation.
        what: &'static str,
        /// The error.
        source: cgroups_rs::fs::error::Error,
    },
}

/// Host cgroup settings.
#[derive(Clone, Debug)]
pub struct CgroupConfig {
    /// Place pod VM threads in host cgroups.
    pub enabled: bool,
    /// Device threads go into the sandbox cgroup too (no overhead cgroup).
    pub sandbox_cgroup_only: bool,
    /// The parent of pods that give no `cgroup_parent`.
    pub default_parent: String,
    /// The parent of the per-pod overhead cgroups.
    pub overhead_parent: String,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enabled: true,
            sandbox_cgroup_only: false,
            default_parent: "/podvisor".into(),
            overhead_parent: "/podvisor_overhead".into(),
        }
    }
}

/// The host cgroups of one pod, recorded before they are created (paths from the hierarchy roots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCgroups {
    /// vCPU threads (and device threads with `sandbox_cgroup_only`), with the pod's CPU limits.
    pub sandbox: String,
    /// Device threads, without limits; None with `sandbox_cgroup_only`.
    pub overhead: Option<String>,
}

/// Why host cgroups cannot be used on this host, if they cannot.
pub fn unsupported() -> Option<String> {
    if hierarchies::is_cgroup2_unified_mode() {
        return Some(
            "the host runs cgroup v2 only: an in-process VM's threads cannot join kubelet's pod \
             cgroups there (v2 allows threads of one process in different cgroups only inside \
             its own threaded subtree)"
                .into(),
        );
    }
    let mounted = hierarchies::V1::new().subsystems();
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !mounted.iter().any(|s| s.controller_name() == *c))
        .collect();
    (!missing.is_empty()).then(|| format!("no cgroup v1 {} hierarchy", missing.join(", ")))
}

/// A cgroup path from `cgroup_parent`: an absolute cgroupfs path, or a systemd slice name
/// (`kubepods-burstable-pod1.slice` is `/kubepods.slice/kubepods-burstable.slice/...`).
fn parent_path(parent: &str) -> Result<String, CgroupError> {
    let bad = |why| {
        Err(CgroupError::InvalidParent {
            parent: parent.into(),
            why,
        })
    };
    if parent.contains('\0') {
        return bad("contains a NUL byte");
    }
    if let Some(name) = parent.strip_suffix(".slice") {
        if parent.contains('/') {
            return bad("a systemd slice is a name, not a path");
        }
        if name == "-" {
            return Ok("/".into());
        }
        if name.is_empty() || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
            return bad("not a valid systemd slice name");
        }
        let mut path = String::new();
        let mut prefix = String::new();
        for part in name.split('-') {
            if !prefix.is_empty() {
                prefix.push('-');
            }
            prefix.push_str(part);
            path.push('/');
            path.push_str(&prefix);
            path.push_str(".slice");
        }
        return Ok(path);
    }
    if !parent.starts_with('/') {
        return bad("must be an absolute cgroup path or a systemd slice (NAME.slice)");
    }
    if parent.split('/').any(|c| c == ".." || c == ".") {
        return bad("must not contain . or .. components");
    }
    Ok(parent.trim_end_matches('/').to_string())
}

impl CgroupConfig {
    /// The cgroups pod `id` gets, or None when host cgroups are off.
    pub fn plan(
        &self,
        id: &str,
        config: &PodSandboxConfig,
    ) -> Result<Option<PodCgroups>, CgroupError> {
        if !self.enabled {
            return Ok(None);
        }
        let join = |parent: &str, leaf: &str| format!("{}/{leaf}", parent.trim_end_matches('/'));
        Ok(Some(PodCgroups {
            sandbox: self.sandbox_path(id, config)?,
            overhead: (!self.sandbox_cgroup_only)
                .then(|| join(&parent_path(&self.overhead_parent).unwrap_or_default(), id)),
        }))
    }

    /// The sandbox cgroup of pod `id`: `<cgroup_parent>/podvisor-<id>` (the default parent without
    /// one). A native pod's containers are created under it, whatever `enabled` says.
    pub fn sandbox_path(&self, id: &str, config: &PodSandboxConfig) -> Result<String, CgroupError> {
        let given = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())
            .unwrap_or_default();
        let parent = parent_path(if given.is_empty() {
            &self.default_parent
        } else {
            given
        })?;
        Ok(format!("{}/podvisor-{id}", parent.trim_end_matches('/')))
    }

    /// Checks the settings (the overhead parent is a path or a slice) before the daemon starts.
    pub fn validate(&self) -> Result<(), CgroupError> {
        parent_path(&self.default_parent)?;
        parent_path(&self.overhead_parent).map(drop)
    }
}

/// The largest `cpu.shares` the kernel takes.
const MAX_SHARES: i64 = 262_144;

/// The CPU limits a pod's sandbox cgroup gets itself. Under a `cgroup_parent` none: that is
/// kubelet's pod cgroup, which carries the pod's limits (resources plus overhead) and is where
/// kubelet changes them on a resize; a child with a quota of its own could only get in the way (a
/// quota above the parent's is refused by cgroup v1, and one equal to it blocks lowering the
/// parent's). Without a parent: the pod's resources plus its declared overhead.
pub fn limits(config: &PodSandboxConfig) -> Resources {
    let linux = config.linux.clone().unwrap_or_default();
    let mut res = Resources::default();
    if !linux.cgroup_parent.is_empty() {
        return res;
    }
    let parts: Vec<LinuxContainerResources> = [linux.resources, linux.overhead]
        .into_iter()
        .flatten()
        .collect();
    let period_of = |r: &LinuxContainerResources| {
        if r.cpu_period > 0 {
            r.cpu_period
        } else {
            100_000
        }
    };
    let period = parts
        .iter()
        .map(|r| r.cpu_period)
        .find(|p| *p > 0)
        .unwrap_or(100_000);
    // Quotas of different periods are converted to the first period, rounding down.
    let quota: i128 = parts
        .iter()
        .filter(|r| r.cpu_quota > 0)
        .map(|r| i128::from(r.cpu_quota) * i128::from(period) / i128::from(period_of(r)))
        .sum();
    if quota > 0 {
        res.cpu.period = Some(period as u64);
        res.cpu.quota = Some(quota.min(i128::from(i64::MAX)) as i64);
    }
    let shares: i64 = parts
        .iter()
        .map(|r| r.cpu_shares.clamp(0, MAX_SHARES))
        .sum();
    if shares > 0 {
        res.cpu.shares = Some(shares.clamp(2, MAX_SHARES) as u64);
    }
    let first = |f: fn(&LinuxContainerResources) -> &String| {
        parts.iter().map(f).find(|s| !s.is_empty()).cloned()
    };
    res.cpu.cpus = first(|r| &r.cpuset_cpus);
    res.cpu.mems = first(|r| &r.cpuset_mems);
    res
}

fn cgroup(path: &str) -> Cgroup {
    Cgroup::load_with_specified_controllers(
        hierarchies::auto(),
        path.trim_start_matches('/'),
        CONTROLLERS.iter().map(|c| c.to_string()).collect(),
    )
}

fn host_err(
    path: &str,
    what: &'static str,
) -> impl FnOnce(cgroups_rs::fs::error::Error) -> CgroupError {
    let path = path.to_string();
    move |source| CgroupError::Host { path, what, source }
}

impl PodCgroups {
    /// Creates both cgroups and gives the sandbox cgroup `limits`.
    pub fn create(&self, limits: &Resources) -> Result<(), CgroupError> {
        let sandbox = cgroup(&self.sandbox);
        sandbox
            .create()
            .map_err(host_err(&self.sandbox, "create"))?;
        sandbox
            .apply(limits)
            .map_err(host_err(&self.sandbox, "set CPU limits"))?;
        if let Some(overhead) = &self.overhead {
            cgroup(overhead)
                .create()
                .map_err(host_err(overhead, "create"))?;
        }
        Ok(())
    }

    /// Moves a VM's threads in: vCPUs to the sandbox cgroup, device threads to the overhead cgroup
    /// (or the sandbox cgroup when there is none).
    pub fn place(&self, threads: &[VmThread]) -> Result<(), CgroupError> {
        // One handle per cgroup: loading one reads the mount table.
        let sandbox = (&self.sandbox, cgroup(&self.sandbox));
        let overhead = self.overhead.as_ref().map(|p| (p, cgroup(p)));
        for t in threads {
            let (path, cg) = match (t.kind, &overhead) {
                (ThreadKind::Device, Some(overhead)) => overhead,
                _ => &sandbox,
            };
            cg.add_task(CgroupPid::from(t.tid as u64))
                .map_err(host_err(path, "add thread"))?;
        }
        Ok(())
    }

    /// CPU time used by the pod's threads (sandbox and overhead cgroups), ns.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        let usage = |path: &str| {
            let cg = cgroup(path);
            cg.exists()
                .then(|| {
                    cg.controller_of::<CpuAcctController>()
                        .map(|c| c.cpuacct().usage)
                })
                .flatten()
        };
        let sandbox = usage(&self.sandbox)?;
        Some(sandbox + self.overhead.as_deref().and_then(usage).unwrap_or(0))
    }

    /// Removes both cgroups (idempotent). Threads still in them (a vCPU that did not stop) are moved
    /// back to the daemon's own cgroups first.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for path in std::iter::once(&self.sandbox).chain(self.overhead.as_ref()) {
            let cg = cgroup(path);
            if !cg.exists() {
                continue;
            }
            for tid in cg.tasks() {
                to_own_cgroups(&tid);
            }
            cg.delete().map_err(host_err(path, "remove"))?;
        }
        Ok(())
    }
}

/// Moves thread `tid` to the daemon's own cgroup in each of [`CONTROLLERS`].
fn to_own_cgroups(tid: &CgroupPid) {
    let own = get_cgroups_relative_paths().unwrap_or_default();
    for c in CONTROLLERS {
        let path = own.get(c).map_or("", |p| p.trim_start_matches('/'));
        let result = if path.is_empty() {
            // The hierarchy root (a root handle would hold every controller).
            hierarchies::auto()
                .subsystems()
                .iter()
                .filter(|s| s.controller_name() == c)
                .try_for_each(|s| s.to_controller().add_task(tid))
        } else {
            Cgroup::load_with_specified_controllers(hierarchies::auto(), path, vec![c.into()])
                .add_task(*tid)
        };
        if let Err(e) = result {
            tracing::warn!(
                tid = tid.pid,
                controller = c,
                "moving a thread out of a pod cgroup: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests;
