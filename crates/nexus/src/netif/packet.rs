//! AF_PACKET sockets that send on an interface: [`send_only_socket`], and [`GsoSocket`],
//! generic segmentation offload through the kernel: with virtio-net headers
//! (`PACKET_VNET_HDR`) one large TCP frame goes in and the kernel's own GSO cuts it into
//! segments on the way to the driver, as it does for its own TCP.
//!
//! Copy-mode AF_XDP builds one socket buffer per frame sent; a 16 KiB packet of an app's stack
//! sent this way costs one socket buffer and one copy, and the segmentation runs where the
//! kernel's TCP would run it. The socket is bound with protocol 0, so it receives nothing.

#![allow(unsafe_code)] // AF_PACKET options and sockaddr_ll have no safe wrapper; each block documented.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::net::{AddressFamily, SendAncillaryBuffer, SendFlags, SocketFlags, SocketType};

/// `PACKET_VNET_HDR` (`linux/if_packet.h`): frames carry a `struct virtio_net_hdr` first.
pub const PACKET_VNET_HDR: libc::c_int = 15;
/// `PACKET_QDISC_BYPASS` (`linux/if_packet.h`): frames skip the queueing discipline.
pub const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV4` / `_TCPV6`.
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// How the kernel is to cut a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// Offset of the TCP header in the frame.
    pub l4: u16,
    /// Ethernet, IP and TCP headers together.
    pub headers: u16,
    /// Payload bytes per segment.
    pub mss: u16,
    /// IPv6 (else IPv4).
    pub v6: bool,
}

impl Gso {
    /// The 10-byte `struct virtio_net_hdr` for this frame (native byte order, which is what
    /// packet sockets take on a little-endian machine).
    fn header(&self) -> [u8; 10] {
        let mut h = [0u8; 10];
        h[0] = NEEDS_CSUM;
        h[1] = if self.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
        h[2..4].copy_from_slice(&self.headers.to_ne_bytes());
        h[4..6].copy_from_slice(&self.mss.to_ne_bytes());
        h[6..8].copy_from_slice(&self.l4.to_ne_bytes());
        // The checksum field's offset in the TCP header.
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        h
    }
}

/// An AF_PACKET raw socket bound to interface `ifindex` with protocol 0: it sends there and
/// receives nothing. Needs root or CAP_NET_RAW.
pub fn send_only_socket(ifindex: u32) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::PACKET,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // SAFETY: an all-zero sockaddr_ll is a valid value of that plain C struct.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = 0;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: the pointer and length describe `sll`, a whole sockaddr_ll that lives across the
    // call; bind only reads it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sets an integer `SOL_PACKET` option (`PACKET_*`) on an AF_PACKET socket.
pub fn set_option(fd: &OwnedFd, option: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `fd` is an open socket; the option value is a c_int that lives across the call,
    // and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An AF_PACKET socket that sends large TCP frames for the kernel to segment.
#[derive(Debug)]
pub struct GsoSocket {
    fd: OwnedFd,
}

impl GsoSocket {
    /// Opens one on interface `ifindex`. (Not with `PACKET_QDISC_BYPASS`: its direct
    /// transmit drops any frame that segmentation replaced, with ENOBUFS.)
    pub fn open(ifindex: u32) -> std::io::Result<Self> {
        let fd = send_only_socket(ifindex)?;
        set_option(&fd, PACKET_VNET_HDR, 1)?;
        Ok(Self { fd })
    }

    /// Sends the frame `headers` + `payload` (Ethernet, IP and TCP headers, the TCP checksum
    /// field holding the pseudo-header sum; then the payload, wherever it lies) to be cut as
    /// `gso` says.
    pub fn send(&self, headers: &[u8], payload: &[u8], gso: &Gso) -> std::io::Result<()> {
        let h = gso.header();
        let iov = [
            IoSlice::new(&h),
            IoSlice::new(headers),
            IoSlice::new(payload),
        ];
        rustix::net::sendmsg(
            &self.fd,
            &iov,
            &mut SendAncillaryBuffer::default(),
            SendFlags::DONTWAIT,
        )?;
        Ok(())
    }
}
