//! Routes and neighbours from the kernel, asked over rtnetlink **without waiting**: the
//! flowswitch's questions ([`Query`]) are sent on a non-blocking socket, and the answers, with
//! every change of the kernel's neighbour table (the socket is subscribed to
//! `RTNLGRP_NEIGH`), are handed to the flowswitch when the socket has something to read. A
//! neighbour the kernel lacks is resolved by the kernel (`NTF_USE`, as if it had a packet for
//! it), and its entry arrives as a change of the table. The datapath never waits for the
//! kernel: a packet without a next hop is held (or dropped) by the flowswitch meanwhile.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use netlink_packet_core::{
    NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::netlink::family;
use crate::flowswitch::neighbour::{Hop, Query};

/// The rtnetlink multicast group of neighbour-table changes.
const RTNLGRP_NEIGH: u32 = 3;
/// Most questions in flight (a flood of new destinations cannot grow the map for ever).
const INFLIGHT_MAX: usize = 4096;

/// What the resolver reports to (the core of a flowswitch).
pub trait Learner {
    /// The kernel's route to `dst`.
    fn on_route(&mut self, dst: IpAddr, hop: Hop, now: Instant);
    /// The kernel's neighbour entry for `ip` on the interface (`None`: not usable).
    fn on_neighbour(&mut self, ip: IpAddr, mac: Option<[u8; 6]>);
}

/// A question sent and not answered yet.
#[derive(Debug, Clone, Copy)]
enum Asked {
    Query(Query),
    /// A request to resolve a neighbour (its answer is the table's next change).
    Resolve,
}

/// Asks the kernel about the next hops of interface `ifindex`.
#[derive(Debug)]
pub struct Resolver {
    sock: Socket,
    ifindex: u32,
    seq: u32,
    inflight: HashMap<u32, Asked>,
    buf: Vec<u8>,
    /// Questions that could not be sent (the socket's buffer was full): they are asked again
    /// by the flowswitch when it next needs the answer.
    pub unsent: u64,
    /// Messages that did not parse, and notifications lost to a full socket buffer.
    pub errors: u64,
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// A neighbour entry's IP address and, if its state makes it usable, its MAC address.
fn neighbour_entry(m: &NeighbourMessage) -> Option<(IpAddr, Option<[u8; 6]>)> {
    let ip = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let usable = matches!(
        m.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(ll) => <[u8; 6]>::try_from(ll.as_slice()).ok(),
        _ => None,
    });
    Some((ip, mac.filter(|_| usable)))
}

