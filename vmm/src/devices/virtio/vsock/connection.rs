//! One stream connection: its unix-side socket, its state and the credit accounting of both
//! directions (virtio 1.1 §5.10.6.3).
//!
//! Naming: "to host" is guest data on its way to the unix stream, "to guest" is unix data on its way
//! into rx buffers. Counters are `Wrapping<u32>` like the wire fields they mirror.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::packet::SHUTDOWN_RCV;

/// Receive buffer advertised to the guest for each connection (`buf_alloc`): the most guest data
/// that can wait in [`Connection`] for a slow unix reader.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// A `CREDIT_UPDATE` is sent once `fwd_cnt` has advanced this much past what the guest was told.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// Largest payload of one packet to the guest.
pub const MAX_RX_PAYLOAD: usize = 64 * 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: `REQUEST` sent (or queued), waiting for the guest's `RESPONSE`.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// The unix side reached EOF: `SHUTDOWN` sent, waiting for the guest's `RST`.
    LocalClosed,
    /// The guest shut down both directions: flushing what it sent, then `RST`.
    PeerClosing,
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit we gave it.
    #[error("guest overran its credit: {in_flight} bytes in flight, {BUF_ALLOC} allowed")]
    CreditExceeded {
        /// Bytes the guest would have in flight with this packet.
        in_flight: u64,
    },
    /// The unix stream failed.
    #[error("unix stream: {0}")]
    Io(#[from] io::Error),
    /// A guest buffer could not be accessed.
    #[error("guest buffer: {0}")]
    Memory(VolatileMemoryError),
}

/// A connection between a guest port and a unix stream.
pub struct Connection {
    /// The unix side.
    pub stream: UnixStream,
    /// epoll token of `stream`.
    pub token: u64,
    /// Events `stream` is registered for in the muxer's epoll (empty: not registered).
    pub registered: EventSet,
    /// Life-cycle state.
    pub state: State,
    /// When the current state times out (`LocalInit`, `LocalClosed`, `PeerClosing`).
    pub deadline: Option<Instant>,
    /// Whether the connection is in the muxer's list of streams to read.
    pub in_rx_list: bool,
    /// Whether a `CREDIT_UPDATE` for this connection waits in the control queue.
    pub credit_update_queued: bool,
    /// Whether we asked the guest for credit since its credit last changed.
    pub credit_requested: bool,
    /// `SHUTDOWN_*` flags the guest has sent.
    pub peer_shutdown: u32,
    /// Whether the unix stream's write side has been shut down.
    pub write_shut: bool,
    /// Guest data the unix stream has not taken yet.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are not guest data (the `OK <port>\n` line).
    uncounted: usize,
    /// Guest data bytes received.
    rx_cnt: Wrapping<u32>,
    /// Guest data bytes delivered to the unix stream.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last saw.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    sent_cnt: Wrapping<u32>,
    /// The guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    /// A host-initiated connection waiting for the guest's answer until `deadline`.
    /// `registered` is what `stream` is already registered for under `token`.
    pub fn local_init(
        stream: UnixStream,
        token: u64,
        registered: EventSet,
        deadline: Instant,
    ) -> Self {
        let mut conn = Connection::new(stream, token, State::LocalInit);
        conn.registered = registered;
        conn.deadline = Some(deadline);
        conn
    }

    /// A guest-initiated connection, established at once; `buf_alloc`/`fwd_cnt` from its `REQUEST`.
    pub fn peer_init(stream: UnixStream, token: u64, buf_alloc: u32, fwd_cnt: u32) -> Self {
        let mut conn = Connection::new(stream, token, State::Established);
        conn.set_peer_credit(buf_alloc, fwd_cnt);
        conn
    }

    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Connection {
            stream,
            token,
            registered: EventSet::empty(),
            state,
            deadline: None,
            in_rx_list: false,
            credit_update_queued: false,
            credit_requested: false,
            peer_shutdown: 0,
            write_shut: false,
            to_host: VecDeque::new(),
            uncounted: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// Records the credit fields of a packet from the guest.
    pub fn set_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        if buf_alloc != self.peer_buf_alloc || Wrapping(fwd_cnt) != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the guest can still receive.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the unix stream should be read now (the guest can take data).
    pub fn can_read(&self) -> bool {
        self.state == State::Established
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether data waits for the unix stream.
    pub fn wants_write(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Bytes waiting for the unix stream.
    pub fn pending(&self) -> usize {
        self.to_host.len()
    }

    /// `(buf_alloc, fwd_cnt)` for a packet to the guest; the guest is now up to date.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (BUF_ALLOC, self.fwd_cnt.0)
    }

    /// Whether the guest should be told about freed buffer space.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Reads unix data into `buf` (bounded by the guest's credit and [`MAX_RX_PAYLOAD`]).
    /// `Ok(0)` is EOF; `WouldBlock` when nothing can be read.
    pub fn read_into<B: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, B>) -> io::Result<usize> {
        let n = buf
            .len()
            .min(MAX_RX_PAYLOAD)
            .min(self.peer_credit() as usize);
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut sub = buf.subslice(0, n).map_err(io::Error::other)?;
        let got = self.stream.read_volatile(&mut sub).map_err(into_io)?;
        self.sent_cnt += Wrapping(got as u32);
        Ok(got)
    }

    /// Forwards guest data to the unix stream, buffering what it cannot take now.
    pub fn push_to_host<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> Result<(), ConnError> {
        let in_flight = u64::from((self.rx_cnt - self.last_fwd_cnt_sent).0) + data.len() as u64;
        if in_flight > u64::from(BUF_ALLOC) {
            return Err(ConnError::CreditExceeded { in_flight });
        }
        self.rx_cnt += Wrapping(data.len() as u32);
        let mut written = 0;
        if self.to_host.is_empty() {
            match self.stream.write_volatile(data).map_err(into_io) {
                Ok(n) => written = n,
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e.into()),
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        if written < data.len() {
            let rest = data.offset(written).map_err(ConnError::Memory)?;
            let mut copy = vec![0u8; rest.len()];
            rest.copy_to(&mut copy[..]);
            self.to_host.extend(copy);
        }
        Ok(())
    }

    /// Queues the `OK <local_port>\n` line that completes a host-initiated handshake.
    pub fn queue_ok_line(&mut self, local_port: u32) {
        let line = format!("OK {local_port}\n");
        self.uncounted += line.len();
        self.to_host.extend(line.as_bytes());
    }

    /// Writes buffered data to the unix stream until it would block; returns the bytes written.
    pub fn flush(&mut self) -> Result<usize, ConnError> {
        let mut written = 0;
        while !self.to_host.is_empty() {
            let (a, b) = self.to_host.as_slices();
            let chunk = if a.is_empty() { b } else { a };
            match self.stream.write(chunk) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.to_host.drain(..n);
                    written += n;
                    let exempt = n.min(self.uncounted);
                    self.uncounted -= exempt;
                    self.fwd_cnt += Wrapping((n - exempt) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// Shuts the unix stream's write side (the unix peer reads EOF).
    pub fn shut_write(&mut self) {
        if !self.write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
    }
}

fn into_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        e => io::Error::other(e),
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
