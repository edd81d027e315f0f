//! `podvisor check`: a host capability report, one line per check.

use std::path::Path;
use std::process::ExitCode;

use vmm::{HostKind, KvmHost};

use crate::daemon::DaemonArgs;

/// The outcome of one check.
#[derive(Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether podvisor can work with it.
    pub ok: bool,
    /// It works, but not fully (printed as WARN; the exit code stays 0).
    pub warning: bool,
    /// What was found.
    pub detail: String,
}

/// Runs every check against this host, with the daemon settings `args`.
pub fn checks(args: &DaemonArgs) -> Vec<Check> {
    let mut out = vec![config(&args.config), kvm()];
    out.extend(guest_files(&args.guest_dir));
    out.push(native_agent(args));
    out.push(cgroups(args));
    out.push(tun());
    out.push(cni(args));
    out.push(socket(&args.socket));
    out
}

/// The configuration file was read before the checks ran (an invalid one stops `podvisor` earlier).
fn config(path: &Path) -> Check {
    Check {
        name: "config",
        ok: true,
        warning: false,
        detail: if path.exists() {
            format!("{} is valid", path.display())
        } else {
            format!("no {}: embedded defaults", path.display())
        },
    }
}

fn kvm() -> Check {
    let host = KvmHost::detect();
    Check {
        name: "kvm",
        ok: host.dev_kvm,
        warning: false,
        detail: if host.dev_kvm {
            match host.kind {
                HostKind::Pvm => format!(
                    "/dev/kvm is {}: guest kernel code is emulated, pod boots take tens of seconds",
                    host.kind
                ),
                kind => format!("/dev/kvm is {kind}"),
            }
        } else {
            "/dev/kvm is missing (load kvm_intel, kvm_amd or kvm_pvm)".into()
        },
    }
}

/// The guest kernel must be an x86-64 ELF (the VMM boots `vmlinux`, not a bzImage); the initramfs an
/// uncompressed newc archive whose agent serves every RPC of this daemon's protocol.
fn guest_files(guest_dir: &Path) -> Vec<Check> {
    let kernel = guest_dir.join("vmlinux");
    let kernel_check = match std::fs::File::open(&kernel).and_then(|mut f| {
        let mut head = [0u8; 20];
        std::io::Read::read_exact(&mut f, &mut head).map(|_| head)
    }) {
        Err(e) => Err(format!(
            "{}: {e} (run guest/build.sh and install it)",
            kernel.display()
        )),
        Ok(h) if &h[..4] != b"\x7fELF" || h[4] != 2 || u16::from_le_bytes([h[18], h[19]]) != 62 => {
            Err(format!("{} is not an x86-64 ELF vmlinux", kernel.display()))
        }
        Ok(_) => Ok(kernel.display().to_string()),
    };
    let initramfs = guest_dir.join("initramfs.cpio");
    let initramfs_check = std::fs::read(&initramfs)
        .map_err(|e| {
            format!(
                "{}: {e} (run guest/build.sh and install it)",
                initramfs.display()
            )
        })
        .and_then(|bytes| agent_matches(&initramfs, &bytes));
    [
        ("guest kernel", kernel_check),
        ("guest initramfs", initramfs_check),
    ]
    .into_iter()
    .map(|(name, r)| Check {
        name,
        ok: r.is_ok(),
        warning: false,
        detail: r.unwrap_or_else(|e| e),
    })
    .collect()
}

/// The agent native pods run on the node: an executable ELF speaking this daemon's protocol (not
/// needed with `--host-pods refuse`).
fn native_agent(args: &DaemonArgs) -> Check {
    let agent = args.guest_dir.join("podvisor-agent");
    let result = if args.pods.host_pods == crate::daemon::HostPods::Refuse {
        Ok("not needed: native pods are refused (--host-pods refuse)".to_string())
    } else {
        std::fs::read(&agent)
            .map_err(|e| {
                format!(
                    "{}: {e} (run guest/build.sh and install it; or --host-pods refuse)",
                    agent.display()
                )
            })
            .and_then(|bytes| {
                use std::os::unix::fs::PermissionsExt;
                let executable =
                    std::fs::metadata(&agent).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
                if !bytes.starts_with(b"\x7fELF") || !executable {
                    return Err(format!("{} is not an executable ELF", agent.display()));
                }
                speaks_protocol(&agent, &bytes)
            })
    };
    Check {
        name: "native pod agent",
        ok: result.is_ok(),
        warning: false,
        detail: result.unwrap_or_else(|e| e),
    }
}

fn agent_matches(path: &Path, bytes: &[u8]) -> Result<String, String> {
    if !bytes.starts_with(b"070701") {
        return Err(format!(
            "{} is not an uncompressed newc cpio archive",
            path.display()
        ));
    }
    speaks_protocol(path, bytes)
}

