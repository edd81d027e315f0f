//! PID 1 duties: early mounts, console stdio, kernel uptime, zombie reaping and the final reboot.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::stat::{fstat, makedev, SFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

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
    /// The SIGCHLD handler could not be installed.
    #[error("installing the SIGCHLD handler: {0}")]
    Signal(std::io::Error),
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

/// Reaps every exited child, forever (PID 1 inherits all orphans).
pub async fn reap_zombies() -> Result<(), InitError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = signal(SignalKind::child()).map_err(InitError::Signal)?;
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        if sigchld.recv().await.is_none() {
            return Ok(());
        }
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
