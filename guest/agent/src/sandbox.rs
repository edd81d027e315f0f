//! Pod-wide guest setup (CreateSandbox): hostname and the pod's /etc files, sysctls, the guest clock,
//! entropy, and the shared PID namespace holder.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::unistd::Pid;
use podvisor_proto as pb;

use crate::container::ContainerError;

fn invalid(msg: String) -> ContainerError {
    ContainerError::InvalidArgument(msg)
}

/// Pod state in the guest.
pub struct Sandbox {
    files_dir: PathBuf,
    proc_sys: PathBuf,
    /// Where the agent runs: a pod VM (it owns the machine: hostname, clock, entropy) or the node (a
    /// native pod: only the namespaces the host made for the pod are its).
    place: Place,
    holder: Mutex<Option<Pid>>,
}

/// Where an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// PID 1 of a pod VM.
    Guest,
    /// A native pod's agent on the node.
    Node,
}

/// Where a real guest keeps the pod files (a bind source containers may use).
pub const FILES_DIR: &str = "/run/podvisor/sandbox";
/// The file in the pod files directory a native pod's PID namespace holder's pid is kept in.
pub const HOLDER_PID_FILE: &str = "pid-namespace-holder";
/// The real sysctl tree; only a sandbox writing here also sets hostname, clock and entropy.
const PROC_SYS: &str = "/proc/sys";

impl Sandbox {
    /// The sandbox of a real guest: [`FILES_DIR`], [`PROC_SYS`].
    pub fn system() -> Self {
        Self::new(FILES_DIR.into(), PROC_SYS.into())
    }

    /// A sandbox writing its files to `files_dir` and sysctls under `proc_sys`; it sets hostname, clock
    /// and entropy only when `proc_sys` is the real [`PROC_SYS`].
    pub fn new(files_dir: PathBuf, proc_sys: PathBuf) -> Self {
        Self {
            files_dir,
            proc_sys,
            place: Place::Guest,
            holder: Mutex::new(None),
        }
    }

    /// A native pod's sandbox on the node: files in `files_dir`; sysctls and hostname go to the namespaces
    /// the host made for the pod, never to the node's (the request says which are the node's).
    pub fn node(files_dir: PathBuf) -> Self {
        Self {
            place: Place::Node,
            ..Self::new(files_dir, PROC_SYS.into())
        }
    }

    /// Where hostname, hosts and resolv.conf live.
    pub fn files_dir(&self) -> &Path {
        &self.files_dir
    }

    /// Checks the whole request before anything changes (the host runs the same checks before boot).
    pub fn validate(&self, req: &pb::CreateSandboxRequest) -> Result<(), ContainerError> {
        pb::validate::check_sandbox(req).map_err(|e| invalid(e.to_string()))?;
        let node = req.node_namespaces.unwrap_or_default();
        if self.place == Place::Guest && (node.network || node.pid || node.ipc) {
            return Err(invalid(
                "node_namespaces: a pod VM cannot share the node's namespaces".into(),
            ));
        }
        if node.pid && req.share_pid_namespace {
            return Err(invalid(
                "share_pid_namespace: the pod shares the node's PID namespace".into(),
            ));
        }
        Ok(())
    }

    /// The pod's resolv.conf.
    pub fn resolv_conf(req: &pb::CreateSandboxRequest) -> String {
        let mut out = String::new();
        for s in &req.dns_servers {
            out.push_str(&format!("nameserver {s}\n"));
        }
        if !req.dns_searches.is_empty() {
            out.push_str(&format!("search {}\n", req.dns_searches.join(" ")));
        }
        if !req.dns_options.is_empty() {
            out.push_str(&format!("options {}\n", req.dns_options.join(" ")));
        }
        out
    }

