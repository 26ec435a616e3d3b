//! What the nexus asks the kernel over rtnetlink: an interface's addresses, the route to a
//! destination, and the MAC address of a neighbour (and to resolve one it lacks).
//!
//! Every request is one synchronous round trip on a private socket. The flowswitch caches the
//! answers ([`crate::flowswitch::neighbour::KernelNeighbours`]), so the datapath asks only on
//! a miss or when an entry has aged.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A route's next hop toward a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The gateway, or `None` when the destination is on the link.
    pub gateway: Option<IpAddr>,
    /// The interface the route leaves by.
    pub oif: Option<u32>,
}

/// A private rtnetlink socket.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

impl Rtnl {
    /// Opens the socket.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// Sends one request and collects its replies (until the dump's end, the ACK or the one
    /// answer of a plain get).
    fn ask(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let multi = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let bytes = &self.buf[off..n];
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "empty netlink message",
                    ));
                }
                off += len.next_multiple_of(4);
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !multi && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The addresses of interface `ifindex`.
    pub fn addresses(&mut self, ifindex: u32) -> io::Result<Vec<IpAddr>> {
        let replies = self.ask(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut addrs = Vec::new();
        for r in replies {
            if let RouteNetlinkMessage::NewAddress(m) = r
                && m.header.index == ifindex
            {
                // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
                // otherwise.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(addr) {
                    addrs.push(ip);
                }
            }
        }
        Ok(addrs)
    }

    /// The kernel's route to `dst` (`ip route get`).
    pub fn route(&mut self, dst: IpAddr) -> io::Result<Route> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst);
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let replies = self.ask(RouteNetlinkMessage::GetRoute(m), 0)?;
        let mut route = Route {
            gateway: None,
            oif: None,
        };
        for r in replies {
            if let RouteNetlinkMessage::NewRoute(m) = r {
                for a in m.attributes {
                    match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                            route.gateway = Some(ip.into());
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => {
                            route.gateway = Some(ip.into());
                        }
                        RouteAttribute::Oif(i) => route.oif = Some(i),
                        _ => {}
                    }
                }
            }
        }
        Ok(route)
    }

    /// The MAC address the kernel has for `ip` on `ifindex`, if its entry is usable.
    pub fn neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<Option<[u8; 6]>> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = ifindex;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        let replies = match self.ask(RouteNetlinkMessage::GetNeighbour(m), 0) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in replies {
            if let RouteNetlinkMessage::NewNeighbour(m) = r
                && matches!(
                    m.header.state,
                    NeighbourState::Reachable
                        | NeighbourState::Stale
                        | NeighbourState::Delay
                        | NeighbourState::Probe
                        | NeighbourState::Permanent
                        | NeighbourState::Noarp
                )
            {
                for a in m.attributes {
                    if let NeighbourAttribute::LinkLayerAddress(ll) = a
                        && let Ok(mac) = <[u8; 6]>::try_from(ll.as_slice())
                    {
                        return Ok(Some(mac));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Asks the kernel to resolve `ip` on `ifindex` (ARP or neighbour discovery), as if it had
    /// a packet for it (`NTF_USE`). The answer arrives later in the neighbour table.
    pub fn resolve(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = ifindex;
        m.header.flags = NeighbourFlags::Use;
        m.header.state = NeighbourState::None;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        self.ask(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_address_and_a_direct_route() {
        let mut nl = Rtnl::open().expect("netlink socket");
        let addrs = nl.addresses(1).expect("addresses of lo");
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
        let r = nl.route(IpAddr::from([127, 0, 0, 1])).expect("route");
        assert_eq!(r.gateway, None);
        assert_eq!(r.oif, Some(1));
    }
}
