//! Processes exec'd into a container run with the container's security: its user as resolved from the
//! image (by name), supplementary groups, capabilities, no_new_privileges and seccomp filter. Four
//! containers: a Localhost-style profile denying chmod and a RuntimeDefault-shaped one, each with and
//! without no_new_privileges, two of them running as `nobody` given by name.

use pb::AgentClient;
use podvisor_proto as pb;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::{collect, container, create, exec_req, spec, wait};

/// What the init and an exec'd process print about themselves; both must print the same.
const SELF: &str =
    "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' \
                    /proc/self/status; id";

/// chmod denied with EPERM (glibc's chmod may use any of these).
fn deny_chmod() -> Value {
    json!({"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1})
}

/// A Localhost-style profile: allow everything but chmod.
fn localhost_profile() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [deny_chmod()]
    })
}

/// The shape of podvisor's RuntimeDefault (cri-server/src/spec/security.rs `default_profile`): allow by
/// default, Docker's deny list as EPERM, clone with a namespace flag denied through MASKED_EQ rules,
/// clone3 ENOSYS, AF_VSOCK sockets denied, three architectures; plus chmod, so that a denial is
/// observable with busybox (the syscalls it denies are refused to a capability-less process anyway).
fn runtime_default_profile() -> Value {
    let mut syscalls = vec![
        json!({"names": ["acct", "add_key", "keyctl", "request_key", "bpf", "clock_adjtime",
                         "clock_settime", "settimeofday", "kexec_load", "swapon", "swapoff",
                         "delete_module", "finit_module", "init_module", "kcmp", "userfaultfd",
                         "mount", "umount2", "pivot_root", "setns", "unshare", "sethostname",
                         "open_by_handle_at", "perf_event_open", "reboot", "syslog"],
               "action": "SCMP_ACT_ERRNO", "errnoRet": 1}),
        deny_chmod(),
    ];
    for flag in [
        0x0002_0000u64,
        0x0200_0000,
        0x0400_0000,
        0x0800_0000,
        0x1000_0000,
        0x2000_0000,
        0x4000_0000,
    ] {
        syscalls.push(
            json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]}),
        );
    }
    syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}));
    syscalls.push(
        json!({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
        "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_EQ"}]}),
    );
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls
    })
}

/// One container's spec: the init prints [`SELF`] then sleeps.
fn secured_spec(profile: Value, no_new_privileges: bool) -> Vec<u8> {
    let init = format!("{SELF}; exec sleep 1000");
    let mut v: Value = serde_json::from_slice(&spec(&["sh", "-c", &init], None)).unwrap();
    v["linux"]["seccomp"] = profile;
    if no_new_privileges {
        v["process"]["noNewPrivileges"] = json!(true);
    } else {
        v["process"]
            .as_object_mut()
            .unwrap()
            .remove("noNewPrivileges");
    }
    serde_json::to_vec(&v).unwrap()
}

/// Creates, starts and execs into each container, then removes it.
pub async fn exec_security(agent: &mut AgentClient<Channel>) {
    let cases = [
        ("s1", "localhost", true, "nobody"),
        ("s2", "localhost", false, ""),
        ("s3", "default", false, "nobody"),
        ("s4", "default", true, ""),
    ];
    for (id, profile, nnp, user) in cases {
        let what = format!("{id}: {profile} profile, no_new_privileges {nnp}, user {user:?}");
        let profile = match profile {
            "localhost" => localhost_profile(),
            _ => runtime_default_profile(),
        };
        let mut req = create(id, secured_spec(profile, nnp));
        req.user = user.into();
        agent.create_container(req).await.expect(&what);
        let init_out = collect(agent, id, "", pb::OutputStream::Stdout);
        agent.start_container(container(id)).await.expect(&what);

        let script = format!("{SELF}; touch /dev/shm/f && chmod 600 /dev/shm/f");
        let exec = agent
            .exec_process(exec_req(id, "x", &["sh", "-c", &script], false))
            .await;
        if let Err(e) = &exec {
            assert!(!e.message().contains('\0'), "{what}: NUL in {e:?}");
            panic!("{what}: ExecProcess: {e:?}");
        }
        let out = collect(agent, id, "x", pb::OutputStream::Stdout);
        let err = collect(agent, id, "x", pb::OutputStream::Stderr);
        let waited = wait(agent, id, "x").await;
        let (out, err) = (out.await.unwrap(), err.await.unwrap());
        eprintln!("{what}: exec'd process:\n{out}{err}");
        assert_eq!(waited.exit_code, 1, "{what}: chmod must fail: {out}{err}");
        assert!(
            err.contains("Operation not permitted"),
            "{what}: chmod EPERM: {err:?}"
        );
        assert!(out.contains("Seccomp:\t2\n"), "{what}: {out}");
        let nnp_line = format!("NoNewPrivs:\t{}\n", u8::from(nnp));
        assert!(out.contains(&nnp_line), "{what}: {out}");
        if user == "nobody" {
            assert!(
                out.contains("uid=65534(nobody) gid=65534(nogroup)") && out.contains("100(users)"),
                "{what}: {out}"
            );
        } else {
            assert!(out.contains("uid=0(root) gid=0(root)"), "{what}: {out}");
        }

        let removed = agent
            .remove_container(container(id))
            .await
            .unwrap()
            .into_inner();
        assert!(removed.removed, "{what}");
        let init = init_out.await.unwrap();
        assert_eq!(out, init, "{what}: the exec'd process and the init differ");
    }
}
