//! How big a pod's VM is: vCPUs and memory from the pod's resources plus overhead.

use k8s_cri::v1::{LinuxContainerResources, PodSandboxConfig};

use super::SandboxError;

fn invalid(field: &str, msg: impl std::fmt::Display) -> SandboxError {
    SandboxError::InvalidArgument(format!("{field}: {msg}"))
}

/// MiB.
const MIB: i64 = 1 << 20;
/// Guest memory below which the guest kernel and agent do not fit.
const MIN_MEM_MIB: u32 = 128;
/// Guest memory a pod VM can have, MiB: the VMM's limit.
const MAX_MEM_MIB: u32 = vmm::MAX_MEM_MIB;
/// vCPUs a pod VM can have (the guest kernel's NR_CPUS).
const MAX_VCPUS: i64 = 32;

/// vCPUs and MiB for a pod: its resources plus overhead (CPU quota rounded up). Memory: the pod's
/// memory limits plus its declared overhead (a RuntimeClass's `overhead.podFixed`, which stands for the
/// guest kernel and agent), or plus `guest_overhead_mib` when it declares none; `default_mem_mib` when
/// the pod has no memory limits.
pub fn vm_size(
    config: &PodSandboxConfig,
    default_mem_mib: u32,
    guest_overhead_mib: u32,
    host_cpus: u32,
) -> Result<(u8, u32), SandboxError> {
    let linux = config.linux.as_ref();
    let parts: [(&str, Option<&LinuxContainerResources>); 2] = [
        (
            "config.linux.resources",
            linux.and_then(|l| l.resources.as_ref()),
        ),
        (
            "config.linux.overhead",
            linux.and_then(|l| l.overhead.as_ref()),
        ),
    ];
    let mut cpus = 0f64;
    let mut mem = 0i64;
    let mut limits = 0i64;
    let mut declared_overhead = false;
    for (field, r) in parts {
        let Some(r) = r else { continue };
        // The checks CreateContainer applies (signs, CFS ranges, quota only with a period, the memory
        // floor), with this field's name.
        crate::spec::resources_at(field, r)?;
        if r.cpu_quota > 0 {
            cpus += r.cpu_quota as f64 / r.cpu_period as f64;
        }
        if field.ends_with("resources") {
            limits = r.memory_limit_in_bytes;
        } else {
            declared_overhead = r.memory_limit_in_bytes > 0;
        }
        mem = mem.checked_add(r.memory_limit_in_bytes).ok_or_else(|| {
            invalid(
                &format!("{field}.memory_limit_in_bytes"),
                "the limits overflow",
            )
        })?;
    }
    let vcpus = (cpus.ceil() as i64).clamp(1, MAX_VCPUS.min(i64::from(host_cpus.max(1))));
    let mem_mib = if limits == 0 {
        default_mem_mib
    } else {
        let mib = mem / MIB + i64::from(mem % MIB != 0);
        let total = mib.saturating_add(if declared_overhead {
            0
        } else {
            i64::from(guest_overhead_mib)
        });
        u32::try_from(total)
            .ok()
            .filter(|m| *m <= MAX_MEM_MIB)
            .ok_or_else(|| {
                invalid(
                    "config.linux.resources.memory_limit_in_bytes",
                    format!(
                        "{total} MiB with the guest overhead is more than a pod VM can have \
                         ({MAX_MEM_MIB} MiB)"
                    ),
                )
            })?
    };
    Ok((vcpus as u8, mem_mib.max(MIN_MEM_MIB)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::LinuxPodSandboxConfig;

    fn pod(
        resources: Option<LinuxContainerResources>,
        overhead: Option<LinuxContainerResources>,
    ) -> PodSandboxConfig {
        PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                resources,
                overhead,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
    #[test]
    fn vm_size_follows_limits_plus_overhead() {
        let r = LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 150_000,
            memory_limit_in_bytes: 300 * MIB,
            ..Default::default()
        };
        let o = LinuxContainerResources {
            memory_limit_in_bytes: 20 * MIB,
            ..Default::default()
        };
        // A declared overhead (RuntimeClass podFixed) replaces the guest overhead setting.
        assert_eq!(
            vm_size(&pod(Some(r.clone()), Some(o.clone())), 512, 64, 8).unwrap(),
            (2, 320)
        );
        assert_eq!(
            vm_size(&pod(Some(r.clone()), None), 512, 64, 8).unwrap(),
            (2, 364)
        );
        // An overhead without memory limits: the default memory.
        assert_eq!(vm_size(&pod(None, Some(o)), 512, 64, 8).unwrap(), (1, 512));
        // No limits: the default memory and one vCPU; CPUs are capped by the host.
        assert_eq!(vm_size(&pod(None, None), 512, 64, 8).unwrap(), (1, 512));
        let big = LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 1_000_000,
            ..Default::default()
        };
        assert_eq!(vm_size(&pod(Some(big), None), 512, 64, 2).unwrap().0, 2);
    }

    #[test]
    fn bad_resources_name_the_field() {
        let r = LinuxContainerResources {
            memory_limit_in_bytes: -1,
            ..Default::default()
        };
        let e = vm_size(&pod(Some(r), None), 512, 64, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config.linux.resources.memory_limit_in_bytes"),
            "{e}"
        );
        let r = LinuxContainerResources {
            cpu_quota: 5,
            ..Default::default()
        };
        let e = vm_size(&pod(None, Some(r)), 512, 64, 2)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.linux.overhead.cpu_quota"), "{e}");
    }

    #[test]
    fn the_vm_limit_counts_the_guest_overhead() {
        let mem = |bytes: i64| LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        };
        let max = i64::from(MAX_MEM_MIB) * MIB;
        assert_eq!(
            vm_size(&pod(Some(mem(max - 64 * MIB)), None), 512, 64, 2).unwrap(),
            (1, MAX_MEM_MIB)
        );
        for bytes in [max - 32 * MIB, 100 << 30, 1 << 40] {
            let e = vm_size(&pod(Some(mem(bytes)), None), 512, 64, 2)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("config.linux.resources.memory_limit_in_bytes")
                    && e.contains("65536"),
                "{e}"
            );
        }
        let e = vm_size(&pod(Some(mem(1)), None), 512, 64, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("6 MiB minimum"), "{e}");
    }
}
