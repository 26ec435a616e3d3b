//! The XDP program that shares an interface between the nexus and the kernel.
//!
//! It steers only claimed (protocol, address, port) traffic to the nexus's AF_XDP sockets and
//! passes everything else to the kernel, so ARP, ICMP and every other socket keep working on
//! the same interface. It is built from raw instructions ([`program`]), loaded with bpf(2)
//! ([`bpf`]) and attached through a BPF link, so it is detached when the nexus exits, however
//! it exits. The claims map follows the host-port reservations ([`Claims`]); the frags map is
//! the program's own (it remembers, for the reassembly timeout, the fragmented datagrams it
//! steered, so their later fragments, which carry no ports, follow: see [`program`]).

pub mod bpf;
pub mod program;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

pub use bpf::XdpMode;
use rustix::io::Errno;

use crate::flowswitch::Proto;
use crate::netns::Steering;

/// Most claims the map holds (one per reservation, not per flow).
const MAX_CLAIMS: u32 = 65_536;
/// Most fragmented datagrams the frags map remembers at once (the oldest are forgotten first;
/// any older than `program::FRAG_MAX_AGE` are not followed any more).
const MAX_FRAGMENTED: u32 = 4096;

/// Why the XDP program could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// A map could not be made.
    #[error("creating the {what} map: {source} (XDP needs root or CAP_BPF and CAP_NET_ADMIN)")]
    Map {
        /// Which map.
        what: &'static str,
        /// The OS error.
        source: Errno,
    },
    /// The verifier refused the program.
    #[error(transparent)]
    Load(#[from] bpf::LoadError),
    /// The program could not be attached.
    #[error(
        "attaching XDP to interface {ifindex} ({mode:?}): {source}{}",
        if *source == Errno::BUSY { " (another XDP program is attached: remove it first)" } else { "" }
    )]
    Attach {
        /// The interface.
        ifindex: u32,
        /// The mode tried last.
        mode: XdpMode,
        /// The OS error.
        source: Errno,
    },
}

/// The loaded, attached program and its maps.
#[derive(Debug)]
pub struct XdpProgram {
    claims: Arc<OwnedFd>,
    xsks: OwnedFd,
    _frags: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
    mode: XdpMode,
}

impl XdpProgram {
    /// Loads the steering program and attaches it to `ifindex`: in `mode` if given, else
    /// natively when the driver can, generically otherwise. `queues` is the size of the socket
    /// map (one AF_XDP socket per receive queue).
    pub fn attach(ifindex: u32, queues: u32, mode: Option<XdpMode>) -> Result<Self, XdpError> {
        let claims = bpf::map_create(
            bpf::MapType::Hash,
            program::KEY_SIZE as u32,
            4,
            MAX_CLAIMS,
            "nc_claims",
        )
        .map_err(|source| XdpError::Map {
            what: "claims",
            source,
        })?;
        let frags = bpf::map_create(
            bpf::MapType::LruHash,
            program::FRAG_KEY_SIZE as u32,
            program::FRAG_VALUE_SIZE as u32,
            MAX_FRAGMENTED,
            "nc_frags",
        )
        .map_err(|source| XdpError::Map {
            what: "frags",
            source,
        })?;
        let xsks = bpf::map_create(bpf::MapType::XskMap, 4, 4, queues.max(1), "nc_xsks").map_err(
            |source| XdpError::Map {
                what: "socket",
                source,
            },
        )?;
        // The later fragments of a datagram are steered as long as the nexus would wait for
        // them: the reassembly timeout's default (see `program::FRAG_MAX_AGE`).
        let insns = program::steering(
            claims.as_raw_fd(),
            frags.as_raw_fd(),
            xsks.as_raw_fd(),
            program::FRAG_MAX_AGE,
        );
        let prog = bpf::prog_load_xdp(&insns, "nc_steer")?;
        let modes: &[XdpMode] = match mode {
            Some(XdpMode::Native) => &[XdpMode::Native],
            Some(XdpMode::Generic) => &[XdpMode::Generic],
            None => &[XdpMode::Native, XdpMode::Generic],
        };
        let mut last = Errno::INVAL;
        for &m in modes {
            match bpf::link_xdp(prog.as_fd(), ifindex, m) {
                Ok(link) => {
                    tracing::info!(ifindex, mode = ?m, "XDP program attached");
                    return Ok(Self {
                        claims: Arc::new(claims),
                        xsks,
                        _frags: frags,
                        _prog: prog,
                        _link: link,
                        mode: m,
                    });
                }
                Err(e) => {
                    tracing::debug!(ifindex, mode = ?m, error = %e, "XDP attach failed");
                    last = e;
                }
            }
        }
        Err(XdpError::Attach {
            ifindex,
            mode: modes[modes.len() - 1],
            source: last,
        })
    }

    /// How the program is attached.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// Steers queue `queue`'s claimed frames to socket `xsk`.
    pub fn add_socket(&self, queue: u32, xsk: BorrowedFd<'_>) -> Result<(), Errno> {
        let fd = xsk.as_raw_fd() as u32;
        bpf::map_update(self.xsks.as_fd(), &queue.to_ne_bytes(), &fd.to_ne_bytes())
    }

    /// A handle that keeps the claims map in step with the host-port reservations.
    pub fn claims(&self) -> Claims {
        Claims {
            map: self.claims.clone(),
            users: HashMap::new(),
        }
    }
}

/// The claims map as the port space sees it: a claim per reservation, counted, so two
/// reservations of one key (which the flow table never makes, but cheaply guarded) share it.
#[derive(Debug)]
pub struct Claims {
    map: Arc<OwnedFd>,
    users: HashMap<[u8; program::KEY_SIZE], u32>,
}

impl Steering for Claims {
    fn claim(&mut self, proto: Proto, local: SocketAddr) -> std::io::Result<()> {
        let key = program::claim_key(proto as u8, local.ip(), local.port());
        if let Some(n) = self.users.get_mut(&key) {
            *n += 1;
            return Ok(());
        }
        bpf::map_update(self.map.as_fd(), &key, &1u32.to_ne_bytes()).map_err(|e| {
            std::io::Error::other(format!("steering {proto:?} {local} to the nexus: {e}"))
        })?;
        self.users.insert(key, 1);
        Ok(())
    }

    fn release(&mut self, proto: Proto, local: SocketAddr) {
        let key = program::claim_key(proto as u8, local.ip(), local.port());
        if let Some(n) = self.users.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&key);
                if let Err(e) = bpf::map_delete(self.map.as_fd(), &key) {
                    tracing::warn!(?proto, %local, error = %e, "could not remove an XDP claim");
                }
            }
        }
    }
}
