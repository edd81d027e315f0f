//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its vCPUs, the IOAPIC
//! and the routing of ISA IRQs 0..=23 (identity-mapped to IOAPIC pins, edge/high as the ISA default).

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const BUS_ID_ISA: u8 = 0;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the APIC id space left below the IOAPIC id.
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory at the EBDA.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    entry: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    entry: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    entry: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

/// Both interrupt-source entry kinds (I/O and local) share this layout.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    entry: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: all are packed plain-old-data structs made of integers and byte arrays: any bit pattern is
// valid and they have no padding.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The IOAPIC's id: one past the last vCPU's APIC id.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Serializes the MP configuration table (without the floating pointer) for `num_cpus` vCPUs.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    for cpu in 0..num_cpus {
        let entry = MpcCpu {
            entry: ENTRY_CPU,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        body.extend_from_slice(entry.as_slice());
    }
    let bus = MpcBus {
        entry: ENTRY_BUS,
        busid: BUS_ID_ISA,
        bustype: *b"ISA   ",
    };
    body.extend_from_slice(bus.as_slice());
    let ioapic = MpcIoapic {
        entry: ENTRY_IOAPIC,
        apicid: ioapic_id(num_cpus),
        apicver: APIC_VERSION,
        flags: 1,
        apicaddr: IOAPIC_ADDR,
    };
    body.extend_from_slice(ioapic.as_slice());
    for irq in 0..=IRQ_MAX as u8 {
        let src = MpcIntsrc {
            entry: ENTRY_INTSRC,
            irqtype: MP_IRQ_SRC_INT,
            irqflag: 0,
            srcbus: BUS_ID_ISA,
            srcbusirq: irq,
            dstapic: ioapic_id(num_cpus),
            dstirq: irq,
        };
        body.extend_from_slice(src.as_slice());
    }
    // LINT0 of every CPU is ExtINT (PIC pass-through), LINT1 is NMI.
    for (irqtype, dstapic, lint) in [(MP_IRQ_SRC_EXTINT, 0, 0), (MP_IRQ_SRC_NMI, 0xff, 1)] {
        let src = MpcIntsrc {
            entry: ENTRY_LINTSRC,
            irqtype,
            irqflag: 0,
            srcbus: BUS_ID_ISA,
            srcbusirq: 0,
            dstapic,
            dstirq: lint,
        };
        body.extend_from_slice(src.as_slice());
    }
    let mut header = MpcTable {
        signature: *b"PCMP",
        length: (std::mem::size_of::<MpcTable>() + body.len()) as u16,
        spec: 4,
        checksum: 0,
        oem: *b"PODVISOR",
        productid: *b"MICROVM     ",
        lapic: APIC_ADDR,
        ..Default::default()
    };
    header.checksum = 0u8.wrapping_sub(checksum(header.as_slice()).wrapping_add(checksum(&body)));
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&body);
    table
}

/// Writes the MP floating pointer and configuration table at the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if u32::from(num_cpus) >= 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let mpf_size = std::mem::size_of::<MpfIntel>() as u64;
    let table_addr = EBDA_START + mpf_size;
    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: table_addr as u32,
        length: 1,
        specification: 4,
        ..Default::default()
    };
    mpf.checksum = 0u8.wrapping_sub(checksum(mpf.as_slice()));
    mem.write_obj(mpf, GuestAddress(EBDA_START))?;
    mem.write_slice(&config_table(num_cpus), GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::create_guest_memory;

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        let mem = create_guest_memory(64).unwrap();
        setup_mptable(&mem, 3).unwrap();
        let mpf: MpfIntel = mem.read_obj(GuestAddress(EBDA_START)).unwrap();
        assert_eq!(checksum(mpf.as_slice()), 0);
        assert_eq!(&mpf.signature, b"_MP_");
        let header: MpcTable = mem.read_obj(GuestAddress(u64::from(mpf.physptr))).unwrap();
        let mut table = vec![0u8; header.length as usize];
        mem.read_slice(&mut table, GuestAddress(u64::from(mpf.physptr)))
            .unwrap();
        assert_eq!(checksum(&table), 0);
        let cpus = table[std::mem::size_of::<MpcTable>()..]
            .chunks(20)
            .take_while(|e| e[0] == ENTRY_CPU)
            .count();
        assert_eq!(cpus, 3);
        assert!(setup_mptable(&mem, 255).is_err());
    }
}
