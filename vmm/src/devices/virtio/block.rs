//! virtio-blk *slot*: a disk whose backing file can be swapped while the guest runs.
//!
//! A VM boots with a pool of empty slots (capacity 0). [`BlockDevice::attach`] gives a slot a backing
//! file and [`BlockDevice::detach`] empties it; the caller then raises a config-change interrupt and
//! the guest driver re-reads the capacity (Firecracker's "drive update", as Kata uses it). Whether a
//! slot is read-only is fixed at boot. Requests: IN, OUT, FLUSH, GET_ID; anything else is UNSUPP.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use std::sync::Arc;

use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};

/// Size of a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size of a block slot.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes moved between the backing file and guest memory per copy step.
const CHUNK: usize = 64 * 1024;

/// Errors of block slot operations.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The slot already has a backing file.
    #[error("block slot {0} is already attached")]
    Busy(usize),
    /// The slot is empty.
    #[error("block slot {0} is empty")]
    Empty(usize),
    /// A read-write attach was asked of a read-only slot, or the reverse.
    #[error("block slot {slot} is {slot_mode}; cannot attach {path} {asked}")]
    Mode {
        /// The slot.
        slot: usize,
        /// The slot's fixed mode.
        slot_mode: &'static str,
        /// The file.
        path: PathBuf,
        /// The requested mode.
        asked: &'static str,
    },
    /// The backing file cannot be opened (in the slot's mode).
    #[error("cannot use {} as block backing: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The backing file's size cannot be read.
    #[error("cannot use {} as block backing: cannot read its size: {source}", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The backing file is smaller than one sector.
    #[error("cannot use {} as block backing: size {size} is smaller than one sector", path.display())]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// A malformed or failing request; the guest gets IOERR (or nothing, when there is no status byte).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The descriptor chain is invalid (addresses outside guest memory, overflow, wrong direction).
    #[error("bad descriptor chain: {0}")]
    Chain(#[from] virtio_queue::Error),
    /// The request has no writable status byte.
    #[error("request has no status byte")]
    NoStatus,
    /// The request header is missing or short.
    #[error("request header unreadable: {0}")]
    Header(io::Error),
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RequestHeader {
    type_: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes, 8-aligned).
unsafe impl ByteValued for RequestHeader {}

struct Backing {
    file: File,
    path: PathBuf,
    size: u64,
}

/// One virtio-blk slot.
pub struct BlockDevice {
    slot: usize,
    read_only: bool,
    backing: Option<Backing>,
    acked_features: u64,
    interrupt: Arc<Interrupt>,
    active: Option<(GuestMemoryMmap, Queue)>,
    queue_sizes: [u16; 1],
    /// Requests that failed (malformed chains, I/O errors), for diagnostics.
    pub failed_requests: u64,
}

impl BlockDevice {
    /// An empty slot.
    pub fn new(slot: usize, read_only: bool, interrupt: Arc<Interrupt>) -> BlockDevice {
        BlockDevice {
            slot,
            read_only,
            backing: None,
            acked_features: 0,
            interrupt,
            active: None,
            queue_sizes: [QUEUE_SIZE],
            failed_requests: 0,
        }
    }

    /// The serial number the guest reads (`/sys/block/vdX/serial`): `slot<N>`.
    pub fn serial(&self) -> String {
        // At most MAX_BLOCK_SLOTS (16) slots: the index fits the protocol's u32.
        podvisor_proto::block_slot_serial(self.slot as u32)
    }

    /// Whether the slot is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The attached file, if any.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing.as_ref().map(|b| b.path.as_path())
    }

    /// Capacity in bytes the guest sees (0 when empty).
    pub fn capacity_bytes(&self) -> u64 {
        self.backing
            .as_ref()
            .map_or(0, |b| b.size / SECTOR_SIZE * SECTOR_SIZE)
    }

    /// Gives the slot a backing file. `read_only` must match the slot's mode. The caller then
    /// announces a config change so the guest sees the new capacity.
    pub fn attach(&mut self, path: &Path, read_only: bool) -> Result<u64, BlockError> {
        if self.backing.is_some() {
            return Err(BlockError::Busy(self.slot));
        }
        if read_only != self.read_only {
            let mode = |ro| if ro { "read-only" } else { "read-write" };
            return Err(BlockError::Mode {
                slot: self.slot,
                slot_mode: mode(self.read_only),
                path: path.to_owned(),
                asked: mode(read_only),
            });
        }
        let path_buf = || path.to_owned();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path_buf(),
                source,
            })?;
        // Works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path_buf(),
                source,
            })?;
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall {
                path: path_buf(),
                size,
            });
        }
        self.backing = Some(Backing {
            file,
            path: path.to_owned(),
            size,
        });
        Ok(self.capacity_bytes())
    }

    /// Empties the slot; the caller announces the config change.
    pub fn detach(&mut self) -> Result<PathBuf, BlockError> {
        self.backing
            .take()
            .map(|b| b.path)
            .ok_or(BlockError::Empty(self.slot))
    }

    fn config_bytes(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&(self.capacity_bytes() / SECTOR_SIZE).to_le_bytes());
        // seg_max: leave room for the header and status descriptors.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config
    }

    /// Executes one request; returns the number of bytes written to guest memory.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, RequestError> {
        let mut reader = Reader::new(mem, chain.clone())?;
        let mut writer = Writer::new(mem, chain)?;
        let data_len = writer
            .available_bytes()
            .checked_sub(1)
            .ok_or(RequestError::NoStatus)?;
        let mut status_writer = writer.split_at(data_len)?;
        let header: RequestHeader = reader.read_obj().map_err(RequestError::Header)?;
        let status = match self.serve(&header, &mut reader, &mut writer) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(status) => {
                self.failed_requests += 1;
                status
            }
        };
        status_writer
            .write_all(&[status as u8])
            .map_err(RequestError::Header)?;
        Ok((writer.bytes_written() + 1) as u32)
    }

    /// Serves a parsed request; `Err` is the virtio status to report.
    fn serve(
        &mut self,
        header: &RequestHeader,
        reader: &mut Reader,
        writer: &mut Writer,
    ) -> Result<(), u32> {
        match header.type_ {
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let serial = self.serial();
                id[..serial.len()].copy_from_slice(serial.as_bytes());
                let n = writer.available_bytes().min(id.len());
                writer.write_all(&id[..n]).map_err(|_| VIRTIO_BLK_S_IOERR)
            }
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let is_write = header.type_ == VIRTIO_BLK_T_OUT;
                if is_write && self.read_only {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let len = if is_write {
                    reader.available_bytes()
                } else {
                    writer.available_bytes()
                } as u64;
                let capacity = self.capacity_bytes();
                let backing = self.backing.as_mut().ok_or(VIRTIO_BLK_S_IOERR)?;
                let offset = header
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .filter(|off| off.checked_add(len).is_some_and(|end| end <= capacity))
                    .ok_or(VIRTIO_BLK_S_IOERR)?;
                let result = backing.file.seek(SeekFrom::Start(offset)).and_then(|_| {
                    if is_write {
                        copy(reader, &mut backing.file, len)
                    } else {
                        copy(&mut backing.file, writer, len)
                    }
                });
                result.map_err(|e| {
                    tracing::warn!("block slot {} I/O error at {offset}: {e}", self.slot);
                    VIRTIO_BLK_S_IOERR
                })
            }
            VIRTIO_BLK_T_FLUSH => match (&self.backing, self.read_only) {
                (Some(b), false) => b.file.sync_data().map_err(|_| VIRTIO_BLK_S_IOERR),
                (Some(_), true) => Ok(()),
                (None, _) => Err(VIRTIO_BLK_S_IOERR),
            },
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }
}

/// Copies exactly `len` bytes from `src` to `dst` through a bounded buffer.
fn copy(src: &mut impl Read, dst: &mut impl Write, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n])?;
        dst.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mode = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            1 << VIRTIO_BLK_F_FLUSH
        };
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_SEG_MAX) | mode
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let queue = activation
            .queues
            .into_iter()
            .next()
            .filter(|_| got == 1)
            .ok_or(ActivateError::QueueCount { expected: 1, got })?;
        self.active = Some((activation.mem, queue));
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, _index: usize) {
        let Some((mem, mut queue)) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let len = self.execute(&mem, chain).unwrap_or_else(|e| {
                self.failed_requests += 1;
                tracing::warn!("block slot {}: {e}", self.slot);
                0
            });
            if queue.add_used(&mem, head, len).is_err() {
                tracing::warn!("block slot {}: cannot write the used ring", self.slot);
                break;
            }
            used_any = true;
        }
        if used_any {
            self.interrupt.signal_used_queue();
        }
        self.active = Some((mem, queue));
    }
}

#[cfg(test)]
mod tests;
