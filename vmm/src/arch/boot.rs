//! Loading the guest kernel, initramfs and command line, and writing the zero page (`boot_params`)
//! with the e820 map for the Linux 64-bit boot protocol.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{load_cmdline, Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START, MMIO_HOLE_END, ZERO_PAGE_ADDR,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;

/// Errors loading boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel is not a loadable ELF vmlinux.
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// The loader error.
        source: linux_loader::loader::Error,
    },
    /// The initramfs does not fit in low guest memory next to the kernel.
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitramfsTooBig {
        /// Its size.
        size: u64,
        /// The highest usable address.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing to guest memory failed.
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Writing the zero page failed.
    #[error("cannot write boot_params: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
}

/// Where the boot images ended up in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct BootImages {
    /// 64-bit entry point of the kernel.
    pub entry: GuestAddress,
    /// Guest address and size of the initramfs, if any.
    pub initramfs: Option<(GuestAddress, u64)>,
}

/// Builds a [`Cmdline`] from a string.
pub fn make_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !text.trim().is_empty() {
        cmdline.insert_str(text.trim())?;
    }
    Ok(cmdline)
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Loads the kernel and initramfs, writes the command line and the zero page.
pub fn load_boot_images(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootImages, BootError> {
    let mut kernel_file = open(kernel)?;
    let loaded = Elf::load(mem, None, &mut kernel_file, Some(GuestAddress(HIMEM_START))).map_err(
        |source| BootError::Kernel {
            path: kernel.to_owned(),
            source,
        },
    )?;

    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().unchecked_add(r.len()).raw_value())
        .unwrap_or(0);
    let initramfs = match initramfs {
        None => None,
        Some(path) => {
            let mut file = open(path)?;
            let size = file
                .metadata()
                .map_err(|source| BootError::Open {
                    path: path.to_owned(),
                    source,
                })?
                .len();
            let kernel_end = loaded.kernel_end;
            let addr = low_end.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
            let addr = match addr {
                Some(addr) if addr >= kernel_end => addr,
                _ => {
                    return Err(BootError::InitramfsTooBig {
                        size,
                        limit: low_end,
                    })
                }
            };
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)?;
            Some((GuestAddress(addr), size))
        }
    };

    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(|source| BootError::Kernel {
        path: kernel.to_owned(),
        source,
    })?;
    let cmdline_len = cmdline.as_cstring()?.as_bytes().len();
    let params = zero_page(mem, cmdline_len, initramfs);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )?;
    Ok(BootImages {
        entry: loaded.kernel_load,
        initramfs,
    })
}

/// The zero page for the 64-bit boot protocol, with the e820 map derived from `mem`'s regions.
fn zero_page(
    mem: &GuestMemoryMmap,
    cmdline_len: usize,
    initramfs: Option<(GuestAddress, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let start = start.max(HIMEM_START);
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    debug_assert!(entries
        .iter()
        .all(|(a, s, _)| a + s <= MMIO_HOLE_END || *a >= MMIO_HOLE_END));
    for (i, (addr, size, type_)) in entries.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = entries.len() as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::create_guest_memory;

    #[test]
    fn zero_page_maps_ram_around_ebda_and_hole() {
        let mem = create_guest_memory(4096).unwrap();
        let p = zero_page(&mem, 10, Some((GuestAddress(0x100_0000), 4096)));
        assert_eq!(p.e820_entries, 4);
        assert_eq!({ p.e820_table[1].r#type }, E820_RESERVED);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
        assert_eq!({ p.e820_table[3].addr }, MMIO_HOLE_END);
        let total: u64 = (0..4)
            .filter(|i| p.e820_table[*i].r#type == E820_RAM)
            .map(|i| p.e820_table[i].size)
            .sum();
        assert_eq!(total, (4096u64 << 20) - (HIMEM_START - EBDA_START));
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
    }

    #[test]
    fn a_non_elf_kernel_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, vec![0u8; 8192]).unwrap();
        let mem = create_guest_memory(64).unwrap();
        let err = load_boot_images(&mem, &kernel, None, &make_cmdline("x").unwrap()).unwrap_err();
        assert!(matches!(err, BootError::Kernel { .. }), "{err}");
    }
}
