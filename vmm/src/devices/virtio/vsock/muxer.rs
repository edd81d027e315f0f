//! The host side of the device: the listening unix socket, one unix stream per connection, the
//! epoll set watching them, and the queue of control packets waiting for rx buffers.
//!
//! The device hands every guest packet to [`Muxer::on_guest_packet`], fills rx buffers with
//! [`Muxer::fill_rx`] and calls [`Muxer::poll_events`] when the epoll fd is readable. epoll interest
//! follows what can make progress (read a stream only while the guest has credit and rx buffers
//! exist; write only while data waits), so the level-triggered epoll never spins.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::Connection;
use super::hybrid::PendingConnect;
use super::packet::{Header, OP_REQUEST, OP_RST};

mod guest;

/// How long a handshake, or a close, waits for the other side.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Local ports of host-initiated connections: `[FIRST_LOCAL_PORT, u32::MAX)` (`u32::MAX` is
/// `VMADDR_PORT_ANY`).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long the listener rests after an accept error (e.g. out of fds) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Most connections at once.
const MAX_CONNECTIONS: usize = 1024;
/// Most unix clients still sending their `CONNECT` line.
const MAX_PENDING: usize = 64;
/// Capacity of the control-packet queue; guest packets stop being processed at half of it.
const CTRL_QUEUE_CAP: usize = 512;
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;
const EVENT_BATCH: usize = 64;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// Something already exists at the socket path.
    #[error("{0} already exists")]
    SocketExists(PathBuf),
    /// The socket cannot be bound.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The epoll fd or the timer cannot be created.
    #[error("cannot set up the vsock event loop: {0}")]
    EventLoop(io::Error),
}

/// Identifies a connection: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host-side port.
    pub local: u32,
    /// Guest-side port.
    pub peer: u32,
}

/// A control packet waiting for an rx buffer; credit fields are filled when it is sent.
struct Ctrl {
    key: ConnKey,
    op: u16,
    flags: u32,
    type_: u16,
    src_cid: u64,
}

/// What an epoll token stands for (besides the listener and the timer).
enum Slot {
    Pending(PendingConnect),
    Conn(ConnKey),
}

/// The outcome of [`Muxer::fill_rx`].
pub enum RxFill {
    /// A packet with this header (and `len` bytes already in the data buffer).
    Packet(Header),
    /// Data is ready but the buffer has no data part: drop the buffer.
    Unusable,
    /// Nothing to send.
    Nothing,
}

