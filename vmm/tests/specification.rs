//! Enforces SPECIFICATION.md: the guest-visible constants it lists are the ones the code uses.

use vmm::arch::layout;

fn spec_table(name: &str) -> Vec<Vec<String>> {
    let spec = include_str!("../SPECIFICATION.md");
    let start = spec
        .find(&format!("spec: {name}\n"))
        .unwrap_or_else(|| panic!("no table {name}"));
    spec[start..]
        .lines()
        .skip(3) // marker, header, separator
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn memory_map_matches_the_layout() {
    let expected = [
        ("GDT", layout::GDT_ADDR),
        ("zero page", layout::ZERO_PAGE_ADDR),
        ("PML4", layout::PML4_ADDR),
        ("kernel command line", layout::CMDLINE_ADDR),
        ("MP table", layout::EBDA_START),
        ("high RAM", layout::HIMEM_START),
        ("first virtio-mmio window", layout::MMIO_BASE),
        ("IOAPIC", u64::from(layout::IOAPIC_ADDR)),
        ("LAPIC", u64::from(layout::APIC_ADDR)),
    ];
    let table = spec_table("memory map");
    assert_eq!(table.len(), expected.len());
    for (row, (name, addr)) in table.iter().zip(expected) {
        assert_eq!(row[0], name);
        assert_eq!(hex(&row[1]), addr, "{name}");
    }
}

#[test]
fn device_irqs_match_the_layout() {
    let table = spec_table("devices");
    assert_eq!(table[0][2], layout::SERIAL_IRQ.to_string());
    assert_eq!(table[1][2], layout::VIRTIO_IRQ_BASE.to_string());
    assert_eq!(table[2][2], format!("{}+*i*", layout::VIRTIO_IRQ_BASE + 1));
    assert_eq!(table[3][2], format!("{}+*n*", layout::VIRTIO_IRQ_BASE + 1));
    assert_eq!(layout::mmio_addr(1) - layout::mmio_addr(0), 0x1000);
}
