//! PID 1 duties: early mounts, cgroups, console stdio, kernel uptime, guest facts and the final reboot.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::stat::{fstat, makedev, SFlag};

/// Errors of the PID 1 setup.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount point could not be created.
    #[error("creating {path}: {source}")]
    Mkdir {
        /// The directory.
        path: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An early mount failed.
    #[error("mounting {fstype} on {target}: {errno}")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The error.
        errno: Errno,
    },
    /// `/dev/console` could not be opened or duplicated onto stdio.
    #[error("setting up /dev/console as stdio: {0}")]
    Console(std::io::Error),
    /// `/proc/uptime` could not be read or parsed.
    #[error("reading /proc/uptime: {0}")]
    Uptime(String),
    /// PID 1 could not chroot into the bind of the initramfs root.
    #[error("entering the re-rooted initramfs: {0}")]
    Chroot(Errno),
    /// Controllers could not be delegated to child cgroups.
    #[error("enabling cgroup controllers: {0}")]
    Cgroups(std::io::Error),
    /// `uname` failed.
    #[error("uname: {0}")]
    Uname(Errno),
}

/// One early mount: source, target, fstype, flags, data.
type EarlyMount = (
    &'static str,
    &'static str,
    &'static str,
    MsFlags,
    Option<&'static str>,
);

fn early_mounts() -> [EarlyMount; 5] {
    let secure = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    [
        ("proc", "/proc", "proc", secure, None),
        ("sysfs", "/sys", "sysfs", secure, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ]
}

/// Where PID 1 re-roots itself: a bind mount of the initramfs root.
const ROOT_BIND: &str = "/.root";

/// Moves PID 1 off the initramfs "rootfs" mount, as switch_root does, with a bind of the same tree as the
/// new root: bind `/` onto [`ROOT_BIND`], move that mount over `/`, chroot into it. Nothing is copied.
///
/// `pivot_root(2)` refuses to pivot away from the namespace's root mount (EINVAL), and every container's
/// root switch is a pivot_root. The stacked bind has a parent, so pivots below it work, and `setns` into a
/// container's mount namespace (exec) lands on the container's root, which then sits stacked over `/`.
/// Call before any other mount.
pub fn leave_rootfs() -> Result<(), InitError> {
    std::fs::create_dir_all(ROOT_BIND).map_err(|source| InitError::Mkdir {
        path: ROOT_BIND,
        source,
    })?;
    let mount = |errno| InitError::Mount {
        fstype: "bind",
        target: ROOT_BIND,
        errno,
    };
    nix::mount::mount(
        Some("/"),
        ROOT_BIND,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount)?;
    nix::unistd::chdir(ROOT_BIND).map_err(InitError::Chroot)?;
    nix::mount::mount(
        Some(ROOT_BIND),
        "/",
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(mount)?;
    nix::unistd::chroot(".").map_err(InitError::Chroot)?;
    nix::unistd::chdir("/").map_err(InitError::Chroot)
}

/// Mounts proc, sysfs, devtmpfs, /run and /tmp, creating the directories; already-mounted (EBUSY) is fine.
/// Returns the failures (the agent goes on without them).
pub fn mount_early() -> Vec<InitError> {
    let mut errors = Vec::new();
    for (source, target, fstype, flags, data) in early_mounts() {
        if let Err(source) = std::fs::create_dir_all(target) {
            errors.push(InitError::Mkdir {
                path: target,
                source,
            });
            continue;
        }
        match nix::mount::mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(errno) => errors.push(InitError::Mount {
                fstype,
                target,
                errno,
            }),
        }
    }
    errors
}

/// Points stdin/stdout/stderr at `/dev/console` where they are closed or `/dev/null`.
///
/// With `/dev/console` in the initramfs the kernel already opened it for init; without it, Rust's runtime put
/// `/dev/null` on the closed descriptors. Needs devtmpfs on `/dev`.
pub fn ensure_console() -> Result<(), InitError> {
    let is_null_or_closed = |fd: std::os::fd::BorrowedFd<'_>| match fstat(fd) {
        Err(_) => true,
        Ok(st) => {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR
                && st.st_rdev == makedev(1, 3)
        }
    };
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let fix = [
        is_null_or_closed(stdin.as_fd()),
        is_null_or_closed(stdout.as_fd()),
        is_null_or_closed(stderr.as_fd()),
    ];
    if !fix.contains(&true) {
        return Ok(());
    }
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
        .open("/dev/console")
        .map_err(InitError::Console)?;
    let dup = |r: nix::Result<()>| r.map_err(|e| InitError::Console(e.into()));
    if fix[0] {
        dup(nix::unistd::dup2_stdin(&console))?;
    }
    if fix[1] {
        dup(nix::unistd::dup2_stdout(&console))?;
    }
    if fix[2] {
        dup(nix::unistd::dup2_stderr(&console))?;
    }
    if console.as_raw_fd() <= 2 {
        // The console landed on a stdio descriptor (it was closed): keep it open.
        let _ = console.into_raw_fd();
    }
    Ok(())
}

