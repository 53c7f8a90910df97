//! The virtio-fs device and its integration with virtiofsd.
