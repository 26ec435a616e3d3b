//! The AF_XDP backend: the nexus shares a kernel interface with the kernel's own stack.
//!
//! The [`XdpProgram`] steers claimed ports to one AF_XDP socket per receive queue (this
//! version binds queue 0 and warns when the interface has more); everything else stays with
//! the kernel. The socket's frames (its UMEM) are the backend's own memory, apart from every
//! channel's pool: the flowswitch copies between them, so no app ever sees the interface's
//! memory, and the kernel never sees an app's.
//!
//! Frames circulate in two fixed sets: the RX half goes fill ring → RX ring → flowswitch →
//! fill ring; the TX half goes free list → TX ring → completion ring → free list.

mod ring;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::xdp::{
    SocketAddrXdp, SocketAddrXdpFlags, XDP_PGOFF_RX_RING, XDP_PGOFF_TX_RING,
    XDP_UMEM_PGOFF_COMPLETION_RING, XDP_UMEM_PGOFF_FILL_RING, XdpDesc, XdpDescOptions, XdpUmemReg,
    XdpUmemRegFlags,
};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, sockopt};

use super::xdp::{Claims, XdpError, XdpMode, XdpProgram};
use super::{Netif, NetifError};
use ring::{Ring, Umem};

/// Bytes per frame (a 1500-byte MTU frame fits with room to spare).
const FRAME: usize = 2048;
/// Entries per ring; the UMEM holds twice as many frames (half RX, half TX).
const RING: u32 = 2048;
/// Frames handed to the flowswitch per callback.
const BATCH: usize = 64;

/// Options of the backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct AfXdpOptions {
    /// Force native or generic XDP (default: native when the driver has it).
    pub mode: Option<XdpMode>,
    /// Force copy mode even where zero-copy is possible.
    pub force_copy: bool,
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum AfXdpError {
    /// No such interface.
    #[error("no interface named {0:?} (see `ip link`)")]
    NoInterface(String),
    /// The XDP program.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// A system call failed.
    #[error("AF_XDP on {ifname}: {op}: {source} (AF_XDP needs root or CAP_NET_ADMIN, CAP_BPF)")]
    Sys {
        /// The interface.
        ifname: String,
        /// What failed.
        op: &'static str,
        /// The OS error.
        source: Errno,
    },
}

/// An interface served over AF_XDP.
#[derive(Debug)]
pub struct AfXdp {
    // Field order is drop order: the rings and UMEM are unmapped before the socket closes,
    // and the program (whose link detaches it) goes last.
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<XdpDesc>,
    tx: Ring<XdpDesc>,
    umem: Umem,
    fd: OwnedFd,
    program: XdpProgram,
    ifname: String,
    ifindex: u32,
    mac: [u8; 6],
    /// The interface's MTU when it was opened, within what one frame holds.
    mtu: u32,
    /// Where large TCP frames go to be segmented by the kernel (none if it could not open).
    gso: Option<super::packet::GsoSocket>,
    zerocopy: bool,
    free_tx: Vec<u64>,
    /// TX entries written but not yet published.
    pending: u32,
    /// RX frames to put back on the fill ring.
    refill: Vec<u64>,
    descs: Vec<(u64, u32)>,
    /// Why the socket stopped working for good (its interface was deleted: ENXIO).
    failed: Option<String>,
    /// `/sys/class/net/<ifname>/ifindex`, read in housekeeping: an idle socket is not told
    /// that its interface went away.
    sysfs_ifindex: std::path::PathBuf,
}

