//! Doorbells: how one end of a channel wakes the other when it sleeps.
//!
//! A doorbell is one end of a connected `AF_UNIX` stream socket pair: the server keeps one end
//! and hands the other to the app. Each end sleeps on its own socket (readable when the peer
//! rang) and rings the peer by sending one byte through it. A doorbell is only rung when the
//! ring's need-wakeup flag says the other side is (about to be) asleep, so a busy pair of ends
//! makes no system call at all.
//!
//! # The rule: nothing the peer holds can make a doorbell call block
//!
//! An eventfd shared by both ends was one open file description: an app that cleared its
//! `O_NONBLOCK` (the flag lives on the description, not on the fd) and filled its counter made
//! the nexus's next ring block for good, and an app that read it stole the nexus's wake-ups. A
//! socket pair has two descriptions, one per end, and every call here passes `MSG_DONTWAIT`, so:
//!
//! * no call depends on file status flags at all, and the peer cannot reach ours anyway;
//! * the peer cannot read what is sent to us, only what we send to it (its own wake-ups);
//! * ringing a peer that never reads fails with `EAGAIN` once our send buffer is full (it is
//!   rung already), and one whose end is shut or closed gives `EPIPE` (`MSG_NOSIGNAL`: no
//!   signal), reported as [`Rung::PeerGone`];
//! * a peer that never stops ringing costs us at most [`DRAIN_BYTES`] per drain;
//! * a peer cannot make us the last holder of a file it chose (closing a lingering TCP socket
//!   can block for minutes): our end refuses `SCM_RIGHTS` (`SO_PASSRIGHTS` off, Linux 6.16+),
//!   and on older kernels [`Doorbell::drain_into`] hands such fds to the caller, which closes
//!   them off its hot thread.
//!
//! Every way an app can interfere with its end has a test below and in the nexus's tests.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags, SocketFlags,
    SocketType,
};

use crate::Error;

/// Most bytes (rings) one drain reads.
pub const DRAIN_BYTES: usize = 512;

/// Most fds one message can carry on Linux (`SCM_MAX_FD`): room for all of them, so the
/// kernel never drops (and so closes) any in our thread.
const SCM_MAX_FD: usize = 253;

/// `SO_PASSRIGHTS` (include/uapi/asm-generic/socket.h, Linux 6.16); not yet in libc or rustix.
/// Architectures with their own socket option numbers go without (the drain copes).
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "s390x"
))]
const SO_PASSRIGHTS: Option<libc::c_int> = Some(83);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "s390x"
)))]
const SO_PASSRIGHTS: Option<libc::c_int> = None;

/// What a ring did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// The byte went out (or the peer has unread rings already: it will wake).
    Rung,
    /// The peer's end is shut or closed: nobody sleeps there any more.
    PeerGone,
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing was pending.
    Quiet,
    /// The peer had rung (pending rings cleared, up to [`DRAIN_BYTES`]).
    Rung,
    /// The peer shut or closed its end: it can neither ring nor be woken any more.
    PeerGone,
}

/// One end of a doorbell socket pair.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    /// The kernel refuses fds sent to this end (`SO_PASSRIGHTS` off): drains need no room for
    /// them, and take the cheaper `recv`.
    fds_refused: bool,
}

