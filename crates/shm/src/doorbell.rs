//! eventfd doorbells: how one end wakes the other when it sleeps.
//!
//! Each end owns one eventfd that it sleeps on, and holds the peer's to ring it. A doorbell is
//! only rung when the ring's need-wakeup flag says the other side is (about to be) asleep, so a
//! busy pair of ends makes no system call at all.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::EventfdFlags;

use crate::Error;

/// One eventfd.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// A new non-blocking eventfd.
    pub fn new() -> Result<Self, Error> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| Error::sys("eventfd", e))?;
        Ok(Self { fd })
    }

    /// Adopts an eventfd received from the peer. Refuses any other kind of file, and makes it
    /// non-blocking so that ringing can never stall this end.
    pub fn adopt(fd: OwnedFd) -> Result<Self, Error> {
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .map_err(|_| Error::Handshake("cannot inspect the doorbell fd the peer sent"))?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(Error::Handshake("the peer's doorbell is not an eventfd"));
        }
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| Error::sys("F_GETFL", e))?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| Error::sys("F_SETFL", e))?;
        Ok(Self { fd })
    }

    /// Wakes whoever sleeps on this eventfd. A full counter (EAGAIN) means it is already rung.
    #[inline]
    pub fn ring(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears pending rings without blocking.
    #[inline]
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopt_accepts_eventfds_only() {
        let d = Doorbell::new().unwrap();
        let dup = d.as_fd().try_clone_to_owned().unwrap();
        let peer = Doorbell::adopt(dup).unwrap();
        peer.ring();
        let mut pfd = [rustix::event::PollFd::new(&d, rustix::event::PollFlags::IN)];
        assert_eq!(rustix::event::poll(&mut pfd, None).unwrap(), 1);
        d.drain();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(Doorbell::adopt(f.into()).is_err());
    }
}
