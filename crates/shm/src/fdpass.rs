//! Passing file descriptors over a Unix socket (SCM_RIGHTS), with hard limits.
//!
//! The receiving side accepts at most the number of fds it asked for; anything beyond is closed
//! by the kernel (MSG_CTRUNC) or dropped here, so a peer cannot make us leak descriptors.

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

/// Receives one message into `buf` and up to `max_fds` fds. Returns the payload length and the
/// fds. A message that was truncated, or that carried more fds than asked for, is an error (and
/// every fd it carried is closed).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(usize, Vec<OwnedFd>), Error> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
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
    if msg.flags.contains(rustix::net::ReturnFlags::TRUNC)
        || msg.flags.contains(rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(Error::Handshake("message or its fds were truncated"));
    }
    if fds.len() > max_fds {
        return Err(Error::Handshake("peer sent more fds than asked for"));
    }
    Ok((msg.bytes, fds))
}