/// Kernel uptime in milliseconds, from `/proc/uptime`.
pub fn kernel_uptime_ms() -> Result<u64, InitError> {
    let text =
        std::fs::read_to_string("/proc/uptime").map_err(|e| InitError::Uptime(e.to_string()))?;
    parse_uptime_ms(&text).ok_or_else(|| InitError::Uptime(format!("unexpected content {text:?}")))
}

/// Parses the first field of `/proc/uptime` ("12.34 5.67") into milliseconds.
fn parse_uptime_ms(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).round() as u64)
}

/// `uname -r`.
pub fn kernel_release() -> Result<String, InitError> {
    let uts = nix::sys::utsname::uname().map_err(InitError::Uname)?;
    Ok(uts.release().to_string_lossy().into_owned())
}

/// Mounts the cgroup2 hierarchy at `/sys/fs/cgroup` and delegates every controller to child cgroups, so
/// containers get cpu, memory, pids, io and cpuset limits. Errors are returned for logging (a kernel
/// without cgroups still runs the agent; containers then fail to create with a clear message).
pub fn setup_cgroups() -> Result<(), InitError> {
    let target = "/sys/fs/cgroup";
    std::fs::create_dir_all(target).map_err(|source| InitError::Mkdir {
        path: target,
        source,
    })?;
    let secure = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match nix::mount::mount(
        Some("cgroup2"),
        target,
        Some("cgroup2"),
        secure,
        None::<&str>,
    ) {
        Ok(()) | Err(Errno::EBUSY) => {}
        Err(errno) => {
            return Err(InitError::Mount {
                fstype: "cgroup2",
                target,
                errno,
            })
        }
    }
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let enable: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "))
        .map_err(InitError::Cgroups)
}

/// What the guest has: CPUs, memory, kernel, cgroup controllers.
pub fn guest_details(kernel_release: &str) -> podvisor_proto::GuestDetailsResponse {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    let cgroup_controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map(|c| c.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    podvisor_proto::GuestDetailsResponse {
        cpus,
        memory_bytes,
        kernel_release: kernel_release.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        cgroup_controllers,
    }
}

/// Syncs and reboots; with `reboot=t panic=-1` the VM exits. Never returns.
pub fn reboot() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).unwrap_err();
    crate::log(&format!("reboot failed: {err}; idling"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_parsing() {
        assert_eq!(parse_uptime_ms("12.34 5.67\n"), Some(12_340));
        assert_eq!(parse_uptime_ms("0.05 0.00"), Some(50));
        assert_eq!(parse_uptime_ms(""), None);
        assert_eq!(parse_uptime_ms("abc 1"), None);
        assert_eq!(parse_uptime_ms("-1 0"), None);
        assert!(kernel_uptime_ms().unwrap() > 0);
        assert!(!kernel_release().unwrap().is_empty());
    }

    #[test]
    fn early_mount_table() {
        let targets: Vec<&str> = early_mounts().iter().map(|m| m.1).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev", "/run", "/tmp"]);
    }
}