/// Whether the agent in `bytes` (a binary, or an archive holding it) serves every RPC of this daemon.
fn speaks_protocol(path: &Path, bytes: &[u8]) -> Result<String, String> {
    let missing: Vec<String> = podvisor_proto::agent_method_paths()
        .into_iter()
        .filter(|m| !bytes.windows(m.len()).any(|w| w == m.as_bytes()))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing
            .iter()
            .map(|m| m.rsplit('/').next().unwrap_or(m))
            .collect();
        return Err(format!(
            "{}: its agent lacks RPCs this daemon uses ({}): rebuild it with guest/build.sh",
            path.display(),
            names.join(", ")
        ));
    }
    Ok(format!(
        "{} ({} bytes, agent speaks every RPC of this daemon)",
        path.display(),
        bytes.len()
    ))
}

fn cgroups(args: &DaemonArgs) -> Check {
    let cgroup2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let kind = if cgroup2 {
        "v2 (unified)"
    } else {
        "v1 / hybrid"
    };
    let config = args.cgroups.settings();
    let unsupported = crate::cgroups::unsupported();
    let warning = unsupported.is_some() && config.enabled;
    let detail = match (unsupported, config.enabled) {
        (_, false) => format!("{kind}; host cgroups are off (--host-cgroups false)"),
        (Some(why), true) => format!("{kind}; pod VM threads are not placed: {why}"),
        (None, true) => format!(
            "{kind}; vCPU threads go to <cgroup_parent>/podvisor-<pod>, device threads to {}",
            if config.sandbox_cgroup_only {
                "the same cgroup".into()
            } else {
                format!("{}/<pod>", config.overhead_parent)
            }
        ),
    };
    match config.validate() {
        Ok(()) => Check {
            name: "cgroups",
            ok: true,
            warning,
            detail,
        },
        Err(e) => Check {
            name: "cgroups",
            ok: false,
            warning: false,
            detail: e.to_string(),
        },
    }
}

fn tun() -> Check {
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    Check {
        name: "tun",
        ok: r.is_ok(),
        warning: false,
        detail: match r {
            Ok(_) => "/dev/net/tun opens (pod VMs get taps)".into(),
            Err(e) => format!("/dev/net/tun: {e} (load the tun module)"),
        },
    }
}

fn cni(args: &DaemonArgs) -> Check {
    let n = &args.network;
    let network = crate::network::Network::new(crate::network::NetworkConfig {
        conf_dir: n.cni_conf_dir.clone(),
        bin_dirs: n.cni_bin_dirs.clone(),
        netns_dir: n.netns_dir.clone(),
        ..Default::default()
    });
    match network.status() {
        Ok(name) => Check {
            name: "cni",
            ok: true,
            warning: false,
            detail: format!(
                "network {name:?} from {}, plugins found",
                n.cni_conf_dir.display()
            ),
        },
        Err(e) => Check {
            name: "cni",
            ok: false,
            warning: false,
            detail: format!("{e} (deploy/cni/10-podvisor.conflist is a single-node default)"),
        },
    }
}

/// The socket's directory must not be writable by others (anyone could replace the socket); an
/// existing socket must not be accessible to others.
fn socket(socket: &Path) -> Check {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let mut problems = Vec::new();
    if let Ok(m) = std::fs::metadata(dir) {
        if m.mode() & 0o002 != 0 {
            problems.push(format!("{} is world-writable", dir.display()));
        }
    }
    let detail = match std::fs::symlink_metadata(socket) {
        Err(_) => format!(
            "{} does not exist yet (the daemon creates it with mode 0660)",
            socket.display()
        ),
        Ok(m) if !m.file_type().is_socket() => {
            problems.push(format!("{} exists and is not a socket", socket.display()));
            String::new()
        }
        Ok(m) => {
            if m.mode() & 0o007 != 0 {
                problems.push(format!(
                    "{} has mode {:o}: others may use it",
                    socket.display(),
                    m.mode() & 0o777
                ));
            }
            let serving = std::os::unix::net::UnixStream::connect(socket).is_ok();
            format!(
                "{} mode {:o}, owner uid {}, {}",
                socket.display(),
                m.mode() & 0o777,
                m.uid(),
                if serving {
                    "a daemon serves it"
                } else {
                    "stale (no daemon)"
                }
            )
        }
    };
    Check {
        name: "socket",
        ok: problems.is_empty(),
        warning: false,
        detail: if problems.is_empty() {
            detail
        } else {
            problems.join("; ")
        },
    }
}

