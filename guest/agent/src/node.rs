//! The agent of a native pod, running on the node:
//! `podvisor-agent node --root DIR --cgroup-parent PATH [--netns FILE] [--new-uts] [--new-ipc]`.
//!
//! The daemon starts one per native pod, with a pipe as stdin: the *lifeline*. Before anything else
//! the agent enters the pod's namespaces (the network namespace `FILE`, new UTS and IPC namespaces; the
//! node's where the pod shares them), so its containers share them as a VM's share the VM's. The agent
//! serves the same API as in a VM, on the unix socket `DIR/agent.sock`, keeps its state under `DIR`, and
//! creates containers in the node's cgroups under `PATH`. When the lifeline closes (the daemon exited or
//! was killed) or on `Shutdown`, it removes every container, unmounts every image, and exits: a native pod
//! never outlives its daemon. `podvisor-agent sweep --root DIR --cgroup-parent PATH` removes what an agent
//! that was killed left (the daemon runs it after a crash).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::container::Paths;

mod sweep;
pub use sweep::sweep;

/// The command line of a node agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeArgs {
    /// Serve the pod, or remove what a killed agent left.
    pub mode: Mode,
    /// The pod's directory on the node (socket, bundles, storages, pod files).
    pub root: PathBuf,
    /// The cgroup containers are created under, in the node's hierarchy.
    pub cgroup_parent: String,
    /// The pod's network namespace (None: stay in the node's).
    pub netns: Option<PathBuf>,
    /// Give the pod its own UTS namespace (its hostname).
    pub new_uts: bool,
    /// Give the pod its own IPC namespace.
    pub new_ipc: bool,
}

/// What a node agent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve the pod until the lifeline closes.
    Serve,
    /// Remove what a killed agent left, then exit.
    Sweep,
}

/// Errors of the command line.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// An argument the agent does not know, or a flag without its value.
    #[error(
        "usage: podvisor-agent node|sweep --root DIR --cgroup-parent PATH [--netns FILE] \
         [--new-uts] [--new-ipc] ({0})"
    )]
    Usage(String),
}

impl NodeArgs {
    /// Parses the arguments after the program name: none for a guest agent (Ok(None)), or `node` and
    /// its flags.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Option<Self>, ArgsError> {
        let mut args = args.into_iter();
        let mode = match args.next() {
            None => return Ok(None),
            Some(mode) if mode == "node" => Mode::Serve,
            Some(mode) if mode == "sweep" => Mode::Sweep,
            Some(other) => return Err(ArgsError::Usage(format!("unknown mode {other:?}"))),
        };
        let (mut root, mut cgroup_parent, mut netns) = (None, None, None);
        let (mut new_uts, mut new_ipc) = (false, false);
        while let Some(flag) = args.next() {
            match flag.to_str() {
                Some("--new-uts") => {
                    new_uts = true;
                    continue;
                }
                Some("--new-ipc") => {
                    new_ipc = true;
                    continue;
                }
                _ => {}
            }
            let value = args
                .next()
                .ok_or_else(|| ArgsError::Usage(format!("{flag:?} needs a value")))?;
            match flag.to_str() {
                Some("--root") => root = Some(PathBuf::from(value)),
                Some("--netns") => netns = Some(PathBuf::from(value)),
                Some("--cgroup-parent") => {
                    cgroup_parent = Some(
                        value
                            .into_string()
                            .map_err(|v| ArgsError::Usage(format!("cgroup parent {v:?}")))?,
                    )
                }
                _ => return Err(ArgsError::Usage(format!("unknown flag {flag:?}"))),
            }
        }
        let root = root
            .filter(|r| r.is_absolute())
            .ok_or_else(|| ArgsError::Usage("--root must be an absolute path".into()))?;
        let cgroup_parent = cgroup_parent
            .filter(|c| c.starts_with('/'))
            .ok_or_else(|| ArgsError::Usage("--cgroup-parent must start with /".into()))?;
        Ok(Some(Self {
            mode,
            root,
            cgroup_parent,
            netns,
            new_uts,
            new_ipc,
        }))
    }

    /// Where containers live.
    pub fn paths(&self) -> Paths {
        Paths::node(&self.root, &self.cgroup_parent)
    }

    /// Where image storages are mounted.
    pub fn storage_dir(&self) -> PathBuf {
        self.root.join("storage")
    }

    /// Where the pod files (hostname, hosts, resolv.conf) are kept.
    pub fn sandbox_dir(&self) -> PathBuf {
        self.root.join("sandbox")
    }

    /// The socket the agent serves on.
    pub fn socket(&self) -> PathBuf {
        socket(&self.root)
    }
}

/// Where a node agent records its pid.
const PID_FILE: &str = "agent.pid";

