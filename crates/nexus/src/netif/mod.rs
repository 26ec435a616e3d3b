//! Interface backends: where the flowswitch's frames come from and go to.
//!
//! Every backend is a [`Netif`]: a batch receive, a send, the interface's MAC address and an fd
//! to sleep on. Backends: [`tap`], a TAP device; [`pair`], an in-memory pair of interfaces for
//! in-process tests; AF_XDP (with its XDP program) is next.

pub mod pair;
pub mod tap;

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
    /// Transmits one Ethernet frame.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetifError>;
    /// The interface's MAC address (the source of every frame the nexus sends).
    fn mac(&self) -> [u8; 6];
    /// An fd that is readable when frames are waiting, for the event loop to sleep on.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>>;
}
