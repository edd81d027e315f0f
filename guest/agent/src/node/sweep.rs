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
    // The agent first: it would recreate what is removed below.
    kill_recorded(&root.join(PID_FILE), "podvisor-agent", &mut errors);
    kill_recorded(
        &root.join("sandbox").join(HOLDER_PID_FILE),
        "pause",
        &mut errors,
    );
    let paths = args.paths();
    for bundle in subdirectories(&paths.containers) {
        let Some(id) = bundle.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        match Cgroup::host(&format!("{}/{id}", paths.cgroup_parent)) {
            Ok(cgroup) => cgroup.kill_all(),
            Err(e) => errors.push(format!("container {id}: {e}")),
        }
        crate::container::rootfs::teardown(&bundle);
    }
    for storage in subdirectories(&root.join("storage")) {
        match nix::mount::umount2(&storage, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => errors.push(format!("unmounting {}: {e}", storage.display())),
        }
    }
    match Cgroup::host(&paths.cgroup_parent) {
        Ok(cgroup) => {
            cgroup.kill_all();
            cgroup.remove_tree();
        }
        Err(e) => errors.push(format!("cgroup {}: {e}", paths.cgroup_parent)),
    }
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", root.display())),
    }
    errors
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

/// Kills the process whose pid `file` holds if it is still `comm` (a pid may have been reused), and
/// waits until it is gone.
fn kill_recorded(file: &Path, comm: &str, errors: &mut Vec<String>) {
    let Some(pid) = std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    // /proc/<pid>/comm is the name cut to 15 bytes; a zombie is as good as gone.
    let is_it = || {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        });
        !zombie
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| !c.trim().is_empty() && comm.starts_with(c.trim()))
    };
    if !is_it() {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let start = Instant::now();
    while is_it() {
        if start.elapsed() > GONE_WITHIN {
            errors.push(format!("{comm} (pid {pid}) did not die of SIGKILL"));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
