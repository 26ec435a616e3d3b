//! Turning off an interface's offloads (transmit checksum, scatter-gather, TSO, GSO, GRO, UFO),
//! so that every frame the kernel hands the nexus is a single, fully checksummed wire frame.
//!
//! This speaks the legacy ethtool ioctl (`SIOCETHTOOL` with one `struct ethtool_value` per
//! feature) on a plain AF_INET datagram socket, so no `ethtool` binary is needed. The ioctl
//! names the interface in the network namespace of the *socket*; [`disable_offloads_in`] opens
//! the socket from a short-lived thread that has entered the target namespace, so the calling
//! thread's namespace never changes.

#![allow(unsafe_code)] // SIOCETHTOOL has no safe wrapper; one documented block below.

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, Updater, ioctl};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// `SIOCETHTOOL` (`linux/sockios.h`).
const SIOCETHTOOL: Opcode = 0x8946;

/// Legacy ethtool commands on one `struct ethtool_value` (`linux/ethtool.h`).
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GSG: u32 = 0x18;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SUFO: u32 = 0x22;
const ETHTOOL_GGSO: u32 = 0x23;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// Where named network namespaces live (`ip netns add NAME` makes `/run/netns/NAME`).
const NETNS_DIR: &str = "/run/netns";

/// The features [`disable_offloads`] turns off, dependents first (TSO needs scatter-gather,
/// which needs transmit checksumming), with their set command and name.
const FEATURES: [(u32, &str); 6] = [
    (ETHTOOL_STSO, "tcp-segmentation-offload"),
    (ETHTOOL_SUFO, "udp-fragmentation-offload"),
    (ETHTOOL_SGSO, "generic-segmentation-offload"),
    (ETHTOOL_SGRO, "generic-receive-offload"),
    (ETHTOOL_SSG, "scatter-gather"),
    (ETHTOOL_STXCSUM, "tx-checksumming"),
];

/// `struct ethtool_value`.
#[repr(C)]
#[derive(Debug)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` as SIOCETHTOOL reads it: the name, then a union whose member `ifr_data`
/// points at the ethtool command. The padding makes it at least `sizeof(struct ifreq)` (40
/// bytes on 64-bit targets, 32 on 32-bit ones), all of which the kernel copies in.
#[repr(C)]
#[derive(Debug)]
struct IfReq {
    name: [u8; 16],
    data: *mut EthtoolValue,
    _pad: [u8; 24 - size_of::<usize>()],
}

/// Why offloads could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// The interface name is empty, longer than 15 bytes or holds a NUL.
    #[error("interface name {0:?} must be 1 to 15 bytes without NUL")]
    Name(String),
    /// The namespace name is not a plain name under `/run/netns`.
    #[error("network namespace name {0:?} must be a plain name (as in `ip netns add NAME`)")]
    NetnsName(String),
    /// The namespace could not be opened or entered.
    #[error(
        "{op} {path}: {source} (the namespace must exist, see `ip netns list`; entering it \
         needs root or CAP_SYS_ADMIN)"
    )]
    Netns {
        /// What failed.
        op: &'static str,
        /// The namespace's file.
        path: String,
        /// The OS error.
        source: Errno,
    },
    /// No interface of that name in the namespace.
    #[error(
        "no interface {0:?} in this network namespace (check `ip link`, or `ip -n NS link` for \
         a named namespace)"
    )]
    NoInterface(String),
    /// Changing features needs privilege.
    #[error("changing the offloads of {0:?} needs root or CAP_NET_ADMIN in its network namespace")]
    Permission(String),
    /// Any other failure of a system call.
    #[error("{op} on {ifname:?}: {source}")]
    Sys {
        /// What failed (the socket, or the ethtool feature).
        op: &'static str,
        /// The interface.
        ifname: String,
        /// The OS error.
        source: Errno,
    },
    /// The helper thread that enters the namespace could not be started.
    #[error("starting the network-namespace helper thread: {0}")]
    Thread(std::io::Error),
    /// The helper thread panicked.
    #[error("the network-namespace helper thread panicked")]
    ThreadPanicked,
}

/// Whether each offload is on, as the legacy ethtool get commands report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadState {
    /// Transmit checksum offload (`ETHTOOL_GTXCSUM`).
    pub tx_checksum: bool,
    /// Scatter-gather (`ETHTOOL_GSG`).
    pub scatter_gather: bool,
    /// TCP segmentation offload, any kind (`ETHTOOL_GTSO`).
    pub tso: bool,
    /// Generic segmentation offload (`ETHTOOL_GGSO`).
    pub gso: bool,
    /// Generic receive offload (`ETHTOOL_GGRO`).
    pub gro: bool,
}

