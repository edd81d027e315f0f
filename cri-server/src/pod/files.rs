//! CRI mounts delivered into the pod VM by copy (the VM shares no file system with the host yet):
//! config maps, secrets, projected service account tokens, kubelet's /etc/hosts, emptyDirs. Each host
//! path is copied (directories recursively, with modes, owners and symlinks) to its guest directory
//! each time a container that mounts it is created, so a restarted container sees current content.
//! Files removed on the host stay in the guest copy, and writes in the guest do not reach the host.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use pb::AgentClient;
use podvisor_proto as pb;
use tonic::transport::Channel;

use super::{agent_err, Pod, PodError};
use crate::spec::HostMount;

/// Bytes one mount may copy into the guest (the copy lives in guest memory).
pub const MAX_MOUNT_BYTES: u64 = 64 << 20;
/// Bytes per CopyFile call.
const CHUNK: usize = 1 << 20;

struct Copier<'a> {
    agent: AgentClient<Channel>,
    field: &'a str,
    bytes: u64,
}

impl Copier<'_> {
    fn too_big(&self) -> PodError {
        PodError::MountTooBig {
            field: self.field.to_string(),
            limit: MAX_MOUNT_BYTES,
        }
    }

    fn host_err(&self, path: &Path, source: std::io::Error) -> PodError {
        PodError::MountSource {
            field: self.field.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }

    async fn send(&mut self, req: pb::CopyFileRequest) -> Result<(), PodError> {
        self.agent
            .copy_file(req)
            .await
            .map_err(agent_err("CopyFile"))?;
        Ok(())
    }

    /// Copies `host` (file, directory or symlink) to `guest`.
    async fn copy(&mut self, host: &Path, guest: &str) -> Result<(), PodError> {
        let meta = std::fs::symlink_metadata(host).map_err(|e| self.host_err(host, e))?;
        let base = pb::CopyFileRequest {
            path: guest.to_string(),
            mode: meta.permissions().mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            ..Default::default()
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(host).map_err(|e| self.host_err(host, e))?;
            self.send(pb::CopyFileRequest {
                kind: pb::FileKind::Symlink.into(),
                target: target.to_string_lossy().into_owned(),
                ..base
            })
            .await
        } else if ft.is_dir() {
            self.send(pb::CopyFileRequest {
                kind: pb::FileKind::Directory.into(),
                ..base
            })
            .await?;
            let mut entries: Vec<_> = std::fs::read_dir(host)
                .map_err(|e| self.host_err(host, e))?
                .filter_map(Result::ok)
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let name = entry.file_name();
                let child = format!("{guest}/{}", name.to_string_lossy());
                Box::pin(self.copy(&entry.path(), &child)).await?;
            }
            Ok(())
        } else if ft.is_file() {
            self.bytes += meta.len();
            if self.bytes > MAX_MOUNT_BYTES {
                return Err(self.too_big());
            }
            let data = std::fs::read(host).map_err(|e| self.host_err(host, e))?;
            let mut offset = 0usize;
            loop {
                let end = (offset + CHUNK).min(data.len());
                self.send(pb::CopyFileRequest {
                    kind: pb::FileKind::File.into(),
                    data: data[offset..end].to_vec(),
                    offset: offset as u64,
                    ..base.clone()
                })
                .await?;
                offset = end;
                if offset >= data.len() {
                    return Ok(());
                }
            }
        } else {
            // Sockets, FIFOs and devices have no meaning across the VM boundary.
            tracing::info!(path = %host.display(), "not copied into the pod VM: special file");
            Ok(())
        }
    }
}

/// Copies every mount's host content into the guest. A host path that does not exist (or a symlink
/// to nothing) is created as an empty directory in the guest (containerd creates missing host paths
/// as directories).
pub async fn copy_mounts(pod: &dyn Pod, mounts: &[HostMount]) -> Result<(), PodError> {
    let agent = pod.agent();
    for (i, m) in mounts.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        let mut copier = Copier {
            agent: agent.clone(),
            field: &field,
            bytes: 0,
        };
        // The mount source is followed when it is a symlink, as runc's bind mount does (kubelet's
        // hostPath volumes may be symlinks); symlinks below it are copied as symlinks.
        let source = match std::fs::canonicalize(&m.host_path) {
            Ok(resolved) => Some(resolved),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(copier.host_err(&m.host_path, e)),
        };
        if let Some(source) = source {
            copier.copy(&source, &m.guest_source).await?;
        } else {
            copier
                .send(pb::CopyFileRequest {
                    path: m.guest_source.clone(),
                    kind: pb::FileKind::Directory.into(),
                    mode: 0o755,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}
