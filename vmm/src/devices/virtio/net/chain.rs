//! Validation of guest descriptor chains: tx chains are gathered into a frame, rx chains become
//! [`RxBuffer`]s the device fills later.

use std::io::Read;

use virtio_queue::{DescriptorChain, Reader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::tap::VNET_HDR_LEN;

/// Largest frame accepted or delivered, virtio-net header included: a 64 KiB GSO packet, its Ethernet
/// header and the virtio-net header.
pub const MAX_FRAME_LEN: usize = 65562;
/// Length of an Ethernet header: the shortest frame worth sending.
pub const ETH_HLEN: usize = 14;

/// Why a descriptor chain is unusable; it is returned to the guest with length 0.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A tx chain has a device-writable descriptor.
    #[error("write-only descriptor in a tx chain")]
    WriteOnlyTx,
    /// An rx chain has a device-readable descriptor.
    #[error("read-only descriptor in an rx chain")]
    ReadOnlyRx,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain is too short for a virtio-net header (rx) or header plus Ethernet header (tx).
    #[error("chain of {0} bytes is too short")]
    TooShort(usize),
    /// The tx chain is longer than [`MAX_FRAME_LEN`].
    #[error("chain of more than {MAX_FRAME_LEN} bytes")]
    TooLong,
    /// The chain's buffers could not be mapped from guest memory.
    #[error("cannot read the chain: {0}")]
    Map(#[source] virtio_queue::Error),
    /// Guest memory could not be read.
    #[error("cannot read the chain: {0}")]
    Read(#[source] std::io::Error),
    /// Guest memory could not be written.
    #[error("cannot write the chain: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Gathers a tx chain (virtio-net header and frame) into `buf`; returns its length.
pub fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for desc in chain.clone() {
        if desc.is_write_only() {
            return Err(ChainError::WriteOnlyTx);
        }
        len += desc.len() as usize;
        if len > MAX_FRAME_LEN || len > buf.len() {
            return Err(ChainError::TooLong);
        }
    }
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(len));
    }
    let mut reader = Reader::new(mem, chain).map_err(ChainError::Map)?;
    reader
        .read_exact(&mut buf[..len])
        .map_err(ChainError::Read)?;
    Ok(len)
}

/// A guest rx buffer taken off the queue: its head index and validated writable regions.
#[derive(Debug)]
pub struct RxBuffer {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    regions: Vec<(GuestAddress, usize)>,
    /// Total writable bytes.
    pub capacity: usize,
}

impl RxBuffer {
    /// Validates an rx chain: only device-writable descriptors, all inside guest memory, room for at
    /// least a virtio-net header.
    pub fn parse(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<RxBuffer, ChainError> {
        let head = chain.head_index();
        let mut regions = Vec::new();
        let mut capacity = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                return Err(ChainError::ReadOnlyRx);
            }
            let len = desc.len() as usize;
            if !mem.check_range(desc.addr(), len) {
                return Err(ChainError::OutOfRange {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            // The descriptor iterator stops before a chain exceeds 4 GiB: no overflow.
            capacity += len;
            regions.push((desc.addr(), len));
        }
        if capacity < VNET_HDR_LEN {
            return Err(ChainError::TooShort(capacity));
        }
        Ok(RxBuffer {
            head,
            regions,
            capacity,
        })
    }

    /// Writes `data` (at most [`Self::capacity`] bytes) to the buffer's regions in order.
    pub fn write(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), ChainError> {
        let mut rest = data;
        for (addr, len) in &self.regions {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(*len);
            mem.write_slice(&rest[..n], *addr)
                .map_err(ChainError::Write)?;
            rest = &rest[n..];
        }
        Ok(())
    }
}