/// The unix side of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_fired: bool,
    /// Set while the listener is out of the epoll set after an accept error.
    listener_resume: Option<Instant>,
    timeout: Duration,
    next_deadline: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, Slot>,
    next_token: u64,
    next_local_port: u32,
    ctrl: VecDeque<Ctrl>,
    rx_list: VecDeque<ConnKey>,
    rx_ready: bool,
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist) for the guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, MuxerError> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(MuxerError::SocketExists(uds_path.to_owned()));
        }
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        let setup = || -> Result<(Epoll, TimerFd), MuxerError> {
            listener.set_nonblocking(true).map_err(bind_err)?;
            let epoll = Epoll::new().map_err(MuxerError::EventLoop)?;
            let timer = TimerFd::new().map_err(|e| MuxerError::EventLoop(e.into()))?;
            for (fd, token) in [
                (listener.as_raw_fd(), TOKEN_LISTENER),
                (timer.as_raw_fd(), TOKEN_TIMER),
            ] {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(MuxerError::EventLoop)?;
            }
            Ok((epoll, timer))
        };
        let (epoll, timer) = setup().inspect_err(|_| {
            let _ = std::fs::remove_file(uds_path);
        })?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            timer,
            timer_fired: false,
            listener_resume: None,
            timeout: DEFAULT_TIMEOUT,
            next_deadline: None,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            ctrl: VecDeque::new(),
            rx_list: VecDeque::new(),
            rx_ready: false,
        })
    }

    /// The socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The epoll fd watching every unix-side fd.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of connections (in any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Changes the handshake/close timeout (tests).
    #[cfg(test)]
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether rx buffers are worth asking for: control packets wait or streams may be readable.
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || !self.rx_list.is_empty()
    }

    /// Whether guest packets should wait: their answers could not be queued.
    pub fn tx_backpressure(&self) -> bool {
        self.ctrl.len() >= CTRL_QUEUE_CAP / 2
    }

    /// Tells whether the guest has rx buffers (and the device is active): streams are read only then.
    pub fn set_rx_ready(&mut self, ready: bool) {
        if self.rx_ready != ready {
            self.rx_ready = ready;
            let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
            for key in keys {
                self.sync(key);
            }
        }
    }

    /// Forgets every connection (device reset); unix clients see their streams close.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        self.ctrl.clear();
        self.rx_list.clear();
        self.rx_ready = false;
        self.recompute_deadline(Instant::now());
    }

    /// Handles everything ready on the epoll fd, without blocking.
    pub fn poll_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        // Level-triggered: whatever is left over is reported again on the next call.
        for _ in 0..4 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                self.on_event(ev.data(), ev.event_set());
            }
            if n < events.len() {
                break;
            }
        }
    }

    fn on_event(&mut self, token: u64, set: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_clients(),
            TOKEN_TIMER => self.timer_fired = true,
            _ => match self.tokens.get(&token) {
                Some(Slot::Pending(_)) => self.continue_handshake(token),
                Some(Slot::Conn(key)) => {
                    let key = *key;
                    self.on_stream_event(key, set);
                }
                None => {}
            },
        }
    }

    fn on_stream_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        let readable = trouble || set.contains(EventSet::IN);
        if readable && conn.registered.contains(EventSet::IN) && !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(key);
        }
        if (trouble || set.contains(EventSet::OUT)) && conn.registered.contains(EventSet::OUT) {
            self.flush_conn(key);
        }
    }

    fn accept_clients(&mut self) {
        for _ in 0..MAX_PENDING {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_pending(stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    // Level-triggered: a persistent error would fire again at once.
                    self.unregister(self.listener.as_raw_fd());
                    let resume = Instant::now() + ACCEPT_BACKOFF;
                    self.listener_resume = Some(resume);
                    self.note_deadline(resume);
                    return;
                }
            }
        }
    }

    fn add_pending(&mut self, stream: UnixStream) {
        let pending = self
            .tokens
            .values()
            .filter(|s| matches!(s, Slot::Pending(_)))
            .count();
        if pending >= MAX_PENDING {
            tracing::warn!("vsock: too many unix clients in handshake; closing one");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("vsock: cannot make a unix client non-blocking: {e}");
            return;
        }
        let token = self.new_token();
        let event = EpollEvent::new(EventSet::IN, token);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), event)
        {
            tracing::warn!("vsock: cannot watch a unix client: {e}");
            return;
        }
        let deadline = Instant::now() + self.timeout;
        self.tokens
            .insert(token, Slot::Pending(PendingConnect::new(stream, deadline)));
        self.note_deadline(deadline);
        // The line usually arrives with the connection.
        self.continue_handshake(token);
    }

    fn continue_handshake(&mut self, token: u64) {
        let Some(Slot::Pending(pending)) = self.tokens.get_mut(&token) else {
            return;
        };
        match pending.read_line() {
            Ok(None) => {}
            Ok(Some(port)) => {
                if let Some(Slot::Pending(pending)) = self.tokens.remove(&token) {
                    self.host_connect(token, pending.stream, port);
                }
            }
            Err(e) => {
                tracing::debug!("vsock: closing unix client: {e}");
                self.drop_pending(token);
            }
        }
    }

    fn drop_pending(&mut self, token: u64) {
        if let Some(Slot::Pending(pending)) = self.tokens.remove(&token) {
            self.unregister(pending.stream.as_raw_fd());
        }
    }

    /// A unix client asked for guest port `peer`: queue a `REQUEST` from a fresh local port.
    fn host_connect(&mut self, token: u64, stream: UnixStream, peer: u32) {
        if self.conns.len() >= MAX_CONNECTIONS || self.ctrl.len() >= CTRL_QUEUE_CAP {
            tracing::warn!("vsock: too many connections; refusing a unix client");
            self.unregister(stream.as_raw_fd());
            return;
        }
        let key = ConnKey {
            local: self.allocate_local_port(),
            peer,
        };
        let deadline = Instant::now() + self.timeout;
        self.conns.insert(
            key,
            Connection::local_init(stream, token, EventSet::IN, deadline),
        );
        self.tokens.insert(token, Slot::Conn(key));
        self.note_deadline(deadline);
        self.push_ctrl(key, OP_REQUEST, 0);
        self.sync(key);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            // Terminates: there are far fewer connections than ports in the range.
            if !self.conns.keys().any(|k| k.local == port) {
                return port;
            }
        }
    }

    /// Forgets a connection, closing its unix stream; `rst` tells the guest.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            if !conn.registered.is_empty() {
                self.unregister(conn.stream.as_raw_fd());
            }
            if rst {
                self.push_ctrl(key, OP_RST, 0);
            }
        }
    }

    /// Makes the epoll interest of a connection match what it can do now.
    fn sync(&mut self, key: ConnKey) {
        let rx_ready = self.rx_ready;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        if rx_ready && conn.can_read() {
            want |= EventSet::IN;
        }
        if conn.wants_write() {
            want |= EventSet::OUT;
        }
        if want == conn.registered {
            return;
        }
        let op = if conn.registered.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        let event = EpollEvent::new(want, conn.token);
        match self.epoll.ctl(op, conn.stream.as_raw_fd(), event) {
            Ok(()) => conn.registered = want,
            Err(e) => {
                tracing::warn!("vsock: cannot watch {key:?}: {e}");
                self.kill(key, true);
            }
        }
    }

    fn unregister(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn new_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Expires handshakes and closes that waited too long. Cheap unless a deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        if !self.timer_fired && self.next_deadline.is_none_or(|d| d > now) {
            return;
        }
        self.timer_fired = false;
        if self.listener_resume.is_some_and(|t| t <= now) {
            self.listener_resume = None;
            let event = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), event)
            {
                tracing::warn!("vsock: cannot watch the listener again: {e}");
            }
        }
        let expired: Vec<u64> = self
            .tokens
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Pending(p) if p.deadline <= now))
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            tracing::debug!("vsock: unix client sent no CONNECT line in time");
            self.drop_pending(token);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            tracing::debug!("vsock: {key:?} timed out");
            self.kill(key, true);
        }
        self.recompute_deadline(now);
    }

    fn recompute_deadline(&mut self, now: Instant) {
        let pending = self.tokens.values().filter_map(|slot| match slot {
            Slot::Pending(p) => Some(p.deadline),
            Slot::Conn(_) => None,
        });
        self.next_deadline = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(pending)
            .chain(self.listener_resume)
            .min();
        self.arm_timer(now);
    }

    fn note_deadline(&mut self, deadline: Instant) {
        if self.next_deadline.is_none_or(|d| deadline < d) {
            self.next_deadline = Some(deadline);
            self.arm_timer(Instant::now());
        }
    }

    /// Arms the timer for the next deadline (or disarms it); either clears its readiness.
    fn arm_timer(&mut self, now: Instant) {
        let result = match self.next_deadline {
            Some(d) => {
                let wait = d
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            tracing::warn!("vsock: cannot arm the timeout timer: {e}");
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
