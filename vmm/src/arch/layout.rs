//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack (grows down)   0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity 1 GiB)
//! 0x0002_0000  kernel command line       0x0009_fc00  MP table (EBDA, reserved)
//! 0x0010_0000  RAM (kernel at its ELF physical address, initramfs at the top of low RAM)
//! 0xd000_0000  virtio-mmio windows, 4 KiB each   0xfec0_0000 IOAPIC   0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above the 32-bit hole, when the guest has more than 3.25 GiB
//! ```

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// Zero page (`boot_params`) location; its address is passed in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB identity mappings).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line location.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest kernel command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA; the MP table lives here and the range up to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of RAM above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Start of the 32-bit hole (MMIO, IOAPIC, LAPIC); RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = MMIO_BASE;
/// End of the 32-bit hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// TSS area KVM needs on Intel hosts (3 pages just below the IOAPIC hole end).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// IRQ of the 8250 serial port.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the first virtio-mmio device; device `i` uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IOAPIC pin.
pub const IRQ_MAX: u32 = 23;

/// Errors building the guest memory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// mmap of guest RAM failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Mmap {
        /// Requested size.
        mib: u32,
        /// Underlying error.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM regions of a guest with `mem_mib` MiB: below the 32-bit hole, then above 4 GiB.
pub fn ram_regions(mem_mib: u32) -> Vec<(GuestAddress, usize)> {
    let size = u64::from(mem_mib) << 20;
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Maps anonymous guest memory for `mem_mib` MiB.
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, LayoutError> {
    GuestMemoryMmap::from_ranges(&ram_regions(mem_mib)).map_err(|source| LayoutError::Mmap {
        mib: mem_mib,
        source,
    })
}

/// Guest-physical address of virtio-mmio window `index`.
pub fn mmio_addr(index: usize) -> u64 {
    MMIO_BASE + index as u64 * MMIO_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_splits_around_the_hole() {
        assert_eq!(ram_regions(128), vec![(GuestAddress(0), 128 << 20)]);
        let big = ram_regions(4096);
        assert_eq!(big[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(big[1].0, GuestAddress(1 << 32));
        assert_eq!(big[0].1 + big[1].1, 4096 << 20);
        // Devices must fit below the IOAPIC.
        assert!(mmio_addr(31) + MMIO_WINDOW <= u64::from(IOAPIC_ADDR));
    }
}