/// The interface's index, MAC and number of receive queues.
fn interface(ifname: &str) -> Result<(u32, [u8; 6], u32), AfXdpError> {
    let none = || AfXdpError::NoInterface(ifname.to_owned());
    if ifname.is_empty() || ifname.contains(['/', '\0']) || ifname == "." || ifname == ".." {
        return Err(none());
    }
    let dir = std::path::Path::new("/sys/class/net").join(ifname);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|_| none());
    let ifindex = read("ifindex")?.trim().parse().map_err(|_| none())?;
    let mut mac = [0u8; 6];
    let text = read("address")?;
    for (m, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *m = u8::from_str_radix(part, 16).map_err(|_| none())?;
    }
    let queues = std::fs::read_dir(dir.join("queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1);
    Ok((ifindex, mac, queues))
}

impl AfXdp {
    /// Attaches the steering program to `ifname` and binds an AF_XDP socket to its queue 0.
    pub fn open(ifname: &str, opts: AfXdpOptions) -> Result<Self, AfXdpError> {
        let (ifindex, mac, queues) = interface(ifname)?;
        if queues > 1 {
            tracing::warn!(
                ifname,
                queues,
                "only receive queue 0 is served; claimed traffic on other queues goes to the \
                 kernel (set one combined channel on the device to avoid it)"
            );
        }
        let sys = |op| {
            let ifname = ifname.to_owned();
            move |source| AfXdpError::Sys { ifname, op, source }
        };
        let program = XdpProgram::attach(ifindex, queues, opts.mode)?;
        let fd = rustix::net::socket_with(
            AddressFamily::XDP,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(sys("socket(AF_XDP)"))?;
        let umem = Umem::new(2 * RING as usize, FRAME).map_err(sys("mmap(UMEM)"))?;
        let (addr, len) = umem.region();
        sockopt::set_xdp_umem_reg(
            &fd,
            XdpUmemReg {
                addr,
                len,
                chunk_size: FRAME as u32,
                headroom: 0,
                flags: XdpUmemRegFlags::empty(),
                tx_metadata_len: 0,
            },
        )
        .map_err(sys("XDP_UMEM_REG"))?;
        sockopt::set_xdp_umem_fill_ring_size(&fd, RING).map_err(sys("XDP_UMEM_FILL_RING"))?;
        sockopt::set_xdp_umem_completion_ring_size(&fd, RING)
            .map_err(sys("XDP_UMEM_COMPLETION_RING"))?;
        sockopt::set_xdp_rx_ring_size(&fd, RING).map_err(sys("XDP_RX_RING"))?;
        sockopt::set_xdp_tx_ring_size(&fd, RING).map_err(sys("XDP_TX_RING"))?;
        let off = sockopt::xdp_mmap_offsets(&fd).map_err(sys("XDP_MMAP_OFFSETS"))?;
        let mut fill = Ring::<u64>::map(fd.as_fd(), &off.fr, XDP_UMEM_PGOFF_FILL_RING, RING)
            .map_err(sys("mmap(fill ring)"))?;
        let comp = Ring::<u64>::map(fd.as_fd(), &off.cr, XDP_UMEM_PGOFF_COMPLETION_RING, RING)
            .map_err(sys("mmap(completion ring)"))?;
        let rx = Ring::<XdpDesc>::map(fd.as_fd(), &off.rx, XDP_PGOFF_RX_RING, RING)
            .map_err(sys("mmap(RX ring)"))?;
        let tx = Ring::<XdpDesc>::map(fd.as_fd(), &off.tx, XDP_PGOFF_TX_RING, RING)
            .map_err(sys("mmap(TX ring)"))?;

        // Zero-copy where the driver has it, copy otherwise.
        let wake = SocketAddrXdpFlags::XDP_USE_NEED_WAKEUP;
        let mut zerocopy = false;
        let mut bound = Err(Errno::INVAL);
        if !opts.force_copy && program.mode() == XdpMode::Native {
            let a = SocketAddrXdp::new(wake | SocketAddrXdpFlags::XDP_ZEROCOPY, ifindex, 0);
            bound = rustix::net::bind(&fd, &a);
            zerocopy = bound.is_ok();
        }
        if bound.is_err() {
            let a = SocketAddrXdp::new(wake | SocketAddrXdpFlags::XDP_COPY, ifindex, 0);
            bound = rustix::net::bind(&fd, &a);
        }
        bound.map_err(sys("bind(AF_XDP)"))?;
        program
            .add_socket(0, fd.as_fd())
            .map_err(sys("adding the socket to the XDP map"))?;

        // The first half of the frames waits for packets; the second half is for sending.
        let n = fill.free(RING);
        for i in 0..n {
            fill.write(i, u64::from(i) * FRAME as u64);
        }
        fill.submit(n);
        let free_tx = (RING..2 * RING)
            .map(|i| u64::from(i) * FRAME as u64)
            .collect();
        tracing::info!(ifname, mode = ?program.mode(), zerocopy, "AF_XDP socket bound");
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(1500)
            .min(FRAME as u32 - 14 - 256);
        let gso = match super::packet::GsoSocket::open(ifindex) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::info!(ifname, error = %e, "no kernel segmentation; the nexus segments TCP itself");
                None
            }
        };
        Ok(Self {
            gso,
            fill,
            comp,
            rx,
            tx,
            umem,
            fd,
            program,
            ifname: ifname.to_owned(),
            ifindex,
            mac,
            mtu,
            zerocopy,
            free_tx,
            pending: 0,
            refill: Vec::with_capacity(RING as usize),
            descs: Vec::with_capacity(BATCH),
            failed: None,
            sysfs_ifindex: std::path::Path::new("/sys/class/net")
                .join(ifname)
                .join("ifindex"),
        })
    }

    /// How the XDP program is attached.
    pub fn mode(&self) -> XdpMode {
        self.program.mode()
    }

    /// Whether the socket runs zero-copy.
    pub fn zerocopy(&self) -> bool {
        self.zerocopy
    }

    /// The interface's index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// A handle that keeps the XDP claims in step with the port reservations.
    pub fn claims(&self) -> Claims {
        self.program.claims()
    }

    /// Takes finished transmissions back into the free list.
    fn reap_completions(&mut self) {
        let n = self.comp.ready(RING);
        for i in 0..n {
            self.free_tx.push(self.comp.read(i));
        }
        self.comp.release(n);
    }

    fn refill(&mut self) {
        let n = self.fill.free(self.refill.len() as u32);
        for i in 0..n {
            self.fill.write(i, self.refill[i as usize]);
        }
        self.fill.submit(n);
        self.refill.drain(..n as usize);
        if self.fill.needs_wakeup() {
            let _ = rustix::net::recv(&self.fd, &mut [0u8; 0], RecvFlags::DONTWAIT);
        }
    }
}

