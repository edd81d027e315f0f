//! `podvisor-agent sweep`: removes what a native pod's agent left on the node when it was killed before
//! it could remove its pod itself (the daemon runs it after a crash, and after a stop whose agent had
//! to be killed).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::MntFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{NodeArgs, PID_FILE};
use crate::container::cgroup::Cgroup;
use crate::sandbox::HOLDER_PID_FILE;

/// How long a killed process has to disappear.
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// Kills the pod's agent if it still runs, every process left in its containers' cgroups and its PID
/// namespace, unmounts the containers' root filesystems and the images (their loop devices clear
/// themselves), removes the cgroups and the pod's directory. Returns what could not be done.
pub fn sweep(args: &NodeArgs) -> Vec<String> {
    let mut errors = Vec::new();
    let root = &args.root;
    // The agent first: it would recreate what is removed below. Both it and its PID namespace holder
    // (forked from it) carry the pod's directory on their command line.
    kill_recorded(&root.join(PID_FILE), root, &mut errors);
    if !errors.is_empty() {
        return errors;
    }
    kill_recorded(&args.sandbox_dir().join(HOLDER_PID_FILE), root, &mut errors);
    let paths = args.paths();
    for bundle in subdirectories(&paths.containers) {
        let Some(id) = bundle.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        match Cgroup::host(&format!("{}/{id}", paths.cgroup_parent)) {
            Ok(cgroup) => kill_cgroup(&cgroup, &mut errors),
            Err(e) => errors.push(format!("container {id}: {e}")),
        }
        crate::container::rootfs::teardown(&bundle);
    }
    for storage in subdirectories(&args.storage_dir()) {
        match nix::mount::umount2(&storage, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => errors.push(format!("unmounting {}: {e}", storage.display())),
        }
    }
    // Whatever else is in the pod's cgroups (containers whose bundle is gone), then the cgroups.
    match Cgroup::host(&paths.cgroup_parent) {
        Ok(cgroup) => {
            kill_cgroup(&cgroup, &mut errors);
            cgroup.remove_tree();
            if cgroup.exists() {
                errors.push(format!("cgroup {} is still there", paths.cgroup_parent));
            }
        }
        Err(e) => errors.push(format!("cgroup {}: {e}", paths.cgroup_parent)),
    }
    // Last, and only when all went well: the directory is what says there is something to sweep.
    if errors.is_empty() {
        if let Err(e) = crate::container::rootfs::remove_unmounted(root) {
            errors.push(e);
        }
    }
    errors
}

/// Kills every process in `cgroup` (and below); an error names what survived.
fn kill_cgroup(cgroup: &Cgroup, errors: &mut Vec<String>) {
    cgroup.kill_all();
    let left = cgroup.pids();
    if !left.is_empty() {
        errors.push(format!(
            "cgroup {}: {} processes survived SIGKILL",
            cgroup.relative().display(),
            left.len()
        ));
    }
}

/// The directories in `dir` (none if it does not exist).
fn subdirectories(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Kills the process whose pid `file` holds if its command line still names `root` (a pid may have
/// been reused, even by another pod's agent), and waits until it is gone.
fn kill_recorded(file: &Path, root: &Path, errors: &mut Vec<String>) {
    let Some(pid) = std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    let mut needle = b"--root\0".to_vec();
    needle.extend_from_slice(root.as_os_str().as_encoded_bytes());
    needle.push(0);
    // A zombie is as good as gone.
    let is_it = || {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        });
        !zombie
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
    };
    if !is_it() {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let start = Instant::now();
    while is_it() {
        if start.elapsed() > GONE_WITHIN {
            errors.push(format!(
                "pid {pid} of {} did not die of SIGKILL",
                root.display()
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a process whose command line names the pod's directory is killed: a reused pid is left.
    #[test]
    fn only_the_pods_own_processes_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pod");
        // `sh -c CMD ARG0 ARGS...` keeps the extra arguments in its command line, as the agent's.
        let mut stranger = std::process::Command::new("sh")
            .args(["-c", "sleep 30", "--root", "/elsewhere"])
            .spawn()
            .unwrap();
        let mut ours = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 30")
            .arg("--root")
            .arg(&root)
            .spawn()
            .unwrap();
        let pid_file = dir.path().join("pid");
        let mut errors = Vec::new();
        std::fs::write(&pid_file, stranger.id().to_string()).unwrap();
        kill_recorded(&pid_file, &root, &mut errors);
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "a stranger was killed"
        );
        std::fs::write(&pid_file, ours.id().to_string()).unwrap();
        // Reaped here (the test is its parent), so the wait sees a zombie, then nothing.
        let reaper = std::thread::spawn(move || ours.wait().unwrap());
        kill_recorded(&pid_file, &root, &mut errors);
        assert!(!reaper.join().unwrap().success());
        assert!(errors.is_empty(), "{errors:?}");
        let _ = stranger.kill();
        let _ = stranger.wait();
    }
}
