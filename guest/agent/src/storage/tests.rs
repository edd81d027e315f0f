use std::sync::Arc;

use super::*;

/// Records calls; fails mount/unmount with the configured errno.
#[derive(Default)]
pub(crate) struct FakeOps {
    pub calls: Mutex<Vec<String>>,
    pub mount_error: Mutex<Option<Errno>>,
    pub unmount_error: Mutex<Option<Errno>>,
}

impl SystemOps for Arc<FakeOps> {
    fn mknod_block(&self, path: &Path, major: u32, minor: u32) -> Result<(), Errno> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("mknod {} {major}:{minor}", path.display()));
        std::fs::write(path, b"").map_err(|_| Errno::EIO)
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fstype: &str,
        read_only: bool,
    ) -> Result<(), Errno> {
        self.calls.lock().unwrap().push(format!(
            "mount {} {} {fstype} ro={read_only}",
            device.display(),
            target.display()
        ));
        self.mount_error.lock().unwrap().map_or(Ok(()), Err)
    }

    fn unmount(&self, target: &Path, detach: bool) -> Result<(), Errno> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("umount {} detach={detach}", target.display()));
        self.unmount_error.lock().unwrap().map_or(Ok(()), Err)
    }
}

/// A fake `/sys/block` + `/dev` + storage root in a tempdir.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub ops: Arc<FakeOps>,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["sys/block", "dev", "storage"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Self {
            dir,
            ops: Arc::new(FakeOps::default()),
        }
    }

    pub fn sys_block(&self) -> PathBuf {
        self.dir.path().join("sys/block")
    }

    /// Adds disk `name` with the given serial, size and device number; `node` creates `/dev/<name>`.
    pub fn disk(&self, name: &str, serial: &str, size: u64, devno: &str, node: bool) {
        let d = self.sys_block().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("serial"), format!("{serial}\n")).unwrap();
        std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        std::fs::write(d.join("dev"), format!("{devno}\n")).unwrap();
        if node {
            std::fs::write(self.dir.path().join("dev").join(name), b"").unwrap();
        }
    }

    pub fn set_size(&self, name: &str, size: u64) {
        std::fs::write(
            self.sys_block().join(name).join("size"),
            format!("{size}\n"),
        )
        .unwrap();
    }

    pub fn manager(&self) -> StorageManager {
        StorageManager::new(
            self.sys_block(),
            self.dir.path().join("dev"),
            self.dir.path().join("storage"),
            Duration::from_millis(5),
            Box::new(self.ops.clone()),
        )
    }

    pub fn calls(&self) -> Vec<String> {
        self.ops.calls.lock().unwrap().clone()
    }
}

fn request(id: &str, slot: u32, fstype: &str, read_only: bool) -> AddStorageRequest {
    AddStorageRequest {
        id: id.into(),
        block_slot: slot,
        fstype: fstype.into(),
        read_only,
        mount_point: None,
        image_path: None,
        timeout_ms: 0,
    }
}

