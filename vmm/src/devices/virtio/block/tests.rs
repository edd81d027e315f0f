use std::io::Write as _;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const MEM_SIZE: usize = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    queue: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: BlockDevice,
    irq: Arc<Interrupt>,
    next_desc: u16,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap, read_only: bool) -> Harness<'a> {
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let mut dev = BlockDevice::new(0, read_only, irq.clone());
        let queue = MockSplitQueue::new(mem, 16);
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue.create_queue().unwrap()],
        })
        .unwrap();
        Harness {
            mem,
            queue,
            dev,
            irq,
            next_desc: 0,
        }
    }

    /// Submits a chain; returns (used len, status byte).
    fn submit(&mut self, descs: &[RawDescriptor]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.queue.add_desc_chains(descs, self.next_desc).unwrap();
        self.next_desc += descs.len() as u16;
        self.dev.process_queue(0);
        let used_idx = self.queue.used().idx().load();
        let elem = self
            .queue
            .used()
            .ring()
            .ref_at(usize::from(used_idx - 1))
            .unwrap()
            .load();
        (elem.len(), self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(&mut self, type_: u32, sector: u64, data_len: u32, data_flags: u16) -> (u32, u8) {
        let header = RequestHeader {
            type_,
            reserved: 0,
            sector,
        };
        self.mem.write_obj(header, GuestAddress(HDR)).unwrap();
        let n = self.next_desc;
        let mut descs = vec![desc(HDR, 16, NEXT, n + 1)];
        if data_len > 0 {
            descs.push(desc(DATA, data_len, data_flags | NEXT, n + 2));
        }
        let last = n + descs.len() as u16 + 1;
        descs.push(desc(STATUS, 1, WRITE, last));
        self.submit(&descs)
    }
}

fn backing(dir: &tempfile::TempDir, sectors: usize) -> PathBuf {
    let path = dir.path().join("disk.img");
    let mut f = File::create(&path).unwrap();
    for s in 0..sectors {
        f.write_all(&[s as u8; SECTOR_SIZE as usize]).unwrap();
    }
    path
}

#[test]
fn reads_sectors_of_the_attached_file() {
    let (mem, dir) = (mem(), tempfile::tempdir().unwrap());
    let mut h = Harness::new(&mem, true);
    assert_eq!(
        h.dev.attach(&backing(&dir, 4), true).unwrap(),
        4 * SECTOR_SIZE
    );
    let (len, status) = h.request(VIRTIO_BLK_T_IN, 2, 1024, WRITE);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1025);
    let mut buf = [0u8; 1024];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|b| *b == 2) && buf[512..].iter().all(|b| *b == 3));
    assert_ne!(h.irq.status() & super::super::INT_USED_RING, 0);
}

#[test]
fn reads_past_capacity_and_on_empty_slots_fail() {
    let (mem, dir) = (mem(), tempfile::tempdir().unwrap());
    let mut h = Harness::new(&mem, true);
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, 512, WRITE).1,
        VIRTIO_BLK_S_IOERR as u8
    );
    h.dev.attach(&backing(&dir, 4), true).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 3, 1024, WRITE).1,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, u64::MAX, 512, WRITE).1,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(h.dev.failed_requests, 3);
}

#[test]
fn writes_reach_the_file_only_on_read_write_slots() {
    let (mem, dir) = (mem(), tempfile::tempdir().unwrap());
    let path = backing(&dir, 4);
    mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();

    let mut ro = Harness::new(&mem, true);
    ro.dev.attach(&path, true).unwrap();
    assert_eq!(
        ro.request(VIRTIO_BLK_T_OUT, 1, 512, 0).1,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(std::fs::read(&path).unwrap()[512], 1);

    let mut rw = Harness::new(&mem, false);
    rw.dev.attach(&path, false).unwrap();
    assert_eq!(
        rw.request(VIRTIO_BLK_T_OUT, 1, 512, 0).1,
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        rw.request(VIRTIO_BLK_T_FLUSH, 0, 0, 0).1,
        VIRTIO_BLK_S_OK as u8
    );
    let content = std::fs::read(&path).unwrap();
    assert!(content[512..1024].iter().all(|b| *b == 0xab));
    assert_eq!(content[1024], 2);
}

#[test]
fn get_id_returns_the_slot_serial_and_unknown_types_are_unsupported() {
    let mem = mem();
    let mut h = Harness::new(&mem, true);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, 20, WRITE).1,
        VIRTIO_BLK_S_OK as u8
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"slot0\0");
    assert_eq!(h.request(99, 0, 0, 0).1, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn malformed_chains_are_consumed_without_touching_host_memory() {
    let mem = mem();
    let mut h = Harness::new(&mem, true);
    let n = h.next_desc;
    // Data descriptor far outside guest memory.
    let (len, _) = h.submit(&[
        desc(HDR, 16, NEXT, n + 1),
        desc(1 << 40, 512, WRITE | NEXT, n + 2),
        desc(STATUS, 1, WRITE, 0),
    ]);
    assert_eq!(len, 0);
    // Oversized length running past the end of guest memory.
    let n = h.next_desc;
    let (len, _) = h.submit(&[desc(HDR, 16, NEXT, n + 1), desc(DATA, u32::MAX, WRITE, 0)]);
    assert_eq!(len, 0);
    // A loop: two descriptors pointing at each other.
    let n = h.next_desc;
    let (len, _) = h.submit(&[desc(HDR, 16, NEXT, n + 1), desc(STATUS, 1, WRITE | NEXT, n)]);
    assert!(len <= 1);
    // No writable status byte at all.
    let n = h.next_desc;
    let (len, _) = h.submit(&[desc(HDR, 16, 0, n)]);
    assert_eq!(len, 0);
    // Header shorter than 16 bytes.
    let n = h.next_desc;
    let (len, _) = h.submit(&[desc(HDR, 8, NEXT, n + 1), desc(STATUS, 1, WRITE, 0)]);
    assert_eq!(len, 0);
    assert!(h.dev.failed_requests >= 4);
}

#[test]
fn attach_and_detach_rules() {
    let (mem, dir) = (mem(), tempfile::tempdir().unwrap());
    let path = backing(&dir, 1);
    let mut h = Harness::new(&mem, true);
    assert!(matches!(h.dev.detach(), Err(BlockError::Empty(0))));
    assert!(matches!(
        h.dev.attach(&path, false),
        Err(BlockError::Mode { .. })
    ));
    let missing = dir.path().join("missing");
    assert!(matches!(
        h.dev.attach(&missing, true),
        Err(BlockError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
    ));
    let tiny = dir.path().join("tiny");
    std::fs::write(&tiny, b"abc").unwrap();
    assert!(matches!(
        h.dev.attach(&tiny, true),
        Err(BlockError::TooSmall { size: 3, .. })
    ));
    h.dev.attach(&path, true).unwrap();
    assert!(matches!(
        h.dev.attach(&path, true),
        Err(BlockError::Busy(0))
    ));
    let mut cap = [0u8; 8];
    h.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 1);
    assert_eq!(h.dev.detach().unwrap(), path);
    h.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 0);
}

#[test]
fn features_follow_the_slot_mode() {
    let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    let ro = BlockDevice::new(1, true, irq.clone());
    let rw = BlockDevice::new(2, false, irq);
    assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(rw.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(rw.avail_features() & VIRTIO_F_VERSION_1, 0);
    assert_eq!(rw.serial(), "slot2");
}
