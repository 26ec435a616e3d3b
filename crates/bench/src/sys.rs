//! The few raw system calls the kernel baseline needs and rustix does not wrap: `sendmmsg` /
//! `recvmmsg` with plain buffers, and `getrusage`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// CPU time (user + system) this process has used so far, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points to
    // enough memory for one; RUSAGE_SELF cannot fail with a valid pointer.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Buffers and headers for batches of datagrams through `sendmmsg` / `recvmmsg`.
pub(crate) struct MsgBatch {
    bufs: Vec<Vec<u8>>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl MsgBatch {
    /// `n` messages of `size` bytes each.
    pub(crate) fn new(n: usize, size: usize) -> Self {
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; size]).collect();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let hdrs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero msghdr is a valid "no address, no control" header.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // The Vecs' heap storage never moves after this point (no pushes), so the pointers
        // between them stay valid while the batch lives.
        Self { bufs, iovs, hdrs }
    }

    /// The payload buffer of message `i`.
    pub(crate) fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i]
    }

    /// Length received into message `i` by the last `recv`.
    pub(crate) fn received_len(&self, i: usize) -> usize {
        self.hdrs[i].msg_len as usize
    }

    /// The payload of message `i`.
    pub(crate) fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i]
    }

    fn reset(&mut self, n: usize) -> usize {
        let n = n.min(self.hdrs.len());
        for i in 0..n {
            self.iovs[i].iov_len = self.bufs[i].len();
            self.hdrs[i].msg_len = 0;
        }
        n
    }

    /// Sends the first `n` messages on a connected socket; returns how many went.
    pub(crate) fn send(&mut self, fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
        let n = self.reset(n);
        // SAFETY: `hdrs[..n]` are valid headers whose iovecs point into `bufs`, all alive and
        // unaliased for the duration of the call.
        let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), self.hdrs.as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Receives up to `n` messages; `nonblocking` adds MSG_DONTWAIT.
    pub(crate) fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        n: usize,
        nonblocking: bool,
    ) -> io::Result<usize> {
        let n = self.reset(n);
        let flags = if nonblocking {
            libc::MSG_DONTWAIT
        } else {
            libc::MSG_WAITFORONE
        };
        // SAFETY: as for `send`; the kernel writes at most `iov_len` bytes into each buffer and
        // the received length into `msg_len`.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

// SAFETY: the raw pointers only point into the batch's own heap buffers.
unsafe impl Send for MsgBatch {}