#[test]
fn spec_validation() {
    let root = Path::new("/run/podvisor/storage");
    let spec = StorageSpec::from_request(&request("layer-0.a_b", 3, "erofs", true), root).unwrap();
    assert_eq!(
        spec.mount_point,
        Path::new("/run/podvisor/storage/layer-0.a_b")
    );
    assert_eq!(spec.timeout, Duration::from_secs(30));
    assert_eq!((spec.slot, spec.fstype, spec.read_only), (3, "erofs", true));

    let field = |req: AddStorageRequest| match StorageSpec::from_request(&req, root) {
        Err(StorageError::InvalidArgument { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    for id in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
        assert_eq!(field(request(id, 0, "ext4", false)), "id", "{id:?}");
    }
    assert_eq!(field(request("a", 0, "xfs", false)), "fstype");
    assert_eq!(field(request("a", 0, "", false)), "fstype");
    assert_eq!(field(request("a", 0, "erofs", false)), "read_only");
    for mp in ["relative", "/a/../b", "/", ""] {
        let req = AddStorageRequest {
            mount_point: Some(mp.into()),
            ..request("a", 0, "ext4", false)
        };
        assert_eq!(field(req), "mount_point", "{mp:?}");
    }
    let req = AddStorageRequest {
        timeout_ms: MAX_STORAGE_TIMEOUT_MS + 1,
        ..request("a", 0, "ext4", false)
    };
    assert_eq!(field(req), "timeout_ms");
    let req = AddStorageRequest {
        mount_point: Some("/mnt//data/".into()),
        timeout_ms: 1500,
        ..request("a", 0, "ext4", false)
    };
    let spec = StorageSpec::from_request(&req, root).unwrap();
    assert_eq!(spec.mount_point, Path::new("/mnt/data"));
    assert_eq!(spec.timeout, Duration::from_millis(1500));
}

#[test]
fn finds_device_by_serial() {
    let fx = Fixture::new();
    fx.disk("vda", "slot0", 0, "254:0", true);
    fx.disk("vdb", "slot1", 8, "254:16", true);
    fx.disk("vdc", "slot10", 8, "254:32", true);
    // Not a virtio disk: ignored even with a matching serial.
    fx.disk("loop0", "slot2", 8, "7:0", true);
    assert_eq!(find_slot_device(&fx.sys_block(), 0).unwrap(), "vda");
    assert_eq!(find_slot_device(&fx.sys_block(), 1).unwrap(), "vdb");
    assert_eq!(find_slot_device(&fx.sys_block(), 10).unwrap(), "vdc");
    assert!(matches!(
        find_slot_device(&fx.sys_block(), 2),
        Err(StorageError::SlotNotFound(2))
    ));
    // Serials may be NUL-padded and lack the newline.
    std::fs::write(fx.sys_block().join("vdc/serial"), b"slot7\0\0\0").unwrap();
    assert_eq!(find_slot_device(&fx.sys_block(), 7).unwrap(), "vdc");
    // A disk without a readable serial is skipped.
    std::fs::remove_file(fx.sys_block().join("vda/serial")).unwrap();
    assert!(matches!(
        find_slot_device(&fx.sys_block(), 0),
        Err(StorageError::SlotNotFound(0))
    ));
    assert!(matches!(
        find_slot_device(&fx.dir.path().join("nope"), 0),
        Err(StorageError::Io { .. })
    ));
}

#[tokio::test]
async fn waits_for_hot_attach() {
    let fx = Fixture::new();
    fx.disk("vdb", "slot1", 0, "254:16", true);
    let sys_block = fx.sys_block();
    let attach = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(60)).await;
        std::fs::write(sys_block.join("vdb/size"), "2048\n").unwrap();
    });
    let size = wait_for_image(
        &fx.sys_block(),
        "vdb",
        1,
        Duration::from_secs(10),
        Duration::from_millis(5),
    )
    .await
    .unwrap();
    assert_eq!(size, 2048);
    attach.await.unwrap();
}

#[tokio::test]
async fn wait_times_out() {
    let fx = Fixture::new();
    fx.disk("vdb", "slot1", 0, "254:16", true);
    let start = std::time::Instant::now();
    let err = wait_for_image(
        &fx.sys_block(),
        "vdb",
        1,
        Duration::from_millis(100),
        Duration::from_millis(5),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StorageError::Timeout { slot: 1, .. }),
        "{err}"
    );
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(start.elapsed() < Duration::from_secs(5));
    fx.set_size("vdb", 0);
    std::fs::write(fx.sys_block().join("vdb/size"), "garbage").unwrap();
    assert!(matches!(
        wait_for_image(
            &fx.sys_block(),
            "vdb",
            1,
            Duration::from_millis(10),
            Duration::from_millis(5)
        )
        .await,
        Err(StorageError::Io { .. })
    ));
}

