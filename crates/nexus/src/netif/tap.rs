//! The TAP backend: the nexus owns a TAP device and exchanges Ethernet frames with the kernel
//! through it. The nexus stands *behind* the device as a host of its own (its own MAC and
//! addresses); the kernel side of the device is its peer.

#![allow(unsafe_code)] // TUNSETIFF has no safe wrapper; one documented block below.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{Opcode, Updater, ioctl};

use super::{Netif, NetifError};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: Opcode = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
/// Frames read per receive batch.
const BATCH: usize = 64;
/// Largest frame read (1500-byte MTU plus the Ethernet header and a VLAN tag).
const FRAME: usize = 1522;

/// `struct ifreq` as TUNSETIFF reads and writes it (name, then a union whose first member is
/// the flags).
#[repr(C)]
#[derive(Debug)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Why a TAP device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty or longer than 15 bytes.
    #[error("interface name {0:?} must be 1 to 15 bytes")]
    Name(String),
    /// A system call failed.
    #[error("{op}: {source} (TAP devices need root or CAP_NET_ADMIN and /dev/net/tun)")]
    Sys {
        /// What failed.
        op: &'static str,
        /// The OS error.
        source: rustix::io::Errno,
    },
}

/// A TAP device owned by the nexus.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    mac: [u8; 6],
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    /// Why the device stopped working for good (deleted under the nexus: reads fail with
    /// EBADFD and the fd polls as in error for ever).
    failed: Option<String>,
}

impl Tap {
    /// Creates (or attaches to) TAP device `name`; the nexus behind it uses `mac`.
    pub fn create(name: &str, mac: [u8; 6]) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name(name.into()));
        }
        let fd = rustix::fs::open(
            "/dev/net/tun",
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| TapError::Sys {
            op: "open /dev/net/tun",
            source,
        })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out exactly
        // (40 bytes, name first, flags at offset 16); `req` outlives the call.
        unsafe { ioctl(&fd, Updater::<TUNSETIFF, IfReq>::new(&mut req)) }.map_err(|source| {
            TapError::Sys {
                op: "TUNSETIFF",
                source,
            }
        })?;
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Ok(Self {
            fd,
            name,
            mac,
            bufs: vec![vec![0; FRAME]; BATCH],
            lens: vec![0; BATCH],
            failed: None,
        })
    }

    /// The device's name (the kernel's choice if a pattern like `tap%d` was given).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Netif for Tap {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> usize {
        let mut n = 0;
        while n < max.min(BATCH) && self.failed.is_none() {
            match rustix::io::read(&self.fd, &mut self.bufs[n][..]) {
                Ok(len) if len > 0 => {
                    self.lens[n] = len;
                    n += 1;
                }
                // Nothing now, or a moment's shortage; anything else does not pass.
                Ok(_)
                | Err(
                    rustix::io::Errno::AGAIN
                    | rustix::io::Errno::INTR
                    | rustix::io::Errno::NOBUFS
                    | rustix::io::Errno::NOMEM,
                ) => break,
                Err(e) => {
                    let why = format!("TAP device {}: read: {e} (was it deleted?)", self.name);
                    self.failed = Some(why);
                    break;
                }
            }
        }
        if n > 0 {
            let frames: Vec<&[u8]> = (0..n).map(|i| &self.bufs[i][..self.lens[i]]).collect();
            f(&frames);
        }
        n
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), NetifError> {
        if frame.len() > FRAME {
            return Err(NetifError::TooLarge(frame.len()));
        }
        match rustix::io::write(&self.fd, frame) {
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::AGAIN) => Err(NetifError::Full),
            Err(_) => Err(NetifError::Down),
        }
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const _: () = assert!(size_of::<IfReq>() == 40);

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        assert!(matches!(
            Tap::create("", [2, 0, 0, 0, 0, 1]),
            Err(TapError::Name(_))
        ));
        assert!(matches!(
            Tap::create("a-name-that-is-too-long", [2, 0, 0, 0, 0, 1]),
            Err(TapError::Name(_))
        ));
    }
}
