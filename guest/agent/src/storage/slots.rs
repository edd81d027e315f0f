//! Block slots in a pod VM: the virtio-blk disk whose serial names a slot, and the wait for the image the
//! VMM swaps in (the guest sees the new capacity after a config-change interrupt).

use std::path::Path;
use std::time::Duration;

use super::StorageError;

/// Finds the disk (e.g. `vdb`) under `sys_block` whose `serial` is `slot<slot>`; the first by name wins.
pub fn find_slot_device(sys_block: &Path, slot: u32) -> Result<String, StorageError> {
    let wanted = podvisor_proto::block_slot_serial(slot);
    let entries = std::fs::read_dir(sys_block).map_err(|source| StorageError::Io {
        what: format!("listing {}", sys_block.display()),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("vd"))
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|name| {
            std::fs::read(sys_block.join(name).join("serial"))
                .map(|s| trim_serial(&s) == wanted.as_bytes())
                .unwrap_or(false)
        })
        .ok_or(StorageError::SlotNotFound(slot))
}

/// Strips the newline (and any NUL padding) the kernel leaves after a virtio-blk serial.
fn trim_serial(serial: &[u8]) -> &[u8] {
    let end = serial
        .iter()
        .rposition(|b| !b.is_ascii_whitespace() && *b != 0)
        .map_or(0, |i| i + 1);
    &serial[..end]
}

/// Reads `<sys_block>/<device>/size` (in 512-byte sectors).
fn read_size(sys_block: &Path, device: &str) -> Result<u64, StorageError> {
    let path = sys_block.join(device).join("size");
    let text = std::fs::read_to_string(&path).map_err(|source| StorageError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    text.trim().parse().map_err(|_| StorageError::Io {
        what: format!("parsing {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_string()),
    })
}

/// Polls the size of `device` every `poll` until it is non-zero; returns it in sectors.
pub async fn wait_for_image(
    sys_block: &Path,
    device: &str,
    slot: u32,
    timeout: Duration,
    poll: Duration,
) -> Result<u64, StorageError> {
    let start = tokio::time::Instant::now();
    loop {
        let size = read_size(sys_block, device)?;
        if size > 0 {
            return Ok(size);
        }
        if start.elapsed() >= timeout {
            return Err(StorageError::Timeout {
                slot,
                device: device.to_string(),
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(poll.min(timeout.saturating_sub(start.elapsed()))).await;
    }
}