impl OffloadState {
    /// Whether any of the offloads is still on.
    pub fn any_on(&self) -> bool {
        self.tx_checksum || self.scatter_gather || self.tso || self.gso || self.gro
    }
}

/// An AF_INET socket for ethtool ioctls on `ifname`, in the calling thread's namespace.
struct Ethtool<'a> {
    sock: OwnedFd,
    ifname: &'a str,
}

impl<'a> Ethtool<'a> {
    fn open(ifname: &'a str) -> Result<Self, OffloadError> {
        if ifname.is_empty() || ifname.len() > 15 || ifname.contains('\0') {
            return Err(OffloadError::Name(ifname.into()));
        }
        let sock = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|source| OffloadError::Sys {
            op: "socket(AF_INET, SOCK_DGRAM)",
            ifname: ifname.into(),
            source,
        })?;
        Ok(Self { sock, ifname })
    }

    /// Runs one legacy ethtool command; returns the value's `data` afterwards.
    fn command(&self, cmd: u32, data: u32) -> Result<u32, Errno> {
        let mut value = EthtoolValue { cmd, data };
        let mut req = IfReq {
            name: [0; 16],
            data: &mut value,
            _pad: [0; 24 - size_of::<usize>()],
        };
        req.name[..self.ifname.len()].copy_from_slice(self.ifname.as_bytes());
        // SAFETY: SIOCETHTOOL reads one `struct ifreq`, which `IfReq` lays out (name, then the
        // `ifr_data` pointer at offset 16, padded to at least the C size), and then reads and
        // writes the `struct ethtool_value` (two u32s, as `EthtoolValue`) that `ifr_data`
        // points at. The name is NUL-terminated (at most 15 bytes, checked in `open`); `req`
        // and `value` outlive the call and nothing else refers to them during it.
        unsafe {
            ioctl(
                self.sock.as_fd(),
                Updater::<SIOCETHTOOL, IfReq>::new(&mut req),
            )
        }?;
        Ok(value.data)
    }

    fn get(&self, cmd: u32, what: &'static str) -> Result<bool, OffloadError> {
        self.command(cmd, 0)
            .map(|d| d != 0)
            .map_err(|e| self.error(what, e))
    }

    fn error(&self, op: &'static str, source: Errno) -> OffloadError {
        match source {
            Errno::NODEV => OffloadError::NoInterface(self.ifname.into()),
            Errno::PERM | Errno::ACCESS => OffloadError::Permission(self.ifname.into()),
            source => OffloadError::Sys {
                op,
                ifname: self.ifname.into(),
                source,
            },
        }
    }
}

/// Turns off transmit checksum offload, scatter-gather, TSO, UFO, GSO and GRO on `ifname` in
/// the calling thread's network namespace.
///
/// A feature the device cannot change (the kernel answers EOPNOTSUPP, e.g. UFO on any current
/// kernel) is skipped; any other failure stops and is returned. Needs root or CAP_NET_ADMIN.
pub fn disable_offloads(ifname: &str) -> Result<(), OffloadError> {
    let et = Ethtool::open(ifname)?;
    for (cmd, name) in FEATURES {
        match et.command(cmd, 0) {
            Ok(_) => {}
            Err(Errno::OPNOTSUPP) => {
                tracing::debug!(ifname, feature = name, "offload cannot be changed; skipped");
            }
            Err(e) => return Err(et.error(name, e)),
        }
    }
    Ok(())
}

/// [`disable_offloads`] for `ifname` in the named network namespace `/run/netns/<netns>`.
///
/// The work runs on a helper thread that enters the namespace and then ends; the calling
/// thread's namespace does not change. Entering needs root or CAP_SYS_ADMIN.
pub fn disable_offloads_in(netns: &str, ifname: &str) -> Result<(), OffloadError> {
    in_netns(netns, || disable_offloads(ifname))
}

/// Which offloads are on for `ifname` in the calling thread's network namespace. Needs no
/// privilege.
pub fn offload_state(ifname: &str) -> Result<OffloadState, OffloadError> {
    let et = Ethtool::open(ifname)?;
    Ok(OffloadState {
        tx_checksum: et.get(ETHTOOL_GTXCSUM, "tx-checksumming")?,
        scatter_gather: et.get(ETHTOOL_GSG, "scatter-gather")?,
        tso: et.get(ETHTOOL_GTSO, "tcp-segmentation-offload")?,
        gso: et.get(ETHTOOL_GGSO, "generic-segmentation-offload")?,
        gro: et.get(ETHTOOL_GGRO, "generic-receive-offload")?,
    })
}

