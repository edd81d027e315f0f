//! A throwaway network namespace for VM network tests (a tap and the host end of the link live there).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace (`ip netns add`), deleted on drop.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// A namespace named after `tag`, this process and a counter (tests of one process run in
    /// parallel), or None (after a SKIPPED line) when this process cannot create namespaces and taps.
    pub fn new(test: &str, tag: &str) -> Option<TestNetns> {
        if !crate::procfs::is_root() || !Path::new("/dev/net/tun").exists() {
            eprintln!("SKIPPED {test}: needs root and /dev/net/tun");
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let ns = TestNetns {
            name: format!("pv{tag}-{}-{n}", std::process::id()),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        ns.ip_argv(&["netns", "add", &ns.name]);
        Some(ns)
    }

    /// Keeps IPv6 chatter (router solicitations, MLD) off the interfaces created from now on.
    pub fn without_ipv6(self) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg("net.ipv6.conf.default.disable_ipv6=1")
            .status();
        self
    }

    /// Its name (`ip -n <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file (`/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &str) -> String {
        let mut argv = vec!["-n", &self.name];
        argv.extend(args.split_whitespace());
        self.ip_argv(&argv)
    }

    fn ip_argv(&self, argv: &[&str]) -> String {
        let out = Command::new("ip")
            .args(argv)
            .output()
            .expect("ip (iproute2)");
        assert!(
            out.status.success(),
            "ip {argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace (e.g. `Tap::open`, which creates the tap in the
    /// calling thread's namespace).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
