//! Block storages: find the virtio-blk disk of a slot, wait for its image, mount and unmount it.
//!
//! The VMM creates every block slot at boot, empty (size 0) and with the virtio serial `slot<N>`. To attach an
//! image it swaps the slot's backing file and raises a config-change interrupt; the guest kernel then updates
//! `/sys/block/<dev>/size`. `AddStorage` waits for that before mounting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use podvisor_proto::{
    AddStorageRequest, DEFAULT_STORAGE_ROOT, DEFAULT_STORAGE_TIMEOUT_MS, MAX_STORAGE_TIMEOUT_MS,
};

use crate::files::{validate_path, FileError};
use crate::sandbox::Place;

pub mod loopdev;
mod slots;
pub use slots::{find_slot_device, wait_for_image};

/// How often the slot's size is polled while waiting for its image.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of storage operations.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A request field is invalid.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A storage with this id exists already.
    #[error("storage {0:?} already exists")]
    AlreadyExists(String),
    /// No virtio-blk disk has the serial `slot<N>`.
    #[error("no virtio-blk disk with serial slot{0}")]
    SlotNotFound(u32),
    /// The slot stayed empty for the whole wait.
    #[error("slot{slot} ({device}) still has no image after {waited:?}")]
    Timeout {
        /// The slot number.
        slot: u32,
        /// The disk name, e.g. `vdb`.
        device: String,
        /// How long the agent waited.
        waited: Duration,
    },
    /// The state of the guest does not allow the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// mount(2) failed.
    #[error("mounting {device} ({fstype}) on {target}: {errno}")]
    Mount {
        /// The block device.
        device: String,
        /// The filesystem type.
        fstype: String,
        /// The mount point.
        target: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// umount(2) failed.
    #[error("unmounting {target}: {errno}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// Reading sysfs or preparing the mount point failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<FileError> for StorageError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::InvalidArgument { field, reason } => Self::InvalidArgument { field, reason },
            other => Self::FailedPrecondition(other.to_string()),
        }
    }
}

/// The privileged operations behind storages, so the logic can be tested without root.
pub trait SystemOps: Send + Sync + 'static {
    /// Creates the block device node `path` for `major:minor`.
    fn mknod_block(&self, path: &Path, major: u32, minor: u32) -> Result<(), Errno>;
    /// Mounts `device` on `target`.
    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fstype: &str,
        read_only: bool,
    ) -> Result<(), Errno>;
    /// Unmounts `target`, lazily (MNT_DETACH) if `detach`.
    fn unmount(&self, target: &Path, detach: bool) -> Result<(), Errno>;
}

/// The real system calls.
pub struct RealOps;

impl SystemOps for RealOps {
    fn mknod_block(&self, path: &Path, major: u32, minor: u32) -> Result<(), Errno> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        mknod(
            path,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(major.into(), minor.into()),
        )
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fstype: &str,
        read_only: bool,
    ) -> Result<(), Errno> {
        use nix::mount::MsFlags;
        let flags = if read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        nix::mount::mount(Some(device), target, Some(fstype), flags, None::<&str>)
    }

    fn unmount(&self, target: &Path, detach: bool) -> Result<(), Errno> {
        use nix::mount::MntFlags;
        let flags = if detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        nix::mount::umount2(target, flags)
    }
}

/// A validated `AddStorageRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSpec {
    /// Storage id.
    pub id: String,
    /// Slot number (serial `slot<N>`).
    pub slot: u32,
    /// `ext4` or `erofs`.
    pub fstype: &'static str,
    /// Mount read-only.
    pub read_only: bool,
    /// Normalized absolute mount point.
    pub mount_point: PathBuf,
    /// How long to wait for the image.
    pub timeout: Duration,
    /// A native pod's image file on the node (mounted through a loop device instead of a slot).
    pub image_path: Option<PathBuf>,
}

/// Checks a storage id: 1-64 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), StorageError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument {
            field: "id",
            reason: format!("{id:?} must be 1-64 characters of [A-Za-z0-9._-], not . or .."),
        })
    }
}

