//! The guest side of the muxer: packets from the tx queue, and what goes into rx buffers
//! (control packets first, then stream data bounded by the guest's credit).

use std::io;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::{ConnKey, Ctrl, Muxer, RxFill, Slot, CTRL_QUEUE_CAP, MAX_CONNECTIONS};
use crate::devices::virtio::vsock::connection::{Connection, State};
use crate::devices::virtio::vsock::hybrid::peer_socket_path;
use crate::devices::virtio::vsock::packet::{
    op_name, Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
};

impl Muxer {
    /// A guest connection request to host port `key.local`: connect to `<uds>_<port>`.
    fn peer_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                "vsock: too many connections; refusing guest port {}",
                key.peer
            );
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        let path = peer_socket_path(&self.uds_path, key.local);
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.push_ctrl(key, OP_RST, 0);
                return;
            }
        };
        let token = self.new_token();
        let conn = Connection::peer_init(stream, token, hdr.buf_alloc, hdr.fwd_cnt);
        self.conns.insert(key, conn);
        self.tokens.insert(token, Slot::Conn(key));
        self.push_ctrl(key, OP_RESPONSE, 0);
        self.sync(key);
    }

    /// Handles one packet the guest sent; `data` is its payload (exactly `hdr.len` bytes).
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid {
            tracing::debug!(
                "vsock: dropping {} from spoofed CID {}",
                op_name(hdr.op),
                hdr.src_cid
            );
            return;
        }
        let key = ConnKey {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(
                "vsock: unsupported {} to CID {} type {}",
                op_name(hdr.op),
                hdr.dst_cid,
                hdr.type_
            );
            if hdr.op != OP_RST {
                let rst = Ctrl {
                    key,
                    op: OP_RST,
                    flags: 0,
                    type_: hdr.type_,
                    src_cid: hdr.dst_cid,
                };
                self.push_ctrl_raw(rst);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.peer_connect(key, hdr),
                OP_RST => {}
                _ => {
                    self.push_ctrl(key, OP_RST, 0);
                }
            }
            return;
        };
        conn.set_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match (hdr.op, conn.state) {
            (OP_RST, _) => return self.kill(key, false),
            (OP_RESPONSE, State::LocalInit) => {
                conn.state = State::Established;
                conn.deadline = None;
                conn.queue_ok_line(key.local);
                self.flush_conn(key);
            }
            (OP_RW, State::Established) if conn.peer_shutdown & SHUTDOWN_SEND == 0 => {
                if let Some(data) = data {
                    if let Err(e) = conn.push_to_host(data) {
                        tracing::debug!("vsock: resetting {key:?}: {e}");
                        return self.kill(key, true);
                    }
                    self.after_write(key);
                }
            }
            // Raced with our SHUTDOWN, or sent after the guest's own: nobody reads it.
            (OP_RW, State::LocalClosed | State::PeerClosing) => {}
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue_credit_update(key),
            (OP_SHUTDOWN, State::Established) => {
                conn.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                if conn.peer_shutdown == SHUTDOWN_BOTH {
                    let deadline = Instant::now() + self.timeout;
                    conn.state = State::PeerClosing;
                    conn.deadline = Some(deadline);
                    self.note_deadline(deadline);
                }
                self.progress_close(key);
            }
            (OP_SHUTDOWN, State::PeerClosing) => {}
            (OP_SHUTDOWN, State::LocalClosed) => return self.kill(key, true),
            (op, state) => {
                tracing::debug!("vsock: unexpected {} on {key:?} in {state:?}", op_name(op));
                return self.kill(key, true);
            }
        }
        self.sync(key);
    }

    /// Fills one rx buffer (`data` is its data part): control packets first, then stream data.
    pub fn fill_rx<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) -> RxFill {
        loop {
            if let Some(hdr) = self.next_ctrl() {
                return RxFill::Packet(hdr);
            }
            let Some(key) = self.rx_list.pop_front() else {
                return RxFill::Nothing;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            if !(self.rx_ready && conn.can_read()) {
                continue;
            }
            let Some(buf) = data else {
                conn.in_rx_list = true;
                self.rx_list.push_front(key);
                return RxFill::Unusable;
            };
            match conn.read_into(buf) {
                Ok(0) => self.host_eof(key),
                Ok(n) => {
                    let (buf_alloc, fwd_cnt) = conn.credit_fields();
                    let mut hdr = self.header(key, OP_RW, 0);
                    (hdr.len, hdr.buf_alloc, hdr.fwd_cnt) = (n as u32, buf_alloc, fwd_cnt);
                    self.after_read(key);
                    return RxFill::Packet(hdr);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::debug!("vsock: reading {key:?} failed: {e}");
                    self.kill(key, true);
                }
            }
        }
    }

    /// After data went to the guest: keep reading round-robin, or stop (and ask for credit).
    fn after_read(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.can_read() {
            conn.in_rx_list = true;
            self.rx_list.push_back(key);
            return;
        }
        if conn.peer_credit() == 0 && !conn.credit_requested {
            conn.credit_requested = true;
            self.push_ctrl(key, OP_CREDIT_REQUEST, 0);
        }
        self.sync(key);
    }

    /// The next control packet whose connection still exists (RSTs always go out).
    fn next_ctrl(&mut self) -> Option<Header> {
        while let Some(c) = self.ctrl.pop_front() {
            let mut hdr = self.header(c.key, c.op, c.flags);
            (hdr.type_, hdr.src_cid) = (c.type_, c.src_cid);
            let Some(conn) = self.conns.get_mut(&c.key) else {
                if c.op == OP_RST {
                    return Some(hdr);
                }
                continue; // its connection is gone
            };
            (hdr.buf_alloc, hdr.fwd_cnt) = conn.credit_fields();
            if c.op == OP_CREDIT_UPDATE {
                conn.credit_update_queued = false;
            }
            if c.op == OP_REQUEST {
                // The guest sees it only now: the handshake timeout starts here.
                let deadline = Instant::now() + self.timeout;
                conn.deadline = Some(deadline);
                self.note_deadline(deadline);
            }
            return Some(hdr);
        }
        None
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// The unix side reached EOF: tell the guest and wait for its `RST`.
    fn host_eof(&mut self, key: ConnKey) {
        let deadline = Instant::now() + self.timeout;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.state = State::LocalClosed;
            conn.deadline = Some(deadline);
        }
        self.note_deadline(deadline);
        self.push_ctrl(key, OP_SHUTDOWN, SHUTDOWN_BOTH);
        self.sync(key);
    }

    /// Writes what waits for a unix stream (on `EPOLLOUT`, or after new data or the `OK` line).
    pub(super) fn flush_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.flush() {
            Ok(written) if written > 0 && conn.state == State::PeerClosing => {
                // Closing, but the client still reads: give it time.
                let deadline = Instant::now() + self.timeout;
                conn.deadline = Some(deadline);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("vsock: writing {key:?} failed: {e}");
                return self.kill(key, true);
            }
        }
        self.after_write(key);
        self.sync(key);
    }

    /// After guest data reached the unix stream: credit update, pending shutdowns.
    fn after_write(&mut self, key: ConnKey) {
        if self
            .conns
            .get(&key)
            .is_some_and(Connection::needs_credit_update)
        {
            self.queue_credit_update(key);
        }
        self.progress_close(key);
    }

    /// Completes a guest `SHUTDOWN` once everything it sent has been written.
    fn progress_close(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pending() > 0 {
            return;
        }
        if conn.state == State::PeerClosing {
            self.kill(key, true);
        } else if conn.peer_shutdown & SHUTDOWN_SEND != 0 {
            conn.shut_write();
        }
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if self
            .conns
            .get(&key)
            .is_some_and(|c| !c.credit_update_queued)
            && self.push_ctrl(key, OP_CREDIT_UPDATE, 0)
        {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.credit_update_queued = true;
            }
        }
    }

    /// Queues a control packet for `key`; `false` if the queue is full (the packet is dropped).
    pub(super) fn push_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) -> bool {
        self.push_ctrl_raw(Ctrl {
            key,
            op,
            flags,
            type_: TYPE_STREAM,
            src_cid: HOST_CID,
        })
    }

    fn push_ctrl_raw(&mut self, ctrl: Ctrl) -> bool {
        if self.ctrl.len() >= CTRL_QUEUE_CAP {
            tracing::warn!(
                "vsock: control queue full; dropping {} for {:?}",
                op_name(ctrl.op),
                ctrl.key
            );
            return false;
        }
        self.ctrl.push_back(ctrl);
        true
    }
}
