//! Passing file descriptors over a Unix socket (SCM_RIGHTS), with hard limits.
//!
//! The receiving side takes every fd a message carries (room for Linux's `SCM_MAX_FD`), so the
//! kernel never closes any in its place: the last close of some files blocks (a lingering TCP
//! socket), and a server decides where that may happen. [`Received::fds_truncated`] says that
//! more than [`MAX_FDS`] came, which no request of ours carries.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::Error;

/// Most fds one message may carry.
pub const MAX_FDS: usize = 8;

/// Most fds the kernel lets one message carry (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Sends `data` with `fds` attached as one message.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), Error> {
    if fds.len() > MAX_FDS {
        return Err(Error::Handshake("too many fds for one message"));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::Handshake("fds do not fit the control buffer"));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| Error::sys("sendmsg", e))?;
    if n != data.len() {
        return Err(Error::Handshake("short send"));
    }
    Ok(())
}

/// One message received with [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    /// Bytes of payload in the buffer.
    pub len: usize,
    /// Every fd that came with it (owned: dropping them closes them).
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer (the rest is lost).
    pub truncated: bool,
    /// More than [`MAX_FDS`] fds came (all are in `fds`, for the caller to dispose of).
    pub fds_truncated: bool,
}

/// Receives one message into `buf`, with every fd attached to it. `nonblocking` adds
/// MSG_DONTWAIT. End of stream (a zero-length read
/// with no fds) is [`Error::PeerGone`].
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> Result<Received, Error> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    let msg = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, flags)
        .map_err(|e| Error::sys("recvmsg", e))?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(Error::PeerGone);
    }
    let fds_truncated = fds.len() > MAX_FDS || msg.flags.contains(rustix::net::ReturnFlags::CTRUNC);
    Ok(Received {
        len: msg.bytes.min(buf.len()),
        fds,
        truncated: msg.flags.contains(rustix::net::ReturnFlags::TRUNC),
        fds_truncated,
    })
}

/// Receives a message that must be exactly `expect` with exactly `nfds` fds (hand-shakes).
pub fn recv_exact(sock: BorrowedFd<'_>, expect: &[u8], nfds: usize) -> Result<Vec<OwnedFd>, Error> {
    let mut buf = [0u8; 64];
    let r = recv_with_fds(sock, &mut buf, false)?;
    if r.truncated || r.fds_truncated || buf.get(..r.len) != Some(expect) {
        return Err(Error::Handshake(
            "unexpected greeting from the peer (another program or another version)",
        ));
    }
    if r.fds.len() != nfds {
        return Err(Error::Handshake("the peer sent the wrong number of fds"));
    }
    Ok(r.fds)
}