#[tokio::test]
async fn add_and_remove() {
    let fx = Fixture::new();
    fx.disk("vda", "slot0", 100, "254:0", true);
    // No /dev node: the manager creates it from sysfs.
    fx.disk("vdb", "slot1", 0, "254:16", false);
    let mgr = fx.manager();
    let spec = StorageSpec::from_request(&request("rootfs", 0, "ext4", false), mgr.default_root())
        .unwrap();
    let (mp, dev) = mgr.add(&spec).await.unwrap();
    assert_eq!(mp, fx.dir.path().join("storage/rootfs"));
    assert_eq!(dev, fx.dir.path().join("dev/vda"));
    assert!(mp.is_dir());

    // Same id again, or another id on the same mount point or device.
    assert!(matches!(
        mgr.add(&spec).await,
        Err(StorageError::AlreadyExists(_))
    ));
    let mut other = spec.clone();
    other.id = "other".into();
    assert!(matches!(
        mgr.add(&other).await,
        Err(StorageError::FailedPrecondition(_))
    ));
    other.mount_point = fx.dir.path().join("elsewhere");
    assert!(matches!(
        mgr.add(&other).await,
        Err(StorageError::FailedPrecondition(_))
    ));
    assert!(
        !other.mount_point.exists(),
        "failed adds leave no mount point"
    );

    // Slot 1 gets its image while AddStorage waits.
    let sys_block = fx.sys_block();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        std::fs::write(sys_block.join("vdb/size"), "8\n").unwrap();
    });
    let spec1 =
        StorageSpec::from_request(&request("layer", 1, "erofs", true), mgr.default_root()).unwrap();
    mgr.add(&spec1).await.unwrap();

    let dev_dir = fx.dir.path().join("dev");
    let storage = fx.dir.path().join("storage");
    assert_eq!(
        fx.calls(),
        vec![
            format!(
                "mount {} {} ext4 ro=false",
                dev_dir.join("vda").display(),
                storage.join("rootfs").display()
            ),
            format!("mknod {} 254:16", dev_dir.join("vdb").display()),
            format!(
                "mount {} {} erofs ro=true",
                dev_dir.join("vdb").display(),
                storage.join("layer").display()
            ),
        ]
    );

    assert!(mgr.remove("rootfs").unwrap());
    assert!(!mp.exists());
    assert!(!mgr.remove("rootfs").unwrap(), "idempotent");
    assert!(!mgr.remove("never-added").unwrap());
    assert!(matches!(
        mgr.remove("../x"),
        Err(StorageError::InvalidArgument { field: "id", .. })
    ));
    // The id can be reused once removed.
    mgr.add(&spec).await.unwrap();
}

#[tokio::test]
async fn add_failures_release_the_id() {
    let fx = Fixture::new();
    fx.disk("vda", "slot0", 0, "254:0", true);
    let mgr = fx.manager();
    let mut spec =
        StorageSpec::from_request(&request("s", 0, "ext4", false), mgr.default_root()).unwrap();
    spec.timeout = Duration::from_millis(20);
    assert!(matches!(
        mgr.add(&spec).await,
        Err(StorageError::Timeout { .. })
    ));
    let mut missing = spec.clone();
    missing.slot = 9;
    assert!(matches!(
        mgr.add(&missing).await,
        Err(StorageError::SlotNotFound(9))
    ));

    fx.set_size("vda", 8);
    *fx.ops.mount_error.lock().unwrap() = Some(Errno::ENODEV);
    let err = mgr.add(&spec).await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Mount {
                errno: Errno::ENODEV,
                ..
            }
        ),
        "{err}"
    );
    assert!(!spec.mount_point.exists());

    *fx.ops.mount_error.lock().unwrap() = None;
    mgr.add(&spec).await.unwrap();
}

#[tokio::test]
async fn remove_errors_and_unmount_all() {
    let fx = Fixture::new();
    fx.disk("vda", "slot0", 8, "254:0", true);
    fx.disk("vdb", "slot1", 8, "254:16", true);
    let mgr = fx.manager();
    for (id, slot) in [("a", 0), ("b", 1)] {
        let spec = StorageSpec::from_request(&request(id, slot, "ext4", false), mgr.default_root())
            .unwrap();
        mgr.add(&spec).await.unwrap();
    }
    *fx.ops.unmount_error.lock().unwrap() = Some(Errno::EBUSY);
    assert!(matches!(
        mgr.remove("a"),
        Err(StorageError::FailedPrecondition(_))
    ));
    *fx.ops.unmount_error.lock().unwrap() = Some(Errno::EPERM);
    assert!(matches!(
        mgr.remove("a"),
        Err(StorageError::Unmount {
            errno: Errno::EPERM,
            ..
        })
    ));
    // Already unmounted behind the agent's back: still removed.
    *fx.ops.unmount_error.lock().unwrap() = Some(Errno::EINVAL);
    assert!(mgr.remove("a").unwrap());

    *fx.ops.unmount_error.lock().unwrap() = None;
    fx.ops.calls.lock().unwrap().clear();
    assert!(mgr.unmount_all().is_empty());
    assert_eq!(
        fx.calls(),
        vec![format!(
            "umount {} detach=false",
            fx.dir.path().join("storage/b").display()
        )]
    );
    assert!(!mgr.remove("b").unwrap(), "forgotten after unmount_all");
}