impl StorageSpec {
    /// Validates every field of `req`; mount points default to `<default_root>/<id>`.
    pub fn from_request(
        req: &AddStorageRequest,
        default_root: &Path,
    ) -> Result<Self, StorageError> {
        validate_id(&req.id)?;
        let fstype = match req.fstype.as_str() {
            "ext4" => "ext4",
            "erofs" => "erofs",
            other => {
                return Err(StorageError::InvalidArgument {
                    field: "fstype",
                    reason: format!("{other:?} is not one of \"ext4\", \"erofs\""),
                })
            }
        };
        if fstype == "erofs" && !req.read_only {
            return Err(StorageError::InvalidArgument {
                field: "read_only",
                reason: "erofs images can only be mounted read-only".into(),
            });
        }
        let mount_point = match &req.mount_point {
            Some(mp) => validate_path("mount_point", mp)?,
            None => default_root.join(&req.id),
        };
        if mount_point.parent().is_none() {
            return Err(StorageError::InvalidArgument {
                field: "mount_point",
                reason: "must not be /".into(),
            });
        }
        let timeout_ms = match req.timeout_ms {
            0 => DEFAULT_STORAGE_TIMEOUT_MS,
            n if n <= MAX_STORAGE_TIMEOUT_MS => n,
            n => {
                return Err(StorageError::InvalidArgument {
                    field: "timeout_ms",
                    reason: format!("{n} is above the limit of {MAX_STORAGE_TIMEOUT_MS}"),
                })
            }
        };
        let image_path = match &req.image_path {
            Some(p) => Some(validate_path("image_path", p)?),
            None => None,
        };
        Ok(Self {
            image_path,
            id: req.id.clone(),
            slot: req.block_slot,
            fstype,
            read_only: req.read_only,
            mount_point,
            timeout: Duration::from_millis(timeout_ms.into()),
        })
    }
}

/// State of one storage id.
#[derive(Debug, Clone)]
enum Slot {
    /// AddStorage is waiting for or mounting it.
    Adding { mount_point: PathBuf },
    /// Mounted.
    Mounted {
        mount_point: PathBuf,
        device: PathBuf,
    },
}

impl Slot {
    fn mount_point(&self) -> &Path {
        match self {
            Slot::Adding { mount_point } | Slot::Mounted { mount_point, .. } => mount_point,
        }
    }
}

/// Tracks and performs storage mounts.
pub struct StorageManager {
    sys_block: PathBuf,
    dev_dir: PathBuf,
    default_root: PathBuf,
    poll: Duration,
    ops: Box<dyn SystemOps>,
    slots: Mutex<HashMap<String, Slot>>,
    place: Place,
}

impl StorageManager {
    /// The manager of a real guest: `/sys/block`, `/dev`, [`DEFAULT_STORAGE_ROOT`].
    pub fn system() -> Self {
        Self::new(
            "/sys/block".into(),
            "/dev".into(),
            DEFAULT_STORAGE_ROOT.into(),
            POLL_INTERVAL,
            Box::new(RealOps),
        )
    }

    /// A manager over arbitrary directories and operations (for tests).
    pub fn new(
        sys_block: PathBuf,
        dev_dir: PathBuf,
        default_root: PathBuf,
        poll: Duration,
        ops: Box<dyn SystemOps>,
    ) -> Self {
        Self {
            sys_block,
            dev_dir,
            default_root,
            poll,
            ops,
            slots: Mutex::new(HashMap::new()),
            place: Place::Guest,
        }
    }

    /// The manager of a native pod's agent on the node: image files through loop devices, mounted under
    /// `root`.
    pub fn node(root: PathBuf) -> Self {
        Self {
            place: Place::Node,
            ..Self::new(
                "/sys/block".into(),
                "/dev".into(),
                root,
                POLL_INTERVAL,
                Box::new(RealOps),
            )
        }
    }

