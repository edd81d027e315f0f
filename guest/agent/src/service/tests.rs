use super::*;
use crate::storage::tests::Fixture;
use pb::Agent;
use tonic::Code;

pub(crate) fn service(fx: &Fixture) -> (AgentService, Arc<Notify>) {
    let boot = Arc::new(BootInfo {
        started: Instant::now(),
        kernel_release: "6.1.0-test".into(),
        boot_to_agent_start_ms: Some(1234),
        boot_to_ready_ms: AtomicU64::new(0),
    });
    let notify = Arc::new(Notify::new());
    (
        AgentService::new(boot, Arc::new(fx.manager()), notify.clone()),
        notify,
    )
}

#[tokio::test]
async fn health_version_shutdown() {
    let fx = Fixture::new();
    let (svc, notify) = service(&fx);
    let health = svc
        .health(Request::new(pb::HealthRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), pb::ServingStatus::Serving);
    let v = svc
        .version(Request::new(pb::VersionRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.kernel_release, "6.1.0-test");
    assert_eq!(
        (v.boot_to_agent_start_ms, v.boot_to_ready_ms),
        (Some(1234), None)
    );
    svc.boot.boot_to_ready_ms.store(2000, Ordering::Relaxed);
    let v = svc
        .version(Request::new(pb::VersionRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.boot_to_ready_ms, Some(2000));

    svc.shutdown(Request::new(pb::ShutdownRequest {}))
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(1), notify.notified())
        .await
        .unwrap();
    let health = svc
        .health(Request::new(pb::HealthRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), pb::ServingStatus::NotServing);
}

#[tokio::test]
async fn read_file_status_codes() {
    let fx = Fixture::new();
    let (svc, _) = service(&fx);
    let file = fx.dir.path().join("f");
    std::fs::write(&file, b"hello world").unwrap();
    let read = |path: String, offset, max_bytes| {
        svc.read_file(Request::new(pb::ReadFileRequest {
            path,
            offset,
            max_bytes,
        }))
    };
    let ok = read(file.display().to_string(), 6, 0)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ok.data.as_slice(), ok.eof), (&b"world"[..], true));
    let ok = read(file.display().to_string(), 0, 5)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ok.data.as_slice(), ok.eof), (&b"hello"[..], false));
    let code = |r: Result<Response<pb::ReadFileResponse>, Status>| r.unwrap_err().code();
    assert_eq!(
        code(read("relative".into(), 0, 1).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(read(format!("{}/../f", fx.dir.path().display()), 0, 1).await),
        Code::InvalidArgument
    );
    let err = read(
        file.display().to_string(),
        0,
        podvisor_proto::MAX_READ_BYTES + 1,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("max_bytes:"), "{}", err.message());
    assert_eq!(
        code(read(fx.dir.path().join("none").display().to_string(), 0, 1).await),
        Code::NotFound
    );
    assert_eq!(
        code(read(fx.dir.path().display().to_string(), 0, 1).await),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn storage_status_codes() {
    let fx = Fixture::new();
    fx.disk("vda", "slot0", 0, "254:0", true);
    let (svc, _) = service(&fx);
    let add = |id: &str, slot, fstype: &str, timeout_ms| {
        svc.add_storage(Request::new(pb::AddStorageRequest {
            id: id.into(),
            block_slot: slot,
            fstype: fstype.into(),
            read_only: true,
            mount_point: None,
            image_path: None,
            timeout_ms,
        }))
    };
    let err = add("bad/id", 0, "ext4", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("id:"), "{}", err.message());
    assert_eq!(
        add("a", 0, "ntfs", 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        add("a", 5, "ext4", 0).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        add("a", 0, "ext4", 30).await.unwrap_err().code(),
        Code::DeadlineExceeded
    );
    fx.set_size("vda", 16);
    *fx.ops.mount_error.lock().unwrap() = Some(nix::errno::Errno::ENODEV);
    assert_eq!(
        add("a", 0, "erofs", 30).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    *fx.ops.mount_error.lock().unwrap() = None;
    let ok = add("a", 0, "erofs", 30).await.unwrap().into_inner();
    assert_eq!(
        ok.device,
        fx.dir.path().join("dev/vda").display().to_string()
    );
    assert_eq!(
        ok.mount_point,
        fx.dir.path().join("storage/a").display().to_string()
    );
    assert_eq!(
        add("a", 0, "erofs", 30).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let remove =
        |id: &str| svc.remove_storage(Request::new(pb::RemoveStorageRequest { id: id.into() }));
    assert!(remove("a").await.unwrap().into_inner().removed);
    assert!(!remove("a").await.unwrap().into_inner().removed);
    assert_eq!(remove("").await.unwrap_err().code(), Code::InvalidArgument);
}

#[test]
fn error_messages_carry_no_nul_bytes_and_are_bounded() {
    // libcontainer's exec errors arrive padded with NUL bytes (it reads them 3 bytes at a time).
    let engine = crate::engine::EngineError::Failed(
        "installing the container's seccomp profile: failed to load seccomp context\0\0\n".into(),
    );
    let status = Status::from(ContainerError::Engine(engine));
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "installing the container's seccomp profile: failed to load seccomp context"
    );
    // The agent's own I/O and system call failures stay typed up to the boundary, then are Internal.
    let io = ContainerError::from(std::io::Error::other("disk on fire"));
    assert!(matches!(io, ContainerError::Io(_)), "{io:?}");
    let status = Status::from(io);
    assert_eq!(
        (status.code(), status.message()),
        (Code::Internal, "disk on fire")
    );
    let sys = ContainerError::from(nix::errno::Errno::EIO);
    assert!(matches!(sys, ContainerError::Sys(nix::errno::Errno::EIO)));
    assert_eq!(Status::from(sys).code(), Code::Internal);
    let status = Status::from(ContainerError::Internal("a\u{1b}[31mb\tc\nd\u{7f}".into()));
    assert_eq!(status.message(), "a[31mb\tc\nd");
    let long = ContainerError::InvalidArgument(format!("args: {}", "é".repeat(5000)));
    let msg = Status::from(long).message().to_string();
    assert!(
        msg.len() <= MAX_STATUS_MESSAGE && msg.ends_with('…'),
        "{}",
        msg.len()
    );
    assert!(msg.starts_with("args: éé"));
}