impl Doorbell {
    /// A new doorbell pair: this end, and the peer's end to send to it. Both refuse fds where
    /// the kernel can.
    pub fn pair() -> Result<(Self, OwnedFd), Error> {
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| Error::sys("socketpair(AF_UNIX, SOCK_STREAM)", e))?;
        let fds_refused = refuse_fds(ours.as_fd());
        refuse_fds(theirs.as_fd());
        Ok((
            Self {
                fd: ours,
                fds_refused,
            },
            theirs,
        ))
    }

    /// Adopts the end of a doorbell the peer sent. Refuses anything but a connected `AF_UNIX`
    /// stream socket.
    pub fn adopt(fd: OwnedFd) -> Result<Self, Error> {
        let ty = rustix::net::sockopt::socket_type(&fd)
            .map_err(|_| Error::Handshake("the peer's doorbell is not a socket"))?;
        let domain = rustix::net::sockopt::socket_domain(&fd)
            .map_err(|_| Error::Handshake("the peer's doorbell is not a socket"))?;
        if ty != SocketType::STREAM || domain != AddressFamily::UNIX {
            return Err(Error::Handshake(
                "the peer's doorbell is not an AF_UNIX stream socket",
            ));
        }
        if rustix::net::getpeername(&fd).is_err() {
            return Err(Error::Handshake("the peer's doorbell is not connected"));
        }
        let fds_refused = refuse_fds(fd.as_fd());
        Ok(Self { fd, fds_refused })
    }

    /// Wakes whoever sleeps on the other end. Never blocks, whatever the peer did to its end.
    #[inline]
    pub fn ring(&self) -> Rung {
        match rustix::net::send(&self.fd, &[1], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            // EAGAIN: our send buffer is full of rings the peer has not read: it is rung.
            Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Rung::Rung,
            Err(_) => Rung::PeerGone,
        }
    }

    /// Clears pending rings without blocking. Any fd the peer managed to attach (only on
    /// kernels without `SO_PASSRIGHTS`) is closed here: for ends whose peer is trusted.
    #[inline]
    pub fn drain(&self) -> Drained {
        let mut stray = Vec::new();
        self.drain_into(&mut stray)
    }

    /// Clears pending rings without blocking, reading at most [`DRAIN_BYTES`]. Fds the peer
    /// attached (only possible on kernels without `SO_PASSRIGHTS`) are pushed onto `stray`, for
    /// the caller to close where a blocking close harms nobody.
    pub fn drain_into(&self, stray: &mut Vec<OwnedFd>) -> Drained {
        let mut buf = [0u8; DRAIN_BYTES];
        if self.fds_refused {
            return match rustix::net::recv(&self.fd, &mut buf, RecvFlags::DONTWAIT) {
                Ok((n, _)) if n > 0 => Drained::Rung,
                Ok(_) => Drained::PeerGone,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Drained::Quiet,
                Err(_) => Drained::PeerGone,
            };
        }
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        );
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                stray.extend(fds);
            }
        }
        match r {
            Ok(m) if m.bytes > 0 => Drained::Rung,
            // End of stream: the peer shut its writing side or closed its end.
            Ok(_) => Drained::PeerGone,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Drained::Quiet,
            Err(_) => Drained::PeerGone,
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Turns `SO_PASSRIGHTS` off on a doorbell end, so that a peer's `SCM_RIGHTS` sends to it fail
/// (`EPERM`). Best effort: older kernels do not know the option (false), and the drain copes.
fn refuse_fds(fd: BorrowedFd<'_>) -> bool {
    let Some(option) = SO_PASSRIGHTS else {
        return false;
    };
    let off: libc::c_int = 0;
    // SAFETY: `fd` is a valid socket for the duration of the call; the option value is a live
    // `c_int` whose exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            option,
            (&raw const off).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rustix::event::{PollFd, PollFlags};

    use super::*;

    fn readable(fd: BorrowedFd<'_>, ms: i64) -> bool {
        let mut pfd = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let ts = rustix::time::Timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        rustix::event::poll(&mut pfd, Some(&ts)).unwrap() == 1
    }

    fn pair() -> (Doorbell, Doorbell) {
        let (a, b) = Doorbell::pair().unwrap();
        (a, Doorbell::adopt(b).unwrap())
    }

    /// A peer end made blocking, as an app can make its own fd.
    fn make_blocking(d: &Doorbell) {
        let fl = rustix::fs::fcntl_getfl(&d.fd).unwrap();
        rustix::fs::fcntl_setfl(&d.fd, fl - rustix::fs::OFlags::NONBLOCK).unwrap();
    }

    #[test]
    fn rings_wake_the_other_end_only() {
        let (server, app) = pair();
        assert_eq!(server.drain(), Drained::Quiet);
        assert_eq!(server.ring(), Rung::Rung);
        assert!(readable(app.as_fd(), 1000));
        assert!(
            !readable(server.as_fd(), 0),
            "a ring never wakes the ringer"
        );
        assert_eq!(app.drain(), Drained::Rung);
        assert_eq!(app.drain(), Drained::Quiet);
        assert!(!readable(app.as_fd(), 0));
        app.ring();
        assert_eq!(server.drain(), Drained::Rung);
    }

    #[test]
    fn adopt_accepts_doorbell_ends_only() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(Doorbell::adopt(f.into()).is_err());
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        assert!(
            Doorbell::adopt(efd).is_err(),
            "an eventfd is no longer a doorbell"
        );
        let dgram = rustix::net::socket(AddressFamily::UNIX, SocketType::DGRAM, None).unwrap();
        assert!(Doorbell::adopt(dgram).is_err());
        let unconnected =
            rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        assert!(Doorbell::adopt(unconnected).is_err());
    }

    /// Attack 1 of issue 13: the peer makes its end blocking and never reads; ringing it
    /// stays instant however often we ring.
    #[test]
    fn a_peer_that_blocks_its_end_and_never_reads_cannot_block_a_ring() {
        let (server, app) = pair();
        make_blocking(&app);
        let t = Instant::now();
        for _ in 0..100_000 {
            assert_eq!(server.ring(), Rung::Rung);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // And the peer's own writes, blocking, only ever block the peer: fill our receive
        // side from its end until its (blocking) send would block, from a thread.
        let app_fd = rustix::io::fcntl_dupfd_cloexec(&app.fd, 0).unwrap();
        let filler = std::thread::spawn(move || {
            let chunk = [7u8; 4096];
            // Blocks once our side is full; ends when the server end is dropped.
            while rustix::net::send(&app_fd, &chunk, SendFlags::NOSIGNAL).is_ok() {}
        });
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        assert_eq!(server.drain(), Drained::Rung);
        assert_eq!(server.ring(), Rung::Rung);
        assert!(t.elapsed() < Duration::from_millis(100));
        drop(server);
        filler.join().unwrap();
    }

    /// Attack 2: the peer reads its end from a thread of its own, blocking. It only ever gets
    /// what we sent it; our own wake-ups (what it sends us) stay ours.
    #[test]
    fn a_peer_cannot_steal_our_wakeups() {
        let (server, app) = pair();
        make_blocking(&app);
        let app_fd = rustix::io::fcntl_dupfd_cloexec(&app.fd, 0).unwrap();
        let thief = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let mut got = 0usize;
            while let Ok(n) = rustix::io::read(&app_fd, &mut b) {
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        });
        for _ in 0..10 {
            app.ring();
            assert!(
                readable(server.as_fd(), 1000),
                "the server's wake-up is not stolen"
            );
            assert_eq!(server.drain(), Drained::Rung);
        }
        assert_eq!(server.ring(), Rung::Rung);
        drop(server);
        assert_eq!(
            thief.join().unwrap(),
            1,
            "the thief read only what the server sent it"
        );
    }

    /// The peer shuts or closes its end: rings say so (no SIGPIPE), drains say so.
    #[test]
    fn a_peer_that_shuts_or_closes_its_end_is_reported_gone() {
        for how in [
            Some(rustix::net::Shutdown::Write),
            Some(rustix::net::Shutdown::Read),
            Some(rustix::net::Shutdown::Both),
            None,
        ] {
            let (server, app) = pair();
            match how {
                Some(h) => rustix::net::shutdown(&app.fd, h).unwrap(),
                None => drop(app),
            }
            let drained = server.drain();
            let rung = server.ring();
            match how {
                Some(rustix::net::Shutdown::Read) => {
                    assert_eq!(drained, Drained::Quiet);
                    assert_eq!(rung, Rung::PeerGone);
                }
                Some(rustix::net::Shutdown::Write) => {
                    assert_eq!(drained, Drained::PeerGone);
                }
                _ => {
                    assert_eq!(drained, Drained::PeerGone);
                    assert_eq!(rung, Rung::PeerGone);
                }
            }
        }
    }

    /// The peer tries to make us the holder of an fd of its choosing.
    #[test]
    fn fds_sent_to_a_doorbell_are_refused_or_handed_back() {
        let (server, app) = pair();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let fds = [f.as_fd()];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        let sent = rustix::net::sendmsg(
            &app.fd,
            &[std::io::IoSlice::new(&[1])],
            &mut control,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        );
        let mut stray = Vec::new();
        let d = server.drain_into(&mut stray);
        match sent {
            // Linux 6.16+: refused at the sender.
            Err(e) => {
                assert_eq!(e, rustix::io::Errno::PERM);
                assert_eq!(d, Drained::Quiet);
                assert!(stray.is_empty());
            }
            // Older kernels: handed to the caller, never closed in the drain.
            Ok(_) => {
                assert_eq!(d, Drained::Rung);
                assert_eq!(stray.len(), 1);
            }
        }
    }

    /// A flood of rings costs one bounded drain per call.
    #[test]
    fn a_ringing_flood_is_drained_in_bounded_steps() {
        let (server, app) = pair();
        let junk = [9u8; 64 * 1024];
        let mut sent = 0;
        while let Ok(n) = rustix::net::send(&app.fd, &junk, SendFlags::DONTWAIT) {
            sent += n;
        }
        assert!(sent > DRAIN_BYTES);
        let mut drains = 0;
        while server.drain() == Drained::Rung {
            drains += 1;
        }
        assert!(
            drains >= sent / DRAIN_BYTES,
            "{drains} drains for {sent} bytes"
        );
    }
}
