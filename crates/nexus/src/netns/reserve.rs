//! Port reservations: a bound (never listening) kernel socket per claimed (protocol, address,
//! port).
//!
//! * Port 0 lets the kernel choose an ephemeral port; [`Reservation::local`] says which.
//! * IPv6 reservations are `IPV6_V6ONLY`, as the flow table keeps the two families apart: a
//!   flow on `[::]:p` does not claim `0.0.0.0:p`.
//! * TCP reservations are bound but never listen, so the kernel accepts no connection on them;
//!   the nexus's XDP program steers the port's packets to the flowswitch before the kernel sees
//!   them.
//! * Dropping the reservation closes the socket and frees the port.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

use crate::flow::Proto;

/// A claimed (protocol, address, port), held until dropped.
#[derive(Debug)]
pub struct Reservation {
    proto: Proto,
    local: SocketAddr,
    _sock: OwnedFd,
}

impl Reservation {
    /// Protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The address and port actually held (the kernel's choice when port 0 was asked for).
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

/// Why a port could not be reserved.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The host (or another reservation) already holds it.
    #[error("{proto:?} {local} is already in use{}", holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default())]
    InUse {
        /// Protocol.
        proto: Proto,
        /// The address asked for.
        local: SocketAddr,
        /// The holding process (`name[pid]`), when it can be found.
        holder: Option<String>,
    },
    /// The address is not one of the host's.
    #[error("{0} is not an address of this host")]
    NotLocal(SocketAddr),
    /// The port was reserved but its traffic could not be steered to the nexus.
    #[error("steering {local} to the nexus: {source}")]
    Steering {
        /// The address reserved.
        local: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Another system error.
    #[error("reserving {local}: {op}: {source}")]
    Sys {
        /// The address asked for.
        local: SocketAddr,
        /// What failed.
        op: &'static str,
        /// The OS error.
        source: rustix::io::Errno,
    },
}

/// Reserves `local` for `proto` in the host's port space.
pub fn reserve(proto: Proto, local: SocketAddr) -> Result<Reservation, ReserveError> {
    let sys = |op| move |source| ReserveError::Sys { local, op, source };
    let family = if local.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let ty = match proto {
        Proto::Udp => SocketType::DGRAM,
        Proto::Tcp => SocketType::STREAM,
    };
    let sock =
        rustix::net::socket_with(family, ty, SocketFlags::CLOEXEC, None).map_err(sys("socket"))?;
    if local.is_ipv6() {
        sockopt::set_ipv6_v6only(&sock, true).map_err(sys("IPV6_V6ONLY"))?;
    }
    match rustix::net::bind(&sock, &local) {
        Ok(()) => {}
        Err(rustix::io::Errno::ADDRINUSE) => {
            return Err(ReserveError::InUse {
                proto,
                local,
                holder: holder_of(proto, local),
            });
        }
        Err(rustix::io::Errno::ADDRNOTAVAIL) => return Err(ReserveError::NotLocal(local)),
        Err(e) => return Err(sys("bind")(e)),
    }
    let bound = rustix::net::getsockname(&sock).map_err(sys("getsockname"))?;
    let local = SocketAddr::try_from(bound)
        .map_err(|_| sys("getsockname")(rustix::io::Errno::AFNOSUPPORT))?;
    Ok(Reservation {
        proto,
        local,
        _sock: sock,
    })
}

/// Finds the process holding a port, from `/proc/net/{udp,tcp}{,6}` and `/proc/*/fd`. Best
/// effort: `None` when it cannot be seen (another network namespace, no permission).
fn holder_of(proto: Proto, local: SocketAddr) -> Option<String> {
    let table = match (proto, local.is_ipv4()) {
        (Proto::Udp, true) => "/proc/net/udp",
        (Proto::Udp, false) => "/proc/net/udp6",
        (Proto::Tcp, true) => "/proc/net/tcp",
        (Proto::Tcp, false) => "/proc/net/tcp6",
    };
    let port = format!(":{:04X}", local.port());
    let text = std::fs::read_to_string(table).ok()?;
    let inodes: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1)?.ends_with(&port)).then(|| f.get(9).map(|s| (*s).to_owned()))?
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if inodes.iter().any(|i| link == format!("socket:[{i}]")) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Some(format!("{}[{pid}]", comm.trim()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn port_zero_gets_an_ephemeral_port_released_on_drop() {
        let r = reserve(Proto::Udp, sa("127.0.0.1:0")).unwrap();
        let port = r.local().port();
        assert_ne!(port, 0);
        assert!(
            UdpSocket::bind(("127.0.0.1", port)).is_err(),
            "the host cannot take it"
        );
        drop(r);
        UdpSocket::bind(("127.0.0.1", port)).expect("released on drop");
    }

    #[test]
    fn a_port_the_host_holds_is_refused_naming_the_holder() {
        let host = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = host.local_addr().unwrap();
        match reserve(Proto::Udp, local) {
            Err(ReserveError::InUse { holder, .. }) => {
                let h = holder.expect("our own process is visible");
                assert!(h.ends_with(&format!("[{}]", std::process::id())), "{h}");
            }
            other => panic!("expected InUse, got {other:?}"),
        }
    }

    #[test]
    fn wildcard_against_specific_both_orders() {
        let r = reserve(Proto::Udp, sa("0.0.0.0:0")).unwrap();
        let p = r.local().port();
        assert!(UdpSocket::bind(("127.0.0.1", p)).is_err());
        drop(r);
        let host = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = host.local_addr().unwrap().port();
        assert!(matches!(
            reserve(Proto::Udp, SocketAddr::from(([0, 0, 0, 0], p))),
            Err(ReserveError::InUse { .. })
        ));
    }

    #[test]
    fn protocols_and_families_are_separate() {
        let r = reserve(Proto::Udp, sa("127.0.0.1:0")).unwrap();
        let p = r.local().port();
        TcpListener::bind(("127.0.0.1", p)).expect("TCP is not UDP");
        let v6 = reserve(Proto::Udp, SocketAddr::from(([0u16; 8], p)))
            .expect("v6-only does not clash with v4");
        assert_eq!(v6.local().port(), p);
        let t = reserve(Proto::Tcp, sa("127.0.0.1:0")).unwrap();
        assert!(
            TcpListener::bind(t.local()).is_err(),
            "a TCP reservation holds the port"
        );
        assert!(matches!(
            reserve(Proto::Udp, sa("198.18.255.254:0")),
            Err(ReserveError::NotLocal(_))
        ));
    }
}
