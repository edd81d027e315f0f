//! Boot benchmark: our VMM vs `qemu-system-x86_64 -M microvm` booting the same kernel, initramfs and
//! command line in the same run. Prints one JSON line per metric:
//! `{"metric":..,"unit":..,"ours":..,"peer":"qemu-microvm","peer_value":..,"ratio":..}`.
//!
//! - `boot_to_agent_start`: from VM creation (our `Vm::boot` / QEMU spawn) to the agent's first console
//!   line — the same guest work on both sides, so the ratio measures the VMMs. (QEMU cannot reach the
//!   agent's vsock here: there is no /dev/vhost-vsock on this host.)
//! - `boot_to_agent_ready`: ours only — until the agent answers Health over vsock.
//! - `idle_vm_pss`: host memory of an idle VM: our process's PSS growth vs the QEMU process's PSS.
//!
//! `cargo bench -p vmm --bench boot`; PODVISOR_BENCH_RUNS (default 1) runs alternate ours/QEMU.

use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_testkit::guest::vm_prerequisites;
use podvisor_testkit::procfs::pss_kib;
use podvisor_testkit::qemu::qemu_boot;
use podvisor_testkit::vm::{vm_config, wait_for_agent, wait_for_marker};

const AGENT_START_MARKER: &str = "starting: pid 1,";
const TIMEOUT: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(3);

struct Sample {
    agent_start: f64,
    pss_mib: f64,
}

fn ours(dir: &Path, kernel: &Path, initramfs: &Path, ready: &mut Vec<f64>) -> Sample {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pss_before = pss_kib(std::process::id());
    let config = vm_config(
        dir,
        kernel,
        initramfs,
        vec![vmm::BlockSlotConfig { read_only: true }],
    );
    let (console, uds) = (config.console_log.clone(), config.vsock_uds.clone());
    let start = Instant::now();
    let vm = vmm::Vm::boot(config).expect("boot");
    assert!(
        wait_for_marker(&console, AGENT_START_MARKER, TIMEOUT),
        "ours: no agent start"
    );
    let agent_start = start.elapsed().as_secs_f64();
    let agent = rt.block_on(wait_for_agent(&uds, TIMEOUT)).expect("agent");
    ready.push(start.elapsed().as_secs_f64());
    std::thread::sleep(SETTLE);
    let pss = pss_kib(std::process::id()).saturating_sub(pss_before);
    drop(agent);
    vm.stop();
    Sample {
        agent_start,
        pss_mib: pss as f64 / 1024.0,
    }
}

fn qemu(dir: &Path, kernel: &Path, initramfs: &Path) -> Sample {
    let boot = qemu_boot(dir, kernel, initramfs, AGENT_START_MARKER, TIMEOUT, SETTLE);
    Sample {
        agent_start: boot.to_marker,
        pss_mib: boot.pss_mib,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn line(metric: &str, unit: &str, ours: f64, peer: Option<f64>) {
    match peer {
        Some(p) => println!(
            r#"{{"metric":"{metric}","unit":"{unit}","ours":{ours:.3},"peer":"qemu-microvm","peer_value":{p:.3},"ratio":{:.3}}}"#,
            ours / p
        ),
        None => println!(r#"{{"metric":"{metric}","unit":"{unit}","ours":{ours:.3}}}"#),
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some((kernel, initramfs)) = vm_prerequisites("bench boot") else {
        return;
    };
    let runs: usize = std::env::var("PODVISOR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (mut our_samples, mut peer_samples, mut ready) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let (o, q) = if run % 2 == 0 {
            let o = ours(dir.path(), &kernel, &initramfs, &mut ready);
            (o, qemu(dir.path(), &kernel, &initramfs))
        } else {
            let q = qemu(dir.path(), &kernel, &initramfs);
            (ours(dir.path(), &kernel, &initramfs, &mut ready), q)
        };
        eprintln!(
            "run {run}: ours {:.2}s {:.1}MiB, qemu {:.2}s {:.1}MiB",
            o.agent_start, o.pss_mib, q.agent_start, q.pss_mib
        );
        our_samples.push(o);
        peer_samples.push(q);
    }
    let field = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    line(
        "boot_to_agent_start",
        "s",
        field(&our_samples, |s| s.agent_start),
        Some(field(&peer_samples, |s| s.agent_start)),
    );
    line("boot_to_agent_ready", "s", median(ready), None);
    line(
        "idle_vm_pss",
        "MiB",
        field(&our_samples, |s| s.pss_mib),
        Some(field(&peer_samples, |s| s.pss_mib)),
    );
    println!(
        r#"{{"metric":"initramfs_size","unit":"bytes","ours":{}}}"#,
        std::fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0)
    );
}