impl Netif for AfXdp {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> usize {
        let mut total = 0;
        while total < max {
            let n = self.rx.ready((max - total).min(BATCH) as u32);
            if n == 0 {
                break;
            }
            self.descs.clear();
            for i in 0..n {
                let d = self.rx.read(i);
                self.descs.push((d.addr, d.len));
            }
            self.rx.release(n);
            let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
            let mut k = 0;
            for &(addr, len) in &self.descs {
                // A descriptor outside the UMEM would be a kernel bug; skip it, never trust it.
                if let Some(f) = self.umem.frame(addr, len) {
                    frames[k] = f;
                    k += 1;
                }
            }
            f(&frames[..k]);
            total += n as usize;
            // In unaligned mode the address may carry an offset; the frame is its chunk.
            self.refill
                .extend(self.descs.iter().map(|&(a, _)| a - a % FRAME as u64));
        }
        if !self.refill.is_empty() {
            self.refill();
        }
        total
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), NetifError> {
        if frame.len() > FRAME {
            return Err(NetifError::TooLarge(frame.len()));
        }
        if self.free_tx.is_empty() {
            self.reap_completions();
        }
        if self.tx.free(self.pending + 1) <= self.pending {
            self.flush();
            if self.tx.free(self.pending + 1) <= self.pending {
                return Err(NetifError::Full);
            }
        }
        let Some(addr) = self.free_tx.pop() else {
            return Err(NetifError::Full);
        };
        let Some(buf) = self.umem.frame_mut(addr) else {
            return Err(NetifError::Down);
        };
        buf[..frame.len()].copy_from_slice(frame);
        self.tx.write(
            self.pending,
            XdpDesc {
                addr,
                len: frame.len() as u32,
                options: XdpDescOptions::empty(),
            },
        );
        self.pending += 1;
        Ok(())
    }

