//! Interface backends: where the flowswitch's frames come from and go to.
//!
//! Every backend is a [`Netif`]: a batch receive, a send, the interface's MAC address and an fd
//! to sleep on. Backends: [`afxdp`], a kernel interface shared with the kernel's stack through
//! an AF_XDP socket and the [`xdp`] steering program (with [`packet`]'s GSO socket beside it
//! for large TCP frames); [`tap`], a TAP device; [`pair`], an in-memory pair of interfaces for
//! in-process tests.

pub mod afxdp;
pub mod faults;
pub mod packet;
pub mod pair;
pub mod tap;
pub mod xdp;

use std::os::fd::BorrowedFd;

/// Why a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// The frame does not fit the interface.
    #[error("frame of {0} bytes is larger than the interface takes")]
    TooLarge(usize),
    /// The transmit queue is full; the frame was not sent.
    #[error("transmit queue full")]
    Full,
    /// The other end is gone.
    #[error("the interface is down")]
    Down,
}

/// An interface the flowswitch serves.
pub trait Netif: std::fmt::Debug + Send {
    /// Receives up to `max` frames and hands them to `f` as one batch (the slices are valid
    /// during the call only), so the flowswitch can classify them together. Returns how many.
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> usize;
    /// Queues one Ethernet frame for transmission (sent by [`Netif::flush`] at the latest).
    fn send(&mut self, frame: &[u8]) -> Result<(), NetifError>;
    /// Pushes out what [`Netif::send`] queued (one kick per batch, not per frame).
    fn flush(&mut self) {}
    /// Lends the backend's next transmit buffer, to be filled in place and sent with
    /// [`Netif::commit`] (or left unsent): saves a copy where the backend has its own frame
    /// memory (AF_XDP's UMEM). `None`: use [`Netif::send`].
    fn tx_buffer(&mut self) -> Option<&mut [u8]> {
        None
    }
    /// Queues the first `len` bytes of the buffer [`Netif::tx_buffer`] lent.
    fn commit(&mut self, len: usize) -> Result<(), NetifError> {
        let _ = len;
        Err(NetifError::Full)
    }
    /// Largest IP packet the interface carries.
    fn mtu(&self) -> u32 {
        1500
    }
    /// Sends a TCP frame larger than the MTU, `headers` (Ethernet to TCP, the TCP checksum
    /// field holding the pseudo-header sum) then `payload`, for the kernel to cut into segments
    /// as `gso` says, in order after every frame queued before it. `Ok(false)`: this backend
    /// cannot, and the caller cuts the frame itself.
    fn send_gso(
        &mut self,
        headers: &[u8],
        payload: &[u8],
        gso: &packet::Gso,
    ) -> Result<bool, NetifError> {
        let _ = (headers, payload, gso);
        Ok(false)
    }
    /// The interface's MAC address (the source of every frame the nexus sends).
    fn mac(&self) -> [u8; 6];
    /// An fd that is readable when frames are waiting, for the event loop to sleep on.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Why the backend stopped working for good, if it did: it then receives nothing, and
    /// the event loop stops watching [`Netif::wake_fd`] (which may poll as ready for ever).
    fn failed(&self) -> Option<&str> {
        None
    }
    /// Called about every 100 ms: checks what the datapath does not show (that the
    /// interface is still there).
    fn housekeeping(&mut self) {}
    /// The backend's own counters (drops the flowswitch cannot see), for `netchannel status`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// What keeps the backend's steering in step with the port reservations (AF_XDP's claims
    /// map); `None` when every frame reaches the nexus anyway.
    fn steering(&self) -> Option<Box<dyn crate::netns::Steering>> {
        None
    }
}
