//! A tap interface opened through `/dev/net/tun`, exchanging frames prefixed with a virtio-net header.
//!
//! The interface is created with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL` and is not
//! persistent: the kernel deletes it when its last file descriptor closes, so a VMM that crashes leaves
//! no interface behind. `IFF_TUN_EXCL` makes opening fail instead of attaching to an existing (possibly
//! persistent) interface of the same name.
//!
//! The tap is created in the network namespace of the calling thread: the VMM never changes namespaces.
//! An embedder that wants the tap in a pod's namespace opens it on a thread that has entered that
//! namespace (podvisor's cri-server does this with its one netns helper); the descriptor then works
//! from any thread.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::raw::{c_int, c_short, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Size of the virtio-net header in front of every frame (`virtio_net_hdr_v1`, virtio 1.0).
pub const VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();

const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is unusable.
    #[error("invalid tap `name` {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_PATH}: {0}")]
    Open(io::Error),
    /// A tun ioctl failed.
    #[error("{what} on tap {name:?} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The interface.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// An open, non-blocking tap interface. Reads and writes carry one frame each, prefixed by a
/// [`VNET_HDR_LEN`]-byte virtio-net header.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` (1-15 bytes, no `/`, `:`, `%`, whitespace or NUL) in the calling thread's
    /// network namespace. The returned descriptor works from any thread.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(TapError::Open)?;
        // SAFETY: `ifreq` is plain C data for which all-zero bytes are a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
        ifr.ifr_ifru.ifru_flags = flags as c_short;
        let ioctl_err = |what| TapError::Ioctl {
            what,
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call; `file` is a tun fd.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as c_ulong, &mut ifr) } < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }
        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which outlives the call.
        if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ as c_ulong, &hdr_len) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        let tap = Tap {
            file,
            name: name.to_owned(),
        };
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            what: "TUNSETOFFLOAD",
            name: tap.name.clone(),
            source,
        })?;
        Ok(tap)
    }

    /// A `Tap` over `/dev/null`, for tests that need a value but no traffic.
    #[cfg(test)]
    pub(crate) fn stand_in(name: &str) -> Tap {
        Tap {
            file: OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap(),
            name: name.to_owned(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads (`TUN_F_*`) the reader accepts in frames read from the tap.
    pub fn set_offload(&self, flags: c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret =
            unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as c_ulong, flags.into()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.file.as_raw_fd())
            .finish()
    }
}

/// Linux interface name rules (`dev_valid_name`); `%` (name templates) is refused too.
fn validate_name(name: &str) -> Result<(), TapError> {
    let reason = if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        Some("must be 1 to 15 bytes long")
    } else if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '%' || c == '\0' || c.is_whitespace())
    {
        Some("must not contain `/`, `:`, `%`, whitespace or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TapError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}