/// [`offload_state`] for `ifname` in the named network namespace `/run/netns/<netns>`.
pub fn offload_state_in(netns: &str, ifname: &str) -> Result<OffloadState, OffloadError> {
    in_netns(netns, || offload_state(ifname))
}

/// Runs `f` on a helper thread that has entered network namespace `/run/netns/<netns>`.
fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce() -> Result<T, OffloadError> + Send,
) -> Result<T, OffloadError> {
    if netns.is_empty() || netns.contains(['/', '\0']) || netns == "." || netns == ".." {
        return Err(OffloadError::NetnsName(netns.into()));
    }
    let path = format!("{NETNS_DIR}/{netns}");
    let ns = rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| OffloadError::Netns {
        op: "opening",
        path: path.clone(),
        source,
    })?;
    std::thread::scope(|s| {
        let helper = std::thread::Builder::new()
            .name("netns-offload".into())
            .spawn_scoped(s, || {
                // setns changes only this thread's namespace, and the thread ends right after.
                move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                    |source| OffloadError::Netns {
                        op: "entering",
                        path: path.clone(),
                        source,
                    },
                )?;
                f()
            })
            .map_err(OffloadError::Thread)?;
        helper.join().map_err(|_| OffloadError::ThreadPanicked)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(size_of::<IfReq>() == 40);
    const _: () = assert!(size_of::<IfReq>() >= 32);
    const _: () = assert!(size_of::<EthtoolValue>() == 8);

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        assert!(matches!(disable_offloads(""), Err(OffloadError::Name(_))));
        assert!(matches!(
            offload_state("a-name-that-is-too-long"),
            Err(OffloadError::Name(_))
        ));
        assert!(matches!(
            disable_offloads_in("../etc", "eth0"),
            Err(OffloadError::NetnsName(_))
        ));
        assert!(matches!(
            disable_offloads_in("", "eth0"),
            Err(OffloadError::NetnsName(_))
        ));
    }

    #[test]
    fn a_missing_namespace_is_reported() {
        let err = disable_offloads_in("nc-offload-no-such-namespace", "eth0").unwrap_err();
        assert!(
            matches!(err, OffloadError::Netns { op: "opening", .. }),
            "{err}"
        );
    }

    /// Runs `ip ARGS`, panicking with its output on failure.
    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("running ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes the test namespace (and with it the veth pair) however the test ends.
    struct NetnsGuard(String);

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }

    #[test]
    fn offloads_are_turned_off_inside_a_namespace() {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: offloads_are_turned_off_inside_a_namespace needs root");
            return;
        }
        let ns = format!("nc-offload-test-{}", std::process::id());
        ip(&["netns", "add", &ns]);
        let _guard = NetnsGuard(ns.clone());
        ip(&[
            "-n", &ns, "link", "add", "ncoff0", "type", "veth", "peer", "name", "ncoff1",
        ]);
        ip(&["-n", &ns, "addr", "add", "198.18.77.1/30", "dev", "ncoff0"]);
        ip(&["-n", &ns, "link", "set", "ncoff0", "up"]);
        ip(&["-n", &ns, "link", "set", "ncoff1", "up"]);

        let before = offload_state_in(&ns, "ncoff0").unwrap();
        println!("before: {before:?}");
        disable_offloads_in(&ns, "ncoff0").unwrap();
        let after = offload_state_in(&ns, "ncoff0").unwrap();
        assert!(!after.tx_checksum, "{after:?}");
        assert!(!after.tso, "{after:?}");
        assert!(!after.gso, "{after:?}");
        assert!(!after.scatter_gather, "{after:?}");
        assert!(!after.gro, "{after:?}");
        assert!(!after.any_on());
        // The peer was not touched.
        let peer = offload_state_in(&ns, "ncoff1").unwrap();
        assert_eq!(peer, before, "the peer's offloads changed");

        // The interface does not exist in this thread's (the host's) namespace.
        assert!(matches!(
            offload_state("ncoff0"),
            Err(OffloadError::NoInterface(_))
        ));
        assert!(matches!(
            disable_offloads_in(&ns, "ncoff-none"),
            Err(OffloadError::NoInterface(_))
        ));
    }
}
