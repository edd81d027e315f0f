//! Read-only loop devices: how a native pod's agent on the node mounts image files (the node has no block
//! slots). A device is configured with `LO_FLAGS_AUTOCLEAR`, so it detaches itself once its mount is gone
//! and its descriptor closed: an unmount (or the kernel cleaning up a dead mount) leaves no loop device.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

/// `/dev/loop-control`: hands out free loop devices.
const LOOP_CONTROL: &str = "/dev/loop-control";
/// ioctl: the number of a free loop device (creating one if needed).
const LOOP_CTL_GET_FREE: u32 = 0x4C82;
/// ioctl: binds a backing file and sets the status in one call (Linux 5.8).
const LOOP_CONFIGURE: u32 = 0x4C0A;
/// ioctl: binds a backing file (before 5.8, with [`LOOP_SET_STATUS64`]).
const LOOP_SET_FD: u32 = 0x4C00;
/// ioctl: sets the flags of a bound device.
const LOOP_SET_STATUS64: u32 = 0x4C04;
/// ioctl: unbinds a device (when the status cannot be set after [`LOOP_SET_FD`]).
const LOOP_CLR_FD: u32 = 0x4C01;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Attempts when another process takes the free device first (EBUSY).
const ATTEMPTS: usize = 16;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

impl LoopInfo64 {
    /// The status of a read-only device that detaches itself when its last user goes.
    fn read_only_autoclear(file: &Path) -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: file_name(file),
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_write_int_bad!(loop_set_fd, LOOP_SET_FD);
nix::ioctl_write_ptr_bad!(loop_set_status64, LOOP_SET_STATUS64, LoopInfo64);
nix::ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);

/// A configured loop device: its node and the descriptor that keeps it until the mount holds it.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    _fd: OwnedFd,
}

/// Binds `file` to a free loop device, read-only and autoclearing.
pub fn attach_read_only(file: &Path) -> Result<LoopDevice, Errno> {
    let backing = open(file, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let control = open(
        LOOP_CONTROL,
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut last = Errno::EBUSY;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64::read_only_autoclear(file),
            reserved: [0; 8],
        };
        // SAFETY: `config` is a valid, initialized `struct loop_config` that outlives the call; the
        // kernel only reads it.
        let configured = match unsafe { loop_configure(device.as_raw_fd(), &config) } {
            // Kernels before 5.8: bind, then set the flags.
            Err(Errno::EINVAL | Errno::ENOTTY) => {
                set_fd_then_status(&device, &backing, &config.info)
            }
            other => other.map(drop),
        };
        match configured {
            Ok(()) => return Ok(LoopDevice { path, _fd: device }),
            // Taken by someone else between GET_FREE and binding: ask again.
            Err(Errno::EBUSY) => last = Errno::EBUSY,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Binds `backing` to `device` with LOOP_SET_FD (read-only: `backing` is open read-only) and sets
/// `info`'s flags (autoclear); unbinds again if the flags cannot be set.
fn set_fd_then_status(device: &OwnedFd, backing: &OwnedFd, info: &LoopInfo64) -> Result<(), Errno> {
    // SAFETY: LOOP_SET_FD takes the backing file's descriptor as its integer argument.
    unsafe { loop_set_fd(device.as_raw_fd(), backing.as_raw_fd()) }?;
    // SAFETY: `info` is a valid, initialized `struct loop_info64` that outlives the call.
    if let Err(e) = unsafe { loop_set_status64(device.as_raw_fd(), info) } {
        // SAFETY: LOOP_CLR_FD takes no argument.
        let _ = unsafe { loop_clr_fd(device.as_raw_fd()) };
        return Err(e);
    }
    Ok(())
}

/// The backing file's name as the kernel shows it (`losetup -l`), truncated to 63 bytes.
fn file_name(file: &Path) -> [u8; 64] {
    let mut name = [0u8; 64];
    let bytes = file.as_os_str().as_encoded_bytes();
    let n = bytes.len().min(63);
    name[..n].copy_from_slice(&bytes[..n]);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device is read-only, shows the file, and detaches itself when its last user goes.
    #[test]
    fn read_only_loop_devices_clear_themselves() {
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(LOOP_CONTROL) {
            eprintln!("SKIPPED: {LOOP_CONTROL}: {e} (needs root and loop devices)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image");
        std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
        let device = attach_read_only(&file).unwrap();
        let name = device
            .path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let sys = PathBuf::from(format!("/sys/block/{name}"));
        let read = |f: &str| std::fs::read_to_string(sys.join(f)).unwrap_or_default();
        assert_eq!(read("ro").trim(), "1");
        assert_eq!(read("loop/autoclear").trim(), "1");
        assert_eq!(read("loop/backing_file").trim(), file.to_str().unwrap());
        assert_eq!(read("size").trim(), "2048");
        drop(device);
        // Autoclear: the kernel detaches it once the last descriptor is closed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !read("loop/backing_file").is_empty() {
            assert!(std::time::Instant::now() < deadline, "{name} still bound");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The path for kernels before 5.8 gives the same device.
        let backing = open(&file, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let control = open(
            LOOP_CONTROL,
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        // SAFETY: as in `attach_read_only`.
        let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }.unwrap();
        let old = open(
            format!("/dev/loop{n}").as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let info = LoopInfo64::read_only_autoclear(&file);
        set_fd_then_status(&old, &backing, &info).unwrap();
        let sys = PathBuf::from(format!("/sys/block/loop{n}"));
        let read = |f: &str| std::fs::read_to_string(sys.join(f)).unwrap_or_default();
        assert_eq!(
            (read("ro").trim(), read("loop/autoclear").trim()),
            ("1", "1")
        );
        drop(old);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !read("loop/backing_file").is_empty() {
            assert!(std::time::Instant::now() < deadline, "loop{n} still bound");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A file that is not there is an error, not a device.
        assert_eq!(
            attach_read_only(&dir.path().join("missing")).err(),
            Some(Errno::ENOENT)
        );
    }
}