    /// Where storages without a mount point go.
    pub fn default_root(&self) -> &Path {
        &self.default_root
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where storage `id` is mounted, once it is.
    pub fn mounted(&self, id: &str) -> Option<PathBuf> {
        match self.slots().get(id) {
            Some(Slot::Mounted { mount_point, .. }) => Some(mount_point.clone()),
            _ => None,
        }
    }

    /// Waits for the slot's image and mounts it; returns the mount point and the device.
    pub async fn add(&self, spec: &StorageSpec) -> Result<(PathBuf, PathBuf), StorageError> {
        match (self.place, &spec.image_path) {
            (Place::Guest, Some(_)) => {
                return Err(StorageError::InvalidArgument {
                    field: "image_path",
                    reason: "a pod VM mounts images from block slots".into(),
                })
            }
            (Place::Node, None) => {
                return Err(StorageError::InvalidArgument {
                    field: "image_path",
                    reason: "missing: a native pod has no block slots".into(),
                })
            }
            _ => {}
        }
        {
            let mut slots = self.slots();
            if slots.contains_key(&spec.id) {
                return Err(StorageError::AlreadyExists(spec.id.clone()));
            }
            if let Some((other, _)) = slots
                .iter()
                .find(|(_, s)| s.mount_point() == spec.mount_point)
            {
                return Err(StorageError::FailedPrecondition(format!(
                    "mount point {} is used by storage {other:?}",
                    spec.mount_point.display()
                )));
            }
            slots.insert(
                spec.id.clone(),
                Slot::Adding {
                    mount_point: spec.mount_point.clone(),
                },
            );
        }
        let result = self.attach(spec).await;
        let mut slots = self.slots();
        match &result {
            Ok((mount_point, device)) => {
                slots.insert(
                    spec.id.clone(),
                    Slot::Mounted {
                        mount_point: mount_point.clone(),
                        device: device.clone(),
                    },
                );
            }
            Err(_) => {
                slots.remove(&spec.id);
            }
        }
        result
    }

    async fn attach(&self, spec: &StorageSpec) -> Result<(PathBuf, PathBuf), StorageError> {
        // Held until the mount holds the device (it then clears itself when unmounted).
        let mut loop_device = None;
        let device = match &spec.image_path {
            Some(file) => {
                let device = loopdev::attach_read_only(file).map_err(|e| StorageError::Io {
                    what: format!("attaching {} to a loop device", file.display()),
                    source: e.into(),
                })?;
                let path = device.path.clone();
                loop_device = Some(device);
                path
            }
            None => {
                let name = find_slot_device(&self.sys_block, spec.slot)?;
                wait_for_image(&self.sys_block, &name, spec.slot, spec.timeout, self.poll).await?;
                self.ensure_device_node(&name)?
            }
        };
        if let Some((other, _)) = self
            .slots()
            .iter()
            .find(|(_, s)| matches!(s, Slot::Mounted { device: d, .. } if *d == device))
        {
            return Err(StorageError::FailedPrecondition(format!(
                "{} is already mounted as storage {other:?}",
                device.display()
            )));
        }
        let created = !spec.mount_point.exists();
        std::fs::create_dir_all(&spec.mount_point).map_err(|source| StorageError::Io {
            what: format!("creating {}", spec.mount_point.display()),
            source,
        })?;
        if let Err(errno) = self
            .ops
            .mount(&device, &spec.mount_point, spec.fstype, spec.read_only)
        {
            if created {
                let _ = std::fs::remove_dir(&spec.mount_point);
            }
            return Err(StorageError::Mount {
                device: device.display().to_string(),
                fstype: spec.fstype.to_string(),
                target: spec.mount_point.clone(),
                errno,
            });
        }
        drop(loop_device);
        Ok((spec.mount_point.clone(), device))
    }

    /// Returns `<dev_dir>/<name>`, creating the node from `<sys_block>/<name>/dev` if devtmpfs has not.
    fn ensure_device_node(&self, name: &str) -> Result<PathBuf, StorageError> {
        let node = self.dev_dir.join(name);
        if node.symlink_metadata().is_ok() {
            return Ok(node);
        }
        let dev_file = self.sys_block.join(name).join("dev");
        let text = std::fs::read_to_string(&dev_file).map_err(|source| StorageError::Io {
            what: format!("reading {}", dev_file.display()),
            source,
        })?;
        let (major, minor) = text
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| {
                StorageError::FailedPrecondition(format!(
                    "{}: bad device number {text:?}",
                    dev_file.display()
                ))
            })?;
        self.ops
            .mknod_block(&node, major, minor)
            .map_err(|errno| StorageError::Io {
                what: format!("creating {}", node.display()),
                source: errno.into(),
            })?;
        Ok(node)
    }

    /// Unmounts storage `id` and removes its mount point; `Ok(false)` if the id is unknown.
    pub fn remove(&self, id: &str) -> Result<bool, StorageError> {
        validate_id(id)?;
        let mount_point = match self.slots().get(id) {
            None => return Ok(false),
            Some(Slot::Adding { .. }) => {
                return Err(StorageError::FailedPrecondition(format!(
                    "storage {id:?} is still being added"
                )))
            }
            Some(Slot::Mounted { mount_point, .. }) => mount_point.clone(),
        };
        match self.ops.unmount(&mount_point, false) {
            // EINVAL: not a mount point (any more).
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(Errno::EBUSY) => {
                return Err(StorageError::FailedPrecondition(format!(
                    "{} is busy (still in use)",
                    mount_point.display()
                )))
            }
            Err(errno) => {
                return Err(StorageError::Unmount {
                    target: mount_point,
                    errno,
                })
            }
        }
        self.slots().remove(id);
        match std::fs::remove_dir(&mount_point) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(source) => Err(StorageError::Io {
                what: format!("removing {}", mount_point.display()),
                source,
            }),
        }
    }

    /// Unmounts every mounted storage (lazily if busy), for shutdown; returns the errors.
    pub fn unmount_all(&self) -> Vec<StorageError> {
        let mounted: Vec<PathBuf> = self
            .slots()
            .drain()
            .filter_map(|(_, s)| {
                matches!(s, Slot::Mounted { .. }).then(|| s.mount_point().to_path_buf())
            })
            .collect();
        let mut errors = Vec::new();
        for target in mounted {
            if let Err(errno) = self
                .ops
                .unmount(&target, false)
                .or_else(|_| self.ops.unmount(&target, true))
            {
                errors.push(StorageError::Unmount { target, errno });
            }
        }
        errors
    }
}

#[cfg(test)]
pub(crate) mod tests;
