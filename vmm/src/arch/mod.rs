//! x86_64 machine layout and boot: guest memory map, kernel/initramfs loading, boot parameters, MP table
//! and the registers a vCPU starts with.

pub mod boot;
pub mod layout;
pub mod mptable;
pub mod regs;

pub use boot::{load_boot_images, BootError, BootImages};
pub use layout::{create_guest_memory, LayoutError};
