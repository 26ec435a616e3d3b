//! Where the flowswitch finds the MAC address of a packet's next hop.
//!
//! * [`Neighbours`]: a nexus that stands behind a TAP device is a host of its own: it answers
//!   ARP for its addresses and learns its peers' MAC addresses from their ARP traffic.
//! * [`KernelNeighbours`]: on an interface shared with the kernel (AF_XDP) the kernel keeps
//!   answering ARP and NDP; the nexus asks it for the route and the neighbour over netlink,
//!   caches the answer, and asks the kernel to resolve a neighbour it lacks.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use crate::netns::netlink::Rtnl;

/// Most neighbours remembered.
const CAPACITY: usize = 4096;

/// What an ARP frame asks of us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArpAction {
    /// Send this reply.
    Reply(Vec<u8>),
    /// Nothing to answer (learned, or not for us).
    None,
}

/// The neighbour table.
#[derive(Debug, Default)]
pub struct Neighbours {
    table: HashMap<Ipv4Addr, [u8; 6]>,
}

impl Neighbours {
    /// The MAC address of `ip`, if known.
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.table.get(&ip).copied()
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        if self.table.len() < CAPACITY || self.table.contains_key(&ip) {
            self.table.insert(ip, mac);
        }
    }

    /// Handles an ARP frame (Ethernet/IPv4 only; anything else is ignored): learns the
    /// sender, and answers a request for one of `ours`.
    pub fn on_arp(&mut self, frame: &[u8], our_mac: [u8; 6], ours: &[IpAddr]) -> ArpAction {
        let Some(a) = frame.get(14..42) else {
            return ArpAction::None;
        };
        if a[..6] != [0, 1, 8, 0, 6, 4] {
            return ArpAction::None;
        }
        let oper = u16::from_be_bytes([a[6], a[7]]);
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&a[8..14]);
        let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
        let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
        if !spa.is_unspecified() && sha[0] & 1 == 0 {
            self.learn(spa, sha);
        }
        if oper != 1 || !ours.contains(&IpAddr::V4(tpa)) {
            return ArpAction::None;
        }
        ArpAction::Reply(arp_frame(2, our_mac, tpa, sha, spa, sha))
    }

    /// An ARP request for `target`, from `(our_mac, our_ip)`.
    pub fn request(our_mac: [u8; 6], our_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        arp_frame(1, our_mac, our_ip, [0; 6], target, [0xff; 6])
    }
}

/// How long a kernel answer is trusted before it is asked again.
const FRESH: Duration = Duration::from_secs(5);
/// How soon a neighbour the kernel lacked is asked for again.
const RETRY: Duration = Duration::from_millis(10);

/// Next hops from the kernel's routing and neighbour tables, cached.
#[derive(Debug)]
pub struct KernelNeighbours {
    ifindex: u32,
    rtnl: Option<Rtnl>,
    cache: HashMap<IpAddr, (Option<[u8; 6]>, Instant)>,
}

/// Why a packet has no next hop yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoHop {
    /// The kernel is resolving the neighbour (or cannot).
    Unresolved,
    /// The kernel routes the destination out of another interface.
    OtherInterface,
}

impl KernelNeighbours {
    /// Next hops on interface `ifindex`.
    pub fn new(ifindex: u32) -> Self {
        Self {
            ifindex,
            rtnl: None,
            cache: HashMap::new(),
        }
    }

    /// The MAC address to send a packet for `dst` to: the route's gateway, or `dst` itself
    /// when it is on the link.
    pub fn lookup(&mut self, dst: IpAddr, now: Instant) -> Result<[u8; 6], NoHop> {
        if let Some(&(mac, at)) = self.cache.get(&dst) {
            let age = now.saturating_duration_since(at);
            match mac {
                Some(mac) if age < FRESH => return Ok(mac),
                None if age < RETRY => return Err(NoHop::Unresolved),
                _ => {}
            }
        }
        let answer = self.ask(dst);
        if self.cache.len() >= CAPACITY {
            self.cache.clear();
        }
        self.cache.insert(dst, (answer.ok(), now));
        answer
    }

    fn ask(&mut self, dst: IpAddr) -> Result<[u8; 6], NoHop> {
        if self.rtnl.is_none() {
            match Rtnl::open() {
                Ok(r) => self.rtnl = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "no netlink socket for next hops");
                    return Err(NoHop::Unresolved);
                }
            }
        }
        let Some(nl) = self.rtnl.as_mut() else {
            return Err(NoHop::Unresolved);
        };
        let route = nl.route(dst).map_err(|_| NoHop::Unresolved)?;
        if route.oif.is_some_and(|o| o != self.ifindex) {
            return Err(NoHop::OtherInterface);
        }
        let hop = route.gateway.unwrap_or(dst);
        match nl.neighbour(self.ifindex, hop) {
            Ok(Some(mac)) => Ok(mac),
            _ => {
                if let Err(e) = nl.resolve(self.ifindex, hop) {
                    tracing::debug!(%hop, error = %e, "asking the kernel to resolve a neighbour");
                }
                Err(NoHop::Unresolved)
            }
        }
    }
}

fn arp_frame(
    oper: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
    dst: [u8; 6],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&oper.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const PEER: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn answers_requests_for_our_addresses_and_learns_the_asker() {
        let mut n = Neighbours::default();
        let ours = [IpAddr::from([198, 18, 0, 1])];
        let req = arp_frame(
            1,
            PEER,
            Ipv4Addr::new(198, 18, 0, 2),
            [0; 6],
            Ipv4Addr::new(198, 18, 0, 1),
            [0xff; 6],
        );
        let ArpAction::Reply(r) = n.on_arp(&req, US, &ours) else {
            panic!("no reply")
        };
        assert_eq!(&r[..6], &PEER, "sent to the asker");
        assert_eq!(&r[20..22], &[0, 2], "a reply");
        assert_eq!(&r[22..28], &US, "with our MAC");
        assert_eq!(n.get(Ipv4Addr::new(198, 18, 0, 2)), Some(PEER));
        let other = arp_frame(
            1,
            PEER,
            Ipv4Addr::new(198, 18, 0, 2),
            [0; 6],
            Ipv4Addr::new(198, 18, 0, 9),
            [0xff; 6],
        );
        assert_eq!(n.on_arp(&other, US, &ours), ArpAction::None, "not ours");
        assert_eq!(
            n.on_arp(&req[..30], US, &ours),
            ArpAction::None,
            "truncated"
        );
    }
}