    /// Writes the pod files and sysctls and sets hostname, clock and entropy (a VM's; on the node only the
    /// hostname of the pod's own UTS namespace). Returns the PID namespace path containers join when the
    /// request shares one.
    pub fn create(
        &self,
        req: &pb::CreateSandboxRequest,
    ) -> Result<Option<PathBuf>, ContainerError> {
        self.validate(req)?;
        std::fs::create_dir_all(&self.files_dir)?;
        let hosts = if req.hosts.is_empty() {
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n", req.hostname)
        } else {
            req.hosts.clone()
        };
        std::fs::write(
            self.files_dir.join("hostname"),
            format!("{}\n", req.hostname),
        )?;
        std::fs::write(self.files_dir.join("hosts"), hosts)?;
        std::fs::write(self.files_dir.join("resolv.conf"), Self::resolv_conf(req))?;
        for (name, value) in &req.sysctls {
            let path = self.proc_sys.join(name.replace('.', "/"));
            std::fs::write(&path, value)
                .map_err(|e| invalid(format!("sysctls: setting {name} = {value:?}: {e}")))?;
        }
        let node = req.node_namespaces.unwrap_or_default();
        if self.place == Place::Node && !node.network {
            // The host gave the pod its own UTS namespace with its network namespace.
            nix::unistd::sethostname(&req.hostname)?;
        }
        if self.place == Place::Guest && self.proc_sys == Path::new(PROC_SYS) {
            nix::unistd::sethostname(&req.hostname)?;
            if req.time_unix_ns > 0 {
                let ts = nix::sys::time::TimeSpec::new(
                    (req.time_unix_ns / 1_000_000_000) as i64,
                    (req.time_unix_ns % 1_000_000_000) as i64,
                );
                nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)?;
            }
            if !req.entropy.is_empty() {
                add_entropy(&req.entropy)?;
            }
        }
        if !req.share_pid_namespace {
            return Ok(None);
        }
        let mut holder = self.holder.lock().expect("holder lock");
        let pid = match *holder {
            Some(pid) => pid,
            None => {
                let pid = spawn_pid_namespace_holder()?;
                *holder = Some(pid);
                if self.place == Place::Node {
                    // For the sweep after a crash: on the node it would outlive a killed agent.
                    std::fs::write(self.files_dir.join(HOLDER_PID_FILE), pid.to_string())?;
                }
                pid
            }
        };
        Ok(Some(PathBuf::from(format!("/proc/{pid}/ns/pid"))))
    }

    /// Kills the PID namespace holder and removes the pod files.
    pub fn destroy(&self) {
        if let Some(pid) = self.holder.lock().expect("holder lock").take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.files_dir);
    }
}

/// Mixes `seed` into the kernel pool and credits it (RNDADDENTROPY).
fn add_entropy(seed: &[u8]) -> Result<(), ContainerError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: nix::libc::c_ulong = 0x4008_5203;
    // SAFETY: the ioctl reads a rand_pool_info header and `buf_size` bytes from `info`, which holds exactly
    // that and outlives the call.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    Errno::result(rc).map(drop).map_err(ContainerError::from)
}

