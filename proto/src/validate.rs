//! Checks of agent requests shared by both ends: the agent refuses what they refuse, and the host runs
//! the same checks before it boots a VM, so a bad pod config costs milliseconds, not a boot.

use std::fmt;

use crate::CreateSandboxRequest;

/// The largest entropy seed `CreateSandbox` accepts.
pub const MAX_ENTROPY: usize = 4096;
/// The longest hostname (the kernel's `HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;
/// Sysctl prefixes a pod may set: the namespaced ones Kubernetes allows (the VM is the pod's namespace).
pub const SYSCTL_PREFIXES: [&str; 5] = [
    "kernel.shm",
    "kernel.msg",
    "kernel.sem",
    "fs.mqueue.",
    "net.",
];
/// Sysctls, DNS servers, search domains and options a pod may have, each.
pub const MAX_ITEMS: usize = 64;
/// The longest sysctl name or value, DNS search domain or option.
pub const MAX_ITEM_LEN: usize = 256;

/// A request field the agent would refuse: `field` names it as the request does (`dns_servers[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    /// The field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidField {}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        message: message.into(),
    }
}

/// A value quoted in a message: Debug-escaped, at most 64 characters.
fn quoted(v: &str) -> String {
    match v.char_indices().nth(64) {
        None => format!("{v:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &v[..cut], v.len()),
    }
}

/// Whether `name` is a valid hostname: dot-separated RFC 1123 labels (letters, digits, '-', not at a
/// label's ends), at most [`MAX_HOSTNAME`] bytes. Pod hostnames are single labels; a node's hostname
/// (the default when a pod has none) may be a fully qualified name.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks a whole `CreateSandbox` request.
pub fn check_sandbox(req: &CreateSandboxRequest) -> Result<(), InvalidField> {
    if !is_hostname(&req.hostname) {
        return Err(invalid(
            "hostname",
            format!(
                "{} is not a hostname (1-{MAX_HOSTNAME} bytes of dot-separated labels of [A-Za-z0-9-], \
                 no leading or trailing '-')",
                quoted(&req.hostname)
            ),
        ));
    }
    for (name, list) in [
        ("dns_servers", &req.dns_servers),
        ("dns_searches", &req.dns_searches),
        ("dns_options", &req.dns_options),
    ] {
        if list.len() > MAX_ITEMS {
            return Err(invalid(
                name,
                format!("{} entries, at most {MAX_ITEMS}", list.len()),
            ));
        }
    }
    for (i, s) in req.dns_servers.iter().enumerate() {
        if s.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(
                format!("dns_servers[{i}]"),
                format!("{} is not an IP address", quoted(s)),
            ));
        }
    }
    let word_ok = |w: &str| {
        !w.is_empty()
            && w.len() <= MAX_ITEM_LEN
            && !w.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    for (i, s) in req.dns_searches.iter().enumerate() {
        if !word_ok(s) {
            return Err(invalid(
                format!("dns_searches[{i}]"),
                format!("{} is not a domain", quoted(s)),
            ));
        }
    }
    for (i, s) in req.dns_options.iter().enumerate() {
        if !word_ok(s) {
            return Err(invalid(
                format!("dns_options[{i}]"),
                format!("{} is not a resolv.conf option", quoted(s)),
            ));
        }
    }
    check_sysctls(req)?;
    if req.entropy.len() > MAX_ENTROPY {
        return Err(invalid(
            "entropy",
            format!("{} bytes, at most {MAX_ENTROPY}", req.entropy.len()),
        ));
    }
    Ok(())
}

/// The node namespace a sysctl would write into, when the pod shares it (runc refuses those too).
fn node_namespace_of(req: &CreateSandboxRequest, sysctl: &str) -> Option<&'static str> {
    let node = req.node_namespaces.unwrap_or_default();
    if node.network && sysctl.starts_with("net.") {
        return Some("network");
    }
    let ipc = !sysctl.starts_with("net.");
    (node.ipc && ipc).then_some("IPC")
}

fn check_sysctls(req: &CreateSandboxRequest) -> Result<(), InvalidField> {
    if req.sysctls.len() > MAX_ITEMS {
        return Err(invalid(
            "sysctls",
            format!("{} entries, at most {MAX_ITEMS}", req.sysctls.len()),
        ));
    }
    for (name, value) in &req.sysctls {
        let chars_ok = !name.is_empty()
            && name.len() <= MAX_ITEM_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !name.split('.').any(|p| p.is_empty() || p == "..");
        if !chars_ok || !SYSCTL_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return Err(invalid(
                "sysctls",
                format!(
                    "{} is not a namespaced sysctl a pod may set ({})",
                    quoted(name),
                    SYSCTL_PREFIXES.join(", ")
                ),
            ));
        }
        if let Some(ns) = node_namespace_of(req, name) {
            return Err(invalid(
                "sysctls",
                format!(
                    "{} is not allowed: the pod shares the node's {ns} namespace, so it would change \
                     the node's",
                    quoted(name)
                ),
            ));
        }
        if value.len() > MAX_ITEM_LEN || value.contains('\0') {
            return Err(invalid(
                format!("sysctls[{name}]"),
                format!("{} is not a sysctl value", quoted(value)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_request() -> CreateSandboxRequest {
        CreateSandboxRequest {
            hostname: "web-0".into(),
            dns_servers: vec!["10.96.0.10".into()],
            dns_searches: vec!["svc.cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn good_requests_pass() {
        check_sandbox(&ok_request()).unwrap();
        // A node's fully qualified hostname (the default of a pod without one).
        let mut r = ok_request();
        r.hostname = "Node-1.example.internal".into();
        check_sandbox(&r).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Change = Box<dyn Fn(&mut CreateSandboxRequest)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|r| r.hostname = String::new()), "hostname"),
            (Box::new(|r| r.hostname = "Bad_Host".into()), "hostname"),
            (Box::new(|r| r.hostname = "a".repeat(65)), "hostname"),
            (Box::new(|r| r.hostname = "a..b".into()), "hostname"),
            (Box::new(|r| r.hostname = "-a".into()), "hostname"),
            (
                Box::new(|r| r.dns_servers.push("x".into())),
                "dns_servers[1]",
            ),
            (
                Box::new(|r| r.dns_searches.push("a b".into())),
                "dns_searches[1]",
            ),
            (
                Box::new(|r| r.dns_options.push(String::new())),
                "dns_options[1]",
            ),
            (
                Box::new(|r| {
                    r.sysctls.insert("kernel.hostname".into(), "x".into());
                }),
                "sysctls",
            ),
            (
                Box::new(|r| {
                    r.sysctls.insert("net.a".into(), "x\0".into());
                }),
                "sysctls[net.a]",
            ),
            (Box::new(|r| r.entropy = vec![0; 4097]), "entropy"),
            // A native pod on the node's network must not change the node's (runc's rule).
            (
                Box::new(|r| {
                    r.node_namespaces = Some(crate::NodeNamespaces {
                        network: true,
                        ..Default::default()
                    })
                }),
                "sysctls",
            ),
            (
                Box::new(|r| {
                    r.sysctls = [("kernel.shmmax".to_string(), "1".to_string())].into();
                    r.node_namespaces = Some(crate::NodeNamespaces {
                        ipc: true,
                        ..Default::default()
                    })
                }),
                "sysctls",
            ),
            (
                Box::new(|r| r.dns_servers = vec!["1.1.1.1".into(); 65]),
                "dns_servers",
            ),
        ];
        for (change, field) in cases {
            let mut r = ok_request();
            change(&mut r);
            let e = check_sandbox(&r).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().len() < 400, "{e}");
        }
    }
}
