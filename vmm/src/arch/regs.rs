//! Initial vCPU state for the Linux 64-bit boot protocol: flat GDT, identity-mapped page tables for the
//! first GiB, long mode enabled, RSI pointing at the zero page; plus CPUID, FPU and LAPIC LINT setup.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or page tables to guest memory failed.
    #[error("cannot write boot tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// A GDT entry from flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn segment(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Writes the GDT and the identity page tables (first GiB, 2 MiB pages) into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(PDPTE_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PDE_ADDR | 0x03, GuestAddress(PDPTE_ADDR))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_ADDR + i * 8))?;
    }
    Ok(())
}

/// Puts the boot vCPU in 64-bit long mode at `entry` with RSI = zero page.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// CPUID leaf with KVM's paravirt feature bits.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_UNHALT (7), KVM_FEATURE_PV_SEND_IPI (11), KVM_FEATURE_PV_SCHED_YIELD (13).
const PV_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// Common setup of every vCPU: CPUID with its APIC id (and, with `hide_pv_hypercalls`, without KVM's
/// hypercall-based paravirt features), default FPU state, LAPIC LINT0/1 wiring.
pub fn setup_vcpu_common(
    vcpu: &VcpuFd,
    id: u8,
    num_cpus: u8,
    base: &CpuId,
    hide_pv_hypercalls: bool,
) -> Result<(), RegsError> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(num_cpus) << 16);
                // Hypervisor present.
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            // KVM paravirt features that make the guest issue VMCALL (PV_UNHALT, PV_SEND_IPI,
            // PV_SCHED_YIELD). Under PVM the emulator loops on VMCALL: a second vCPU hangs boot.
            KVM_CPUID_FEATURES if hide_pv_hypercalls => e.eax &= !PV_HYPERCALL_FEATURES,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::create_guest_memory;

    #[test]
    fn gdt_segments_decode_as_long_mode_code() {
        let code = segment(GDT[1], 1);
        assert_eq!(
            (code.l, code.db, code.dpl, code.present, code.s),
            (1, 0, 0, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.selector, 8);
        assert_eq!(code.limit, 0xfffff);
        let data = segment(GDT[2], 2);
        assert_eq!((data.db, data.type_), (1, 3));
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = create_guest_memory(64).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PDE_ADDR + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_ADDR);
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x11;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x11);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