/// Starts the process whose PID namespace the pod's containers share: PID 1 of a new namespace that only
/// reaps. Returns its PID in the guest.
fn spawn_pid_namespace_holder() -> Result<Pid, ContainerError> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::unistd::{fork, ForkResult};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the agent runs a current-thread runtime, so it is single-threaded here; the child only makes
    // raw system calls and exits with `_exit`, never returning into the runtime.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(w);
            let mut buf = [0u8; 4];
            let n = nix::unistd::read(&r, &mut buf)?;
            if n != 4 {
                return Err(ContainerError::Internal(
                    "the PID namespace holder did not start".into(),
                ));
            }
            Ok(Pid::from_raw(i32::from_ne_bytes(buf)))
        }
        ForkResult::Child => {
            let code = (|| -> nix::Result<()> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)?;
                // SAFETY: single-threaded child; the grandchild below loops on raw system calls only.
                match unsafe { fork() }? {
                    ForkResult::Parent { child } => {
                        nix::unistd::write(&w, &child.as_raw().to_ne_bytes())?;
                        Ok(())
                    }
                    ForkResult::Child => {
                        let _ = nix::sys::prctl::set_name(c"pause");
                        let mut set = SigSet::empty();
                        set.add(Signal::SIGCHLD);
                        let _ = set.thread_block();
                        loop {
                            let _ = set.wait();
                            while let Ok(s) = nix::sys::wait::waitpid(
                                None,
                                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                            ) {
                                if s == nix::sys::wait::WaitStatus::StillAlive {
                                    break;
                                }
                            }
                        }
                    }
                }
            })();
            // SAFETY: `_exit` is always safe; it skips atexit handlers that belong to the parent.
            unsafe { nix::libc::_exit(i32::from(code.is_err())) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::CreateSandboxRequest {
        pb::CreateSandboxRequest {
            hostname: "web-0".into(),
            dns_servers: vec!["10.96.0.10".into()],
            dns_searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            dns_options: vec!["ndots:5".into()],
            sysctls: [(
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "0".to_string(),
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn files_and_sysctls() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(sys.join("net/ipv4")).unwrap();
        std::fs::write(sys.join("net/ipv4/ip_unprivileged_port_start"), "1024").unwrap();
        let sb = Sandbox::new(dir.path().join("files"), sys.clone());
        assert_eq!(sb.create(&request()).unwrap(), None);
        let read = |f: &str| std::fs::read_to_string(dir.path().join("files").join(f)).unwrap();
        assert_eq!(read("hostname"), "web-0\n");
        assert_eq!(read("hosts"), "127.0.0.1\tlocalhost\n127.0.1.1\tweb-0\n");
        assert_eq!(
            read("resolv.conf"),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        assert_eq!(
            std::fs::read_to_string(sys.join("net/ipv4/ip_unprivileged_port_start")).unwrap(),
            "0"
        );
        sb.destroy();
        assert!(!dir.path().join("files").exists());
    }

    #[test]
    fn bad_requests_name_the_field() {
        let check = |f: fn(&mut pb::CreateSandboxRequest), field: &str| {
            let mut r = request();
            f(&mut r);
            let guest = Sandbox::new("/nowhere".into(), "/nowhere".into());
            let ContainerError::InvalidArgument(msg) = guest.validate(&r).unwrap_err() else {
                panic!("not InvalidArgument")
            };
            assert!(msg.starts_with(field), "{msg}");
        };
        check(|r| r.hostname = "Bad_Host".into(), "hostname:");
        check(|r| r.hostname = String::new(), "hostname:");
        check(
            |r| r.dns_servers = vec!["not-an-ip".into()],
            "dns_servers[0]:",
        );
        check(|r| r.dns_searches = vec!["a b".into()], "dns_searches[0]:");
        check(
            |r| r.sysctls = [("kernel.panic".into(), "1".into())].into(),
            "sysctls:",
        );
        check(
            |r| r.sysctls = [("net...x".into(), "1".into())].into(),
            "sysctls:",
        );
        check(
            |r| r.entropy = vec![0; pb::validate::MAX_ENTROPY + 1],
            "entropy:",
        );
        check(
            |r| {
                r.node_namespaces = Some(pb::NodeNamespaces {
                    pid: true,
                    ..Default::default()
                })
            },
            "node_namespaces:",
        );
        let guest = Sandbox::new("/nowhere".into(), "/nowhere".into());
        assert!(guest.validate(&request()).is_ok());
    }

    #[test]
    fn a_native_pod_on_the_node_network_leaves_the_node_alone() {
        let dir = tempfile::tempdir().unwrap();
        let sb = Sandbox::node(dir.path().join("files"));
        let mut r = request();
        r.node_namespaces = Some(pb::NodeNamespaces {
            network: true,
            pid: true,
            ipc: false,
        });
        // net.* would be the node's: refused before anything is written.
        let e = sb.create(&r).unwrap_err().to_string();
        assert!(e.starts_with("sysctls:"), "{e}");
        assert!(!dir.path().join("files").exists());
        // Without sysctls: files only; the node's hostname is not touched (the test would need
        // CAP_SYS_ADMIN in a new UTS namespace to notice, so compare before and after).
        r.sysctls.clear();
        r.hostname = "not-this-node".into();
        let before = nix::unistd::gethostname().unwrap();
        assert_eq!(sb.create(&r).unwrap(), None);
        assert_eq!(nix::unistd::gethostname().unwrap(), before);
        let hostname = std::fs::read_to_string(dir.path().join("files/hostname")).unwrap();
        assert_eq!(hostname, "not-this-node\n");
        // The node's PID namespace and a shared pod one exclude each other.
        r.share_pid_namespace = true;
        let e = sb.create(&r).unwrap_err().to_string();
        assert!(e.starts_with("share_pid_namespace:"), "{e}");
    }
}
