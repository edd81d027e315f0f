//! OCI test material: a busybox root filesystem image and runtime specs like `runc spec` makes.

use std::path::{Path, PathBuf};

use podvisor_testkit::image::ext4_from_dir;
use serde_json::json;

/// Busybox applets linked in the image.
const APPLETS: [&str; 19] = [
    "sh", "echo", "sleep", "cat", "dd", "hostname", "id", "tty", "mkdir", "ls", "true", "head",
    "wc", "ps", "grep", "chmod", "touch", "ip", "brctl",
];

/// The host's iptables multi-binaries (Debian's `iptables` package) and their links in the image.
const IPTABLES: [(&str, &str); 2] = [
    ("/usr/sbin/xtables-legacy-multi", "iptables-legacy"),
    ("/usr/sbin/xtables-nft-multi", "iptables-nft"),
];

/// The iptables extensions the image carries (the matches and targets kube-proxy and CNI plugins use).
const XTABLES_EXTENSIONS: [&str; 13] = [
    "libxt_standard.so",
    "libxt_tcp.so",
    "libxt_udp.so",
    "libxt_comment.so",
    "libxt_conntrack.so",
    "libxt_multiport.so",
    "libxt_mark.so",
    "libxt_MARK.so",
    "libxt_addrtype.so",
    "libxt_statistic.so",
    "libxt_MASQUERADE.so",
    "libipt_REJECT.so",
    "libxt_REJECT.so",
];

/// Where the image keeps the iptables extensions (`XTABLES_LIBDIR` for processes that run iptables).
pub const XTABLES_LIBDIR: &str = "/lib/xtables";

/// A busybox root filesystem image: static busybox, applet links, passwd/group.
pub fn busybox_image(dir: &Path) -> PathBuf {
    let root = dir.join("busybox.root");
    for d in [
        "bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app", "run",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static must be installed");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    add_iptables(&root);
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1000:\nvideo:x:44:app\nusers:x:100:nobody\nnogroup:x:65534:\n",
    )
    .unwrap();
    let image = dir.join("busybox.ext4");
    ext4_from_dir(&root, &image, 16);
    image
}

/// Copies the host's iptables-legacy and iptables-nft (dynamically linked) into `root` with the shared
/// libraries `ldd` names, at the same paths, and the extensions of [`XTABLES_EXTENSIONS`] that exist.
fn add_iptables(root: &Path) {
    let libdir = [
        "/usr/lib/x86_64-linux-gnu/xtables",
        "/usr/lib64/xtables",
        "/usr/lib/xtables",
    ]
    .into_iter()
    .map(Path::new)
    .find(|d| d.join("libxt_standard.so").exists())
    .expect("iptables must be installed (apt-get install iptables): no xtables extension dir");
    let mut objects: Vec<PathBuf> = Vec::new();
    for (bin, link) in IPTABLES {
        let name = Path::new(bin).file_name().unwrap();
        std::fs::copy(bin, root.join("bin").join(name)).unwrap_or_else(|e| {
            panic!("iptables must be installed (apt-get install iptables): {bin}: {e}")
        });
        std::os::unix::fs::symlink(name, root.join("bin").join(link)).unwrap();
        objects.push(bin.into());
    }
    let dst = root.join(XTABLES_LIBDIR.trim_start_matches('/'));
    std::fs::create_dir_all(&dst).unwrap();
    for ext in XTABLES_EXTENSIONS {
        if libdir.join(ext).exists() {
            std::fs::copy(libdir.join(ext), dst.join(ext)).unwrap();
            objects.push(libdir.join(ext));
        }
    }
    let out = std::process::Command::new("ldd")
        .args(&objects)
        .output()
        .expect("ldd");
    let libs: std::collections::BTreeSet<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with(':')) // the "<object>:" header of each object
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .collect();
    for lib in libs {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap();
    }
}

/// An OCI runtime spec like `runc spec` makes, running `args`.
pub fn spec(args: &[&str], memory_limit: Option<i64>) -> Vec<u8> {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE"
    ]);
    let mut resources = json!({"pids": {"limit": 64}});
    if let Some(limit) = memory_limit {
        resources["memory"] = json!({"limit": limit, "swap": limit});
    }
    let v = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "ignored", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": resources,
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            }
        }
    });
    serde_json::to_vec(&v).unwrap()
}
