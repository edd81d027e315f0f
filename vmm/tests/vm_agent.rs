//! End to end on a real KVM VM: boot the project's kernel + initramfs, reach the agent over vsock,
//! configure the virtio-net interface and reach the guest kernel's TCP stack through the tap,
//! hot-attach a block image, read a file from it through the agent, detach it, shut the VM down, and
//! check that no thread, fd, file or interface is left behind. One test, one boot: boots are slow
//! under PVM.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podvisor_proto::{
    AddStorageRequest, Interface, ReadFileRequest, RemoveStorageRequest, ShutdownRequest,
    UpdateInterfaceRequest, VersionRequest,
};
use podvisor_testkit::guest::vm_prerequisites;
use podvisor_testkit::image::make_ext4;
use podvisor_testkit::netns::TestNetns;
use podvisor_testkit::procfs::{fd_targets, proc_count};
use podvisor_testkit::vm::{vm_config, wait_for_agent};
use vmm::{BlockSlotConfig, Error, ExitReason, NetConfig, Tap, Vm, VmState};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const TAP: &str = "pvtap0";
const GUEST_MAC: [u8; 6] = [0x02, 0x50, 0x56, 0x00, 0x00, 0x02];

#[test]
fn boot_agent_block_hotplug_and_clean_teardown() {
    let Some((kernel, initramfs)) = vm_prerequisites("boot_agent_block_hotplug_and_clean_teardown")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = format!("podvisor-{}-{:?}", std::process::id(), Instant::now());
    let image = make_ext4(
        dir.path(),
        "data",
        &[("dir/hello.txt", token.as_bytes())],
        8,
    );
    let rw_image = make_ext4(dir.path(), "scratch", &[], 8);

    // Tokio creates process-wide resources with the first runtime (e.g. the signal driver's socket
    // pair when the workspace build enables tokio's `signal` feature); create them before counting.
    drop(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let threads_before = proc_count("task");
    let fds_before = fd_targets();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let slots = vec![
        BlockSlotConfig { read_only: true },
        BlockSlotConfig { read_only: false },
    ];
    let mut config = vm_config(dir.path(), &kernel, &initramfs, slots);
    // The host end of the guest's network: a tap with 10.77.0.1/24 in a throwaway namespace.
    let netns = TestNetns::new("boot_agent_block_hotplug_and_clean_teardown", "agent");
    config.net = netns.as_ref().map(|ns| {
        let tap = ns.run(|| Tap::open(TAP)).expect("tap");
        ns.ip(&format!("addr add 10.77.0.1/24 dev {TAP}"));
        ns.ip(&format!("link set {TAP} up"));
        NetConfig {
            tap: Arc::new(tap),
            mac: GUEST_MAC,
            mtu: 1500,
        }
    });
    let vsock_uds = config.vsock_uds.clone();
    let start = Instant::now();
    let vm = Vm::boot(config).expect("boot");
    assert_eq!(vm.state(), VmState::Running);

    let mut agent = rt
        .block_on(wait_for_agent(&vsock_uds, BOOT_TIMEOUT))
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nconsole:\n{}",
                std::fs::read_to_string(vm.console_log()).unwrap_or_default()
            )
        });
    eprintln!("agent ready {:?} after boot", start.elapsed());
    let version = rt
        .block_on(agent.version(VersionRequest {}))
        .unwrap()
        .into_inner();
    assert!(version.kernel_release.starts_with("6.1."), "{version:?}");
    let console = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(
        console.contains("podvisor-agent"),
        "console log lacks the agent banner:\n{console}"
    );

    if let Some(ns) = &netns {
        check_network(&vm, &rt, &mut agent, ns);
    }

    // Hot-attach: the slot had capacity 0 at boot; after attach the guest sees the image.
    let capacity = vm.attach_block(0, &image, true).expect("attach");
    assert_eq!(capacity, 8 << 20);
    assert!(
        matches!(vm.attach_block(0, &image, true), Err(Error::Block(_))),
        "slot 0 is busy"
    );
    assert!(matches!(
        vm.attach_block(0, &rw_image, false),
        Err(Error::Block(_))
    ));
    assert!(matches!(
        vm.attach_block(7, &image, true),
        Err(Error::NoSuchSlot { slot: 7, count: 2 })
    ));
    let t = Instant::now();
    let storage = rt
        .block_on(agent.add_storage(AddStorageRequest {
            id: "data".into(),
            block_slot: 0,
            fstype: "ext4".into(),
            read_only: true,
            mount_point: None,
            image_path: None,
            timeout_ms: 60_000,
        }))
        .expect("AddStorage")
        .into_inner();
    eprintln!("AddStorage took {:?} ({storage:?})", t.elapsed());
    let file = rt
        .block_on(agent.read_file(ReadFileRequest {
            path: format!("{}/dir/hello.txt", storage.mount_point),
            offset: 0,
            max_bytes: 4096,
        }))
        .expect("ReadFile")
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&file.data), token);
    assert!(file.eof);

    // Detach: unmount in the guest first, then empty the slot; the guest sees capacity 0 again.
    rt.block_on(agent.remove_storage(RemoveStorageRequest { id: "data".into() }))
        .expect("RemoveStorage");
    assert_eq!(vm.detach_block(0).expect("detach"), image);
    let again = rt.block_on(agent.add_storage(AddStorageRequest {
        id: "gone".into(),
        block_slot: 0,
        fstype: "ext4".into(),
        read_only: true,
        mount_point: None,
        image_path: None,
        timeout_ms: 1_500,
    }));
    assert_eq!(
        again.expect_err("slot 0 is empty").code(),
        tonic::Code::DeadlineExceeded
    );
    // An image file is how a native pod's agent on the node mounts images; a guest refuses it.
    let file = rt.block_on(agent.add_storage(AddStorageRequest {
        id: "file".into(),
        block_slot: 0,
        fstype: "ext4".into(),
        read_only: true,
        mount_point: None,
        image_path: Some("/run/image.ext4".into()),
        timeout_ms: 1_500,
    }));
    let e = file.expect_err("a guest has no image files");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("image_path"), "{}", e.message());

    // A read-write slot takes a writable image and gives it back.
    vm.attach_block(1, &rw_image, false).expect("attach rw");
    assert_eq!(vm.detach_block(1).expect("detach rw"), rw_image);

    // Guest-initiated shutdown ends the VM with a guest exit reason, not a host stop.
    rt.block_on(agent.shutdown(ShutdownRequest {}))
        .expect("Shutdown");
    let reason = vm
        .wait_timeout(Duration::from_secs(120))
        .expect("VM did not stop after Shutdown");
    assert!(
        matches!(
            reason,
            ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::InternalError { .. }
        ),
        "{reason}"
    );
    assert!(matches!(
        vm.attach_block(0, &image, true),
        Err(Error::NotRunning(_))
    ));
    assert_eq!(vm.stop(), reason);
    drop(agent);
    drop(rt);
    if let Some(ns) = &netns {
        // The VM held the last fd of the (non-persistent) tap.
        assert!(
            ns.ip("-br link").lines().all(|l| !l.starts_with(TAP)),
            "tap left behind"
        );
    }

    assert!(!vsock_uds.exists(), "vsock socket file left behind");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["console.log", "data.ext4", "scratch.ext4"]);
    assert_eq!(proc_count("task"), threads_before, "threads left behind");
    assert_eq!(fd_targets(), fds_before, "fds left behind");
}