/// The agent socket of the native pod whose directory is `root` (the daemon connects here).
pub fn socket(root: &Path) -> PathBuf {
    root.join("agent.sock")
}

/// Enters the pod's namespaces. Call first, while the process has one thread (setns and unshare of
/// these namespaces need it).
pub fn enter_namespaces(args: &NodeArgs) -> Result<(), EnterError> {
    use nix::sched::CloneFlags;
    if let Some(path) = &args.netns {
        let file = std::fs::File::open(path).map_err(|e| EnterError::Netns {
            path: path.clone(),
            source: e,
        })?;
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| EnterError::Netns {
            path: path.clone(),
            source: source.into(),
        })?;
    }
    let mut flags = CloneFlags::empty();
    flags.set(CloneFlags::CLONE_NEWUTS, args.new_uts);
    flags.set(CloneFlags::CLONE_NEWIPC, args.new_ipc);
    if !flags.is_empty() {
        nix::sched::unshare(flags).map_err(EnterError::Unshare)?;
    }
    Ok(())
}

/// Why the agent could not enter the pod's namespaces.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// The network namespace could not be opened or joined.
    #[error("entering the network namespace {}: {source}", path.display())]
    Netns {
        /// Its file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// New UTS or IPC namespaces could not be made.
    #[error("new UTS/IPC namespaces: {0}")]
    Unshare(#[source] nix::Error),
}

/// Becomes the subreaper of everything the pod starts (as PID 1 is in a VM), so every exit is recorded,
/// records its pid for [`sweep`], and binds the socket.
pub fn prepare(args: &NodeArgs) -> std::io::Result<tokio::net::UnixListener> {
    nix::sys::prctl::set_child_subreaper(true)?;
    std::fs::create_dir_all(&args.root)?;
    std::fs::write(args.root.join(PID_FILE), std::process::id().to_string())?;
    let socket = args.socket();
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    tokio::net::UnixListener::bind(&socket)
}

/// Whether the lifeline is already closed (the daemon died while starting the agent): the agent then
/// must not create anything.
pub fn lifeline_already_closed() -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::BorrowedFd;
    // SAFETY: fd 0 is open for the whole life of the process; it is only borrowed for the poll.
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    let mut fds = [PollFd::new(stdin, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL)
        }),
        Err(_) => true,
    }
}

/// Returns when the lifeline (stdin, a pipe from the daemon) closes: the daemon is gone. A stdin that
/// cannot be watched counts as closed: a pod must not outlive a daemon it cannot see.
pub async fn lifeline_closed() {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: fd 0 is open (the daemon's pipe) and nothing else in the agent uses stdin: it is owned here.
    let stdin = unsafe { OwnedFd::from_raw_fd(0) };
    let nonblocking = fcntl(&stdin, FcntlArg::F_GETFL).and_then(|f| {
        fcntl(
            &stdin,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(f) | OFlag::O_NONBLOCK),
        )
    });
    if nonblocking.is_err() {
        return;
    }
    // SAFETY: the OwnedFd is moved in and stays open, the same descriptor, for the AsyncFd's lifetime.
    let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(stdin) }) else {
        return;
    };
    let mut buf = [0u8; 64];
    loop {
        let Ok(mut ready) = fd.readable().await else {
            return;
        };
        match nix::unistd::read(fd.get_ref(), &mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<NodeArgs>, ArgsError> {
        NodeArgs::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&[]).unwrap(), None);
        let args = parse(&[
            "node",
            "--root",
            "/run/p/x",
            "--cgroup-parent",
            "/kubepods/pod1",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(args.root, Path::new("/run/p/x"));
        assert_eq!(args.socket(), Path::new("/run/p/x/agent.sock"));
        assert_eq!(args.paths().cgroup_parent, "/kubepods/pod1");
        assert_eq!(
            (args.mode, args.netns, args.new_uts, args.new_ipc),
            (Mode::Serve, None, false, false)
        );
        let args = parse(&[
            "sweep",
            "--new-ipc",
            "--root",
            "/r",
            "--netns",
            "/run/netns/p",
            "--cgroup-parent",
            "/c",
            "--new-uts",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(args.mode, Mode::Sweep);
        assert_eq!(args.netns.as_deref(), Some(Path::new("/run/netns/p")));
        assert!(args.new_uts && args.new_ipc);
        for bad in [
            &["guest"][..],
            &["node", "--root"],
            &["node", "--root", "rel", "--cgroup-parent", "/a"],
            &["node", "--root", "/a", "--cgroup-parent", "a"],
            &["node", "--root", "/a"],
            &["node", "--root", "/a", "--cgroup-parent", "/a", "--x", "y"],
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("usage: podvisor-agent node"), "{bad:?}: {e}");
        }
    }
}
