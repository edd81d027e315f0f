//! virtio-vsock device (in progress).
