//! virtio-vsock (virtio 1.1 §5.10, stream sockets only) with Firecracker's "hybrid vsock" host side.
//!
//! The guest sees a vsock device with its CID; the host sees one unix socket per VM:
//! - a host client connects to the socket, writes `CONNECT <guest port>\n`, reads `OK <host port>\n`
//!   once the guest accepted, then uses the stream (the guest refusing, or not answering within a
//!   couple of seconds, closes it);
//! - a guest connection to host port `P` is forwarded to the unix socket `<path>_P`.
//!
//! Layout (after Firecracker's `devices/virtio/vsock`): `device` is the virtio side,
//! `muxer` the unix side and its event loop, `connection` the per-connection state machine and
//! credit accounting, `hybrid` the unix-socket conventions, `packet` the wire header.

mod connection;
mod device;
mod hybrid;
mod muxer;
mod packet;

pub use device::{VsockDevice, VsockError, QUEUE_SIZE};
pub use muxer::MuxerError;

#[cfg(test)]
mod tests;