    fn tx_buffer(&mut self) -> Option<&mut [u8]> {
        if self.free_tx.is_empty() {
            self.reap_completions();
        }
        if self.tx.free(self.pending + 1) <= self.pending {
            self.flush();
            if self.tx.free(self.pending + 1) <= self.pending {
                return None;
            }
        }
        let addr = *self.free_tx.last()?;
        self.umem.frame_mut(addr)
    }

    fn commit(&mut self, len: usize) -> Result<(), NetifError> {
        if len > FRAME {
            return Err(NetifError::TooLarge(len));
        }
        // `tx_buffer` checked the ring's room and lent the top of the free list.
        let Some(addr) = self.free_tx.pop() else {
            return Err(NetifError::Full);
        };
        self.tx.write(
            self.pending,
            XdpDesc {
                addr,
                len: len as u32,
                options: XdpDescOptions::empty(),
            },
        );
        self.pending += 1;
        Ok(())
    }

    fn flush(&mut self) {
        if self.pending > 0 {
            self.tx.submit(self.pending);
            self.pending = 0;
        }
        // Kick only while the kernel has frames left on the TX ring (in copy mode each kick
        // sends a bounded batch and says EAGAIN while more are left); an idle pass makes no
        // system call.
        for _ in 0..16 {
            if !self.tx.outstanding() || (self.zerocopy && !self.tx.needs_wakeup()) {
                break;
            }
            // `sendto(fd, NULL, 0, MSG_DONTWAIT)` is the kick.
            match rustix::net::send(&self.fd, &[], SendFlags::DONTWAIT) {
                Ok(_) | Err(Errno::AGAIN | Errno::BUSY | Errno::NOBUFS) => continue,
                // The socket was unbound: its interface is gone.
                Err(Errno::NXIO) => {
                    if self.failed.is_none() {
                        self.failed = Some(format!(
                            "AF_XDP on {}: the socket lost its interface (was it deleted?)",
                            self.ifname
                        ));
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        self.reap_completions();
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn send_gso(
        &mut self,
        headers: &[u8],
        payload: &[u8],
        gso: &super::packet::Gso,
    ) -> Result<bool, NetifError> {
        if self.gso.is_none() {
            return Ok(false);
        }
        // What was queued before goes first (the kick sends it in copy mode).
        if self.pending > 0 || self.tx.outstanding() {
            self.flush();
        }
        match self.gso.as_ref().map(|g| g.send(headers, payload, gso)) {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Err(NetifError::Full),
            Some(Err(e)) => {
                tracing::warn!(ifname = %self.ifname, error = %e, "kernel segmentation failed; the nexus segments TCP itself from now on");
                self.gso = None;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn housekeeping(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let now = std::fs::read_to_string(&self.sysfs_ifindex)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if now != Some(self.ifindex) {
            self.failed = Some(format!(
                "AF_XDP on {}: the interface is gone (deleted, renamed or moved to another \
                 namespace)",
                self.ifname
            ));
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        match sockopt::xdp_statistics(&self.fd) {
            Ok(s) => vec![
                ("xsk_rx_dropped", s.rx_dropped),
                ("xsk_rx_invalid_descs", s.rx_invalid_descs),
                ("xsk_tx_invalid_descs", s.tx_invalid_descs),
                ("xsk_rx_ring_full", s.rx_ring_full.unwrap_or(0)),
                (
                    "xsk_rx_fill_ring_empty",
                    s.rx_fill_ring_empty_descs.unwrap_or(0),
                ),
            ],
            Err(_) => Vec::new(),
        }
    }

    fn steering(&self) -> Option<Box<dyn crate::netns::Steering>> {
        Some(Box::new(self.claims()))
    }
}