/// The agent gives eth0 10.77.0.2/24; a host connection to a closed guest port is refused, which
/// takes ARP and TCP frames both ways through the tap, the device and the guest kernel.
fn check_network(
    vm: &Vm,
    rt: &tokio::runtime::Runtime,
    agent: &mut podvisor_proto::AgentClient<tonic::transport::Channel>,
    ns: &TestNetns,
) {
    let t = Instant::now();
    let mac: Vec<String> = GUEST_MAC.iter().map(|b| format!("{b:02x}")).collect();
    let iface = rt
        .block_on(agent.update_interface(UpdateInterfaceRequest {
            interface: Some(Interface {
                hw_addr: mac.join(":"),
                name: "eth0".into(),
                ip_addresses: vec!["10.77.0.2/24".into()],
                mtu: 0,
            }),
        }))
        .expect("UpdateInterface")
        .into_inner();
    assert_eq!(iface.name, "eth0");
    let connect = ns.run(|| {
        let guest = "10.77.0.2:1".parse().unwrap();
        TcpStream::connect_timeout(&guest, Duration::from_secs(60))
    });
    let err = connect.expect_err("nothing listens on guest port 1");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let stats = vm.net_stats().expect("the VM has a net device");
    // At least ARP request + SYN in, ARP reply + RST out.
    assert!(stats.rx_packets >= 2 && stats.tx_packets >= 2, "{stats:?}");
    assert_eq!(stats.bad_chains, 0, "{stats:?}");
    eprintln!("network checks took {:?} ({stats:?})", t.elapsed());
}
