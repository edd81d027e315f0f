//! The `podvisor.agent.v1.Agent` gRPC service. Request errors are the `files` and `storage` module errors,
//! mapped to gRPC status codes here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use podvisor_proto as pb;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::files::{self, FileError};
use crate::storage::{StorageError, StorageManager, StorageSpec};

impl From<FileError> for Status {
    fn from(e: FileError) -> Self {
        let msg = e.to_string();
        match e {
            FileError::InvalidArgument { .. } => Status::invalid_argument(msg),
            FileError::NotFound(_) => Status::not_found(msg),
            FileError::PermissionDenied(_) => Status::permission_denied(msg),
            FileError::NotRegular(_) => Status::failed_precondition(msg),
            FileError::Io { .. } => Status::internal(msg),
        }
    }
}

impl From<StorageError> for Status {
    fn from(e: StorageError) -> Self {
        let msg = e.to_string();
        match e {
            StorageError::InvalidArgument { .. } => Status::invalid_argument(msg),
            StorageError::AlreadyExists(_) => Status::already_exists(msg),
            StorageError::SlotNotFound(_) => Status::not_found(msg),
            StorageError::Timeout { .. } => Status::deadline_exceeded(msg),
            StorageError::FailedPrecondition(_) => Status::failed_precondition(msg),
            // The kernel lacks the filesystem, or the image is not one of that type.
            StorageError::Mount {
                errno: nix::errno::Errno::ENODEV,
                ..
            }
            | StorageError::Mount {
                errno: nix::errno::Errno::EINVAL,
                ..
            } => Status::failed_precondition(msg),
            StorageError::Mount { .. } | StorageError::Unmount { .. } | StorageError::Io { .. } => {
                Status::internal(msg)
            }
        }
    }
}

/// Facts about this boot, collected by `main`.
#[derive(Debug)]
pub struct BootInfo {
    /// When the agent process started.
    pub started: Instant,
    /// `uname -r`.
    pub kernel_release: String,
    /// Kernel uptime at agent start, in ms.
    pub boot_to_agent_start_ms: Option<u64>,
    /// Kernel uptime when the listener was ready, in ms (0 until then).
    pub boot_to_ready_ms: AtomicU64,
}

/// The agent service. Cloned per connection by tonic; all state is shared.
#[derive(Clone)]
pub struct AgentService {
    boot: Arc<BootInfo>,
    storage: Arc<StorageManager>,
    shutdown: Arc<Notify>,
    stopping: Arc<AtomicBool>,
}

impl AgentService {
    /// A service over `storage`; a `Shutdown` call notifies `shutdown` (once the reply is on its way).
    pub fn new(boot: Arc<BootInfo>, storage: Arc<StorageManager>, shutdown: Arc<Notify>) -> Self {
        Self {
            boot,
            storage,
            shutdown,
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[tonic::async_trait]
impl pb::Agent for AgentService {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let status = if self.stopping.load(Ordering::Relaxed) {
            pb::ServingStatus::NotServing
        } else {
            pb::ServingStatus::Serving
        };
        Ok(Response::new(pb::HealthResponse {
            status: status.into(),
        }))
    }

    async fn version(
        &self,
        _: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let ready = self.boot.boot_to_ready_ms.load(Ordering::Relaxed);
        Ok(Response::new(pb::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: self.boot.kernel_release.clone(),
            agent_uptime_ms: self.boot.started.elapsed().as_millis() as u64,
            boot_to_agent_start_ms: self.boot.boot_to_agent_start_ms,
            boot_to_ready_ms: (ready > 0).then_some(ready),
        }))
    }

    async fn add_storage(
        &self,
        req: Request<pb::AddStorageRequest>,
    ) -> Result<Response<pb::AddStorageResponse>, Status> {
        let spec = StorageSpec::from_request(req.get_ref(), self.storage.default_root())?;
        let (mount_point, device) = self.storage.add(&spec).await?;
        crate::log(&format!(
            "storage {} mounted: {} on {} ({}{})",
            spec.id,
            device.display(),
            mount_point.display(),
            spec.fstype,
            if spec.read_only { ", ro" } else { "" }
        ));
        Ok(Response::new(pb::AddStorageResponse {
            mount_point: mount_point.display().to_string(),
            device: device.display().to_string(),
        }))
    }

    async fn remove_storage(
        &self,
        req: Request<pb::RemoveStorageRequest>,
    ) -> Result<Response<pb::RemoveStorageResponse>, Status> {
        let id = &req.get_ref().id;
        let removed = self.storage.remove(id)?;
        if removed {
            crate::log(&format!("storage {id} removed"));
        }
        Ok(Response::new(pb::RemoveStorageResponse { removed }))
    }

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let req = req.into_inner();
        let path = files::validate_path("path", &req.path)?;
        let limit = files::read_limit(req.max_bytes)?;
        let (data, eof) = files::read_chunk(&path, req.offset, limit)?;
        Ok(Response::new(pb::ReadFileResponse { data, eof }))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        crate::log("shutdown requested");
        self.stopping.store(true, Ordering::Relaxed);
        // `main` waits a moment for this reply to be flushed, then syncs, unmounts and reboots.
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
}