/// Prints the report for the daemon settings `args`; the exit code is non-zero if any check failed.
pub fn run(args: &DaemonArgs) -> ExitCode {
    let results = checks(args);
    for c in &results {
        println!(
            "{} {:<16} {}",
            match (c.ok, c.warning) {
                (false, _) => "FAIL",
                (true, true) => "WARN",
                (true, false) => "PASS",
            },
            c.name,
            c.detail
        );
    }
    if results.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> DaemonArgs {
        let mut argv = vec!["podvisor"];
        argv.extend_from_slice(extra);
        crate::Cli::try_parse_from(argv).unwrap().daemon
    }

    fn find<'a>(results: &'a [Check], name: &str) -> &'a Check {
        results.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn guest_files_are_checked_for_kind_and_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let results = checks(&args(&["--guest-dir", d]));
        assert!(!find(&results, "guest kernel").ok);
        assert!(find(&results, "guest kernel").detail.contains("vmlinux"));
        std::fs::write(dir.path().join("vmlinux"), b"MZ not an elf at all").unwrap();
        let k = checks(&args(&["--guest-dir", d]));
        assert!(find(&k, "guest kernel")
            .detail
            .contains("not an x86-64 ELF"));
        // An archive whose agent lacks a method is refused, naming the method.
        let mut cpio = b"070701".to_vec();
        for m in podvisor_proto::agent_method_paths() {
            if !m.ends_with("/CopyFile") {
                cpio.extend_from_slice(m.as_bytes());
            }
        }
        std::fs::write(dir.path().join("initramfs.cpio"), &cpio).unwrap();
        let r = checks(&args(&["--guest-dir", d]));
        let i = find(&r, "guest initramfs");
        assert!(!i.ok && i.detail.contains("CopyFile"), "{}", i.detail);
        cpio.extend_from_slice(b"/podvisor.agent.v1.Agent/CopyFile");
        std::fs::write(dir.path().join("initramfs.cpio"), &cpio).unwrap();
        assert!(find(&checks(&args(&["--guest-dir", d])), "guest initramfs").ok);
        // The native pods' agent: missing fails, unless native pods are refused.
        assert!(!find(&checks(&args(&["--guest-dir", d])), "native pod agent").ok);
        let refused = checks(&args(&["--guest-dir", d, "--host-pods", "refuse"]));
        assert!(find(&refused, "native pod agent").ok);
        let agent = dir.path().join("podvisor-agent");
        std::fs::write(&agent, [&b"\x7fELF"[..], &cpio[6..]].concat()).unwrap();
        let r = checks(&args(&["--guest-dir", d]));
        assert!(find(&r, "native pod agent")
            .detail
            .contains("not an executable"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = checks(&args(&["--guest-dir", d]));
        assert!(
            find(&r, "native pod agent").ok,
            "{:?}",
            find(&r, "native pod agent")
        );
        // The real guest build, when there is one, passes.
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
        if built.join("vmlinux").exists() {
            let r = checks(&args(&["--guest-dir", built.to_str().unwrap()]));
            assert!(
                find(&r, "guest kernel").ok,
                "{:?}",
                find(&r, "guest kernel")
            );
            assert!(
                find(&r, "guest initramfs").ok,
                "{:?}",
                find(&r, "guest initramfs")
            );
            let agent = find(&r, "native pod agent");
            assert!(agent.ok, "{agent:?}");
        }
    }

    #[test]
    fn kvm_check_reports_the_host_kind() {
        let host = KvmHost::detect();
        let kvm = kvm();
        assert_eq!(kvm.ok, host.dev_kvm);
        if host.kind == HostKind::Pvm && host.dev_kvm {
            assert!(kvm.detail.contains("PVM"), "{}", kvm.detail);
        }
    }

    #[test]
    fn cni_and_socket_problems_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        std::fs::create_dir(&conf).unwrap();
        let sock = dir.path().join("run/podvisor.sock");
        let a = args(&[
            "--cni-conf-dir",
            conf.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ]);
        let r = checks(&a);
        assert!(!find(&r, "cni").ok);
        assert!(
            find(&r, "cni").detail.contains("net.d"),
            "{}",
            find(&r, "cni").detail
        );
        assert!(find(&r, "socket").ok, "{:?}", find(&r, "socket"));
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        std::fs::write(&sock, b"").unwrap();
        let s = socket(&sock);
        assert!(!s.ok && s.detail.contains("not a socket"), "{}", s.detail);
        std::fs::remove_file(&sock).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let s = socket(&sock);
        assert!(
            !s.ok && s.detail.contains("others may use it"),
            "{}",
            s.detail
        );
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();
        let s = socket(&sock);
        assert!(
            s.ok && s.detail.contains("a daemon serves it"),
            "{}",
            s.detail
        );
        drop(listener);
    }
}