impl Resolver {
    /// A non-blocking rtnetlink socket subscribed to the neighbour table's changes.
    pub fn open(ifindex: u32) -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.set_non_blocking(true)?;
        sock.add_membership(RTNLGRP_NEIGH)?;
        Ok(Self {
            sock,
            ifindex,
            seq: 0,
            inflight: HashMap::new(),
            buf: vec![0; 1 << 16],
            unsent: 0,
            errors: 0,
        })
    }

    /// The socket's fd, readable when the kernel has answered or announced a change.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Whether answers are awaited (then the driver reads the socket on every pass).
    pub fn awaiting(&self) -> bool {
        !self.inflight.is_empty()
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16, asked: Asked) {
        self.seq = self.seq.wrapping_add(1).max(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        match self.sock.send_to(&out, &SocketAddr::new(0, 0), 0) {
            Ok(_) => {
                if self.inflight.len() >= INFLIGHT_MAX {
                    self.inflight.clear();
                }
                self.inflight.insert(self.seq, asked);
            }
            Err(e) => {
                self.unsent += 1;
                tracing::debug!(error = %e, "a question for the kernel could not be sent");
            }
        }
    }

    /// Sends one question of the flowswitch.
    pub fn ask(&mut self, q: Query) {
        match q {
            Query::Route(dst) => {
                let mut m = RouteMessage::default();
                m.header.address_family = family(dst);
                m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
                m.attributes
                    .push(RouteAttribute::Destination(RouteAddress::from(dst)));
                self.send(RouteNetlinkMessage::GetRoute(m), 0, Asked::Query(q));
            }
            Query::Neighbour(ip) => {
                let mut m = NeighbourMessage::default();
                m.header.family = family(ip);
                m.header.ifindex = self.ifindex;
                m.attributes
                    .push(NeighbourAttribute::Destination(neighbour_address(ip)));
                self.send(RouteNetlinkMessage::GetNeighbour(m), 0, Asked::Query(q));
            }
        }
    }

    /// Asks the kernel to resolve `ip` (ARP or neighbour discovery), as if it had a packet
    /// for it (`NTF_USE`).
    fn resolve(&mut self, ip: IpAddr) {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = self.ifindex;
        m.header.flags = NeighbourFlags::Use;
        m.header.state = NeighbourState::None;
        m.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(ip)));
        self.send(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            Asked::Resolve,
        );
    }

    /// Reads what the kernel has said (without waiting) and tells `learner`.
    pub fn poll(&mut self, learner: &mut impl Learner, now: Instant) {
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Changes were lost; routes are asked again within seconds anyway.
                    self.errors += 1;
                    continue;
                }
                Err(e) => {
                    self.errors += 1;
                    tracing::debug!(error = %e, "reading the netlink socket");
                    return;
                }
            };
            let mut off = 0;
            let mut resolve = Vec::new();
            while off < n {
                let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                else {
                    self.errors += 1;
                    break;
                };
                let len = msg.header.length as usize;
                if len == 0 {
                    self.errors += 1;
                    break;
                }
                off += len.next_multiple_of(4);
                let asked = self.inflight.remove(&msg.header.sequence_number);
                match (msg.payload, asked) {
                    (
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)),
                        Some(Asked::Query(Query::Route(dst))),
                    ) => {
                        let mut gateway = None;
                        let mut oif = None;
                        for a in &m.attributes {
                            match a {
                                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                                    gateway = Some(IpAddr::V4(*ip));
                                }
                                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => {
                                    gateway = Some(IpAddr::V6(*ip));
                                }
                                RouteAttribute::Oif(i) => oif = Some(*i),
                                _ => {}
                            }
                        }
                        let hop = if oif.is_some_and(|o| o != self.ifindex) {
                            Hop::OtherInterface
                        } else {
                            Hop::Via(gateway.unwrap_or(dst))
                        };
                        learner.on_route(dst, hop, now);
                    }
                    (NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)), a) => {
                        if m.header.ifindex != self.ifindex {
                            continue;
                        }
                        let Some((ip, mac)) = neighbour_entry(&m) else {
                            continue;
                        };
                        learner.on_neighbour(ip, mac);
                        // Asked and not usable: have the kernel resolve it.
                        if mac.is_none() && matches!(a, Some(Asked::Query(Query::Neighbour(_)))) {
                            resolve.push(ip);
                        }
                    }
                    (NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)), _) => {
                        if m.header.ifindex == self.ifindex
                            && let Some((ip, _)) = neighbour_entry(&m)
                        {
                            learner.on_neighbour(ip, None);
                        }
                    }
                    // The kernel has no entry: have it resolve one.
                    (NetlinkPayload::Error(e), Some(Asked::Query(Query::Neighbour(ip))))
                        if e.code.is_some() =>
                    {
                        resolve.push(ip);
                    }
                    _ => {}
                }
            }
            for ip in resolve {
                self.resolve(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Heard {
        routes: Vec<(IpAddr, Hop)>,
    }

    impl Learner for Heard {
        fn on_route(&mut self, dst: IpAddr, hop: Hop, _: Instant) {
            self.routes.push((dst, hop));
        }
        fn on_neighbour(&mut self, _: IpAddr, _: Option<[u8; 6]>) {}
    }

    #[test]
    fn a_route_is_answered_without_waiting_for_it() {
        let mut r = Resolver::open(1).expect("netlink socket");
        let mut heard = Heard::default();
        let lo = IpAddr::from([127, 0, 0, 1]);
        r.ask(Query::Route(lo));
        assert!(r.awaiting());
        let start = Instant::now();
        while heard.routes.is_empty() && start.elapsed() < std::time::Duration::from_secs(5) {
            r.poll(&mut heard, Instant::now());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(heard.routes, [(lo, Hop::Via(lo))]);
        assert!(!r.awaiting());
    }
}
