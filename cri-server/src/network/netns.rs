//! Named network namespaces as bind-mounted files (the `ip netns` convention), and netlink handles
//! inside them.
//!
//! A namespace is created on a dedicated thread that unshares its network namespace and bind-mounts
//! `/proc/thread-self/ns/net` onto the file; the thread then exits and the mount keeps the namespace
//! alive until [`remove`]. Netlink work inside a namespace uses a socket created on a thread that has
//! `setns`'d into it: a netlink socket stays bound to the namespace it was created in, so the handle can
//! then be used from any task. [`run_in`] is that one mechanism for anything else that must be created
//! inside a pod's namespace and then works from anywhere (the VM's tap).
//!
//! Mount propagation: like `ip netns add`, the directory is made a shared mount (bind-mounted onto
//! itself first if it is not a mount point), so namespace mounts and unmounts propagate to mount
//! namespaces cloned later (`ip netns exec`, containers of other runtimes) and an unmount here frees the
//! namespace everywhere. With the default directory `/run/netns`, `ip netns list` and `ip -n` see the
//! pods' namespaces.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures_util::TryStreamExt;
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{statfs, NSFS_MAGIC};
use rtnetlink::{Handle, LinkUnspec};
use tokio::sync::oneshot;

use super::NetworkError;

/// Entering or creating a network namespace on a helper thread failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file cannot be opened.
    #[error("opening netns {}: {source}", path.display())]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `setns` into the namespace failed (e.g. the file is not a network namespace).
    #[error("entering netns {}: {source}", path.display())]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: Errno,
    },
    /// `unshare(CLONE_NEWNET)` failed.
    #[error("unsharing a netns: {0}")]
    Unshare(#[source] Errno),
    /// The helper thread could not be started.
    #[error("spawning a namespace thread: {0}")]
    Thread(#[source] io::Error),
    /// The helper thread panicked.
    #[error("the namespace thread panicked")]
    Panicked,
}

/// Serializes making directories shared mounts, so two creations never stack two bind mounts.
static SHARED_DIRS: Mutex<()> = Mutex::new(());

fn host_err(what: impl std::fmt::Display) -> impl FnOnce(Errno) -> NetworkError {
    move |source| NetworkError::Sys {
        what: what.to_string(),
        source,
    }
}

fn file_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
    move |source| NetworkError::File {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Creates the directory if needed and makes it a shared mount point, as `ip netns add` does.
fn ensure_shared_dir(dir: &Path) -> Result<(), NetworkError> {
    let _guard = SHARED_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(dir).map_err(file_err("creating", dir))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    let make_shared = || mount(None::<&str>, dir, None::<&str>, shared, None::<&str>);
    match make_shared() {
        Err(Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself, then share it.
            let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(dir), dir, None::<&str>, bind, None::<&str>).map_err(host_err(
                format_args!("bind-mounting {} onto itself", dir.display()),
            ))?;
            make_shared().map_err(host_err(format_args!(
                "making {} a shared mount",
                dir.display()
            )))
        }
        other => other.map_err(host_err(format_args!(
            "making {} a shared mount",
            dir.display()
        ))),
    }
}

/// Runs `f` on a new thread whose network namespace is set by `enter` (which runs first, on that
/// thread), inside the current tokio runtime's context; the thread exits afterwards.
async fn on_ns_thread<T, E, F>(enter: E, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    E: FnOnce() -> Result<(), NetnsError> + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("podvisor-netns".into())
        .spawn(move || {
            let _ = tx.send(enter().map(|()| {
                let _context = runtime.enter();
                f()
            }));
        })
        .map_err(NetnsError::Thread)?;
    rx.await.map_err(|_| NetnsError::Panicked)?
}

/// A netlink connection created on the current (namespace) thread; spawned by the caller.
fn new_connection() -> Result<Connection, NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetworkError::File {
            what: "opening",
            path: "a netlink socket".into(),
            source,
        })?;
    Ok((connection, handle))
}

type Connection = (
    rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>,
    Handle,
);

/// Creates the network namespace file `path` (its directory is created and made a shared mount), with
/// `lo` up. Fails if `path` exists. On failure nothing is left behind.
pub async fn create(path: &Path) -> Result<(), NetworkError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    ensure_shared_dir(dir)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(file_err("creating", path))?;
    let target = path.to_owned();
    let enter = || unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare);
    let created = on_ns_thread(enter, move || {
        let source = Path::new("/proc/thread-self/ns/net");
        mount(
            Some(source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(host_err(format_args!(
            "bind-mounting a netns on {}",
            target.display()
        )))?;
        new_connection()
    })
    .await
    .map_err(NetworkError::from)
    .and_then(|created| created);
    let result = match created {
        Ok((connection, handle)) => {
            tokio::spawn(connection);
            loopback_up(&handle).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let _ = remove(path);
        return Err(e);
    }
    Ok(())
}

async fn loopback_up(handle: &Handle) -> Result<(), NetworkError> {
    let netlink = |what: &'static str| {
        move |source| NetworkError::Netlink {
            what: what.into(),
            source,
        }
    };
    let mut links = handle.link().get().match_name("lo").execute();
    let lo = links.try_next().await.map_err(netlink("finding lo"))?;
    let lo = lo.ok_or_else(|| NetworkError::NoInterface("lo".into()))?;
    let up = LinkUnspec::new_with_index(lo.header.index).up().build();
    handle
        .link()
        .set(up)
        .execute()
        .await
        .map_err(netlink("setting lo up"))
}

/// Unmounts (lazily) and deletes the namespace file `path`; a missing or unmounted file is fine.
pub fn remove(path: &Path) -> Result<(), NetworkError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(host_err(format!("unmounting {}", path.display()))(e)),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// Whether `path` is a live network namespace (an nsfs mount), not a missing or plain file.
pub fn is_netns(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Runs `f` on a thread that has entered the namespace `path` (inside the current tokio runtime's
/// context) and returns its result: what `f` creates there (a netlink socket, a tap) stays in that
/// namespace and can be used from any thread afterwards.
pub async fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    let path = path.to_owned();
    let enter = move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter { path, source })
    };
    Ok(on_ns_thread(enter, f).await?)
}

/// A netlink handle whose socket lives in the namespace `path`; its connection runs on the current
/// runtime until the handle is dropped.
pub async fn handle_in(path: &Path) -> Result<Handle, NetworkError> {
    let (connection, handle) = run_in(path, new_connection).await??;
    tokio::spawn(connection);
    Ok(handle)
}
