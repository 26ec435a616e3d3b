//! Where the flowswitch finds the MAC address of a packet's next hop.
//!
//! * [`Neighbours`]: a nexus that stands behind a TAP device is a host of its own: it answers
//!   ARP for its addresses and learns its peers' MAC addresses from their ARP traffic.
//! * [`KernelNeighbours`]: on an interface shared with the kernel (AF_XDP) the kernel keeps
//!   answering ARP and NDP; the flowswitch keeps the routes and neighbours the kernel reported
//!   and queues a [`Query`] for what it lacks, which the driver asks the kernel without
//!   waiting (and keeps current from the kernel's neighbour-table notifications).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

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
    table: HashMap<IpAddr, [u8; 6]>,
}

impl Neighbours {
    /// The MAC address of `ip`, if known.
    pub fn get(&self, ip: IpAddr) -> Option<[u8; 6]> {
        self.table.get(&ip).copied()
    }

    /// Learns `ip` at `mac`. A full table forgets one entry for it, rather than refusing
    /// newcomers for good: an ARP scan with made-up senders would otherwise leave a real peer
    /// unresolvable. (A forgotten peer in use is asked for again.)
    fn learn(&mut self, ip: IpAddr, mac: [u8; 6]) {
        if self.table.len() >= CAPACITY
            && !self.table.contains_key(&ip)
            && let Some(old) = self.table.keys().next().copied()
        {
            self.table.remove(&old);
        }
        self.table.insert(ip, mac);
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
            self.learn(IpAddr::V4(spa), sha);
        }
        if oper != 1 || !ours.contains(&IpAddr::V4(tpa)) {
            return ArpAction::None;
        }
        ArpAction::Reply(arp_frame(2, our_mac, tpa, sha, spa, sha))
    }

    /// Handles an ICMPv6 neighbour solicitation or advertisement (IPv6 in Ethernet, hop limit
    /// 255 as RFC 4861 requires; anything else is ignored): learns the sender's or target's
    /// link-layer address, and answers a solicitation for one of `ours`.
    pub fn on_ndp(&mut self, frame: &[u8], our_mac: [u8; 6], ours: &[IpAddr]) -> ArpAction {
        if frame.len() < NDP_MIN
            || frame[12..14] != [0x86, 0xdd]
            || frame[20] != 58
            || frame[21] != 255
        {
            return ArpAction::None;
        }
        let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
        let Some(icmp) = frame.get(54..54 + payload_len) else {
            return ArpAction::None;
        };
        let src = ipv6_at(frame, 22);
        if icmp.len() < 24 || icmp[1] != 0 || checksum6(&src, &ipv6_at(frame, 38), icmp) != 0 {
            return ArpAction::None;
        }
        let target = ipv6_at(icmp, 8);
        // Link-layer address option: type 1 (source) in a solicitation, 2 (target) in an
        // advertisement.
        let want = match icmp[0] {
            135 => 1,
            136 => 2,
            _ => return ArpAction::None,
        };
        let mut lladdr = None;
        let mut opts = &icmp[24..];
        while opts.len() >= 8 {
            let len = usize::from(opts[1]) * 8;
            if len == 0 || len > opts.len() {
                break;
            }
            if opts[0] == want && len == 8 {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&opts[2..8]);
                lladdr = Some(mac);
            }
            opts = &opts[len..];
        }
        if let Some(mac) = lladdr.filter(|m| m[0] & 1 == 0) {
            let who = if icmp[0] == 135 { src } else { target };
            if !who.is_unspecified() {
                self.learn(IpAddr::V6(who), mac);
            }
        }
        if icmp[0] != 135 || !ours.contains(&IpAddr::V6(target)) {
            return ArpAction::None;
        }
        let mut peer_mac = [0u8; 6];
        peer_mac.copy_from_slice(&frame[6..12]);
        // Solicited and override; to all nodes when the asker has no address yet (DAD).
        let (dst, dst_mac, flags) = if src.is_unspecified() {
            (
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                [0x33, 0x33, 0, 0, 0, 1],
                0x20,
            )
        } else {
            (src, peer_mac, 0x60)
        };
        let mut body = vec![136, 0, 0, 0, flags, 0, 0, 0];
        body.extend_from_slice(&target.octets());
        body.extend_from_slice(&[2, 1]);
        body.extend_from_slice(&our_mac);
        ArpAction::Reply(icmp6_frame(our_mac, dst_mac, target, dst, body))
    }

    /// A neighbour solicitation for `target`, from `(our_mac, our_ip)`, to the target's
    /// solicited-node multicast address.
    pub fn solicit(our_mac: [u8; 6], our_ip: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        let t = target.octets();
        let dst = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        let dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
        let mut body = vec![135, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&t);
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&our_mac);
        icmp6_frame(our_mac, dst_mac, our_ip, dst, body)
    }

    /// An ARP request for `target`, from `(our_mac, our_ip)`.
    pub fn request(our_mac: [u8; 6], our_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        arp_frame(1, our_mac, our_ip, [0; 6], target, [0xff; 6])
    }
}

/// Ethernet + IPv6 + the fixed part of a neighbour message.
const NDP_MIN: usize = 14 + 40 + 24;

fn ipv6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// The ICMPv6 checksum (over the pseudo-header); 0 when `icmp` carries a correct one.
fn checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMPv6 message in IPv6 (hop limit 255) in Ethernet, checksum filled in.
fn icmp6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut body: Vec<u8>,
) -> Vec<u8> {
    let c = checksum6(&src, &dst, &body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(54 + body.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&body);
    f
}

/// How long a route the kernel gave is trusted before it is asked again (meanwhile it is
/// still used: a refresh never holds a packet up).
const FRESH: Duration = Duration::from_secs(5);
/// How soon the same question is asked again when the kernel has not answered it.
const RETRY: Duration = Duration::from_millis(10);

/// A question for the kernel: the driver asks it without waiting, and brings the
/// answer back with [`KernelNeighbours::on_route`] or [`KernelNeighbours::on_neighbour`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Query {
    /// The route to a destination (`ip route get`).
    Route(IpAddr),
    /// The MAC address of a next hop on the interface; if the kernel lacks it, the driver asks
    /// the kernel to resolve it, and the answer comes with the neighbour table's next change.
    Neighbour(IpAddr),
}

/// Where the kernel routes a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Through this next hop on the interface (the destination itself when on the link).
    Via(IpAddr),
    /// Out of another interface.
    OtherInterface,
}

/// Next hops from the kernel's routing and neighbour tables, as the driver reports them. Plain
/// state: no socket, no clock; a miss queues a [`Query`] and the packet waits (or is dropped),
/// so the datapath never waits for the kernel.
#[derive(Debug, Default)]
pub struct KernelNeighbours {
    /// Per destination: its route, when the kernel gave it, and its next hop's MAC address
    /// if known (kept beside the route, so that a packet costs one lookup).
    routes: HashMap<IpAddr, Route>,
    macs: HashMap<IpAddr, [u8; 6]>,
    asked: HashMap<Query, Instant>,
    queries: std::collections::VecDeque<Query>,
}

#[derive(Debug, Clone, Copy)]
struct Route {
    hop: Hop,
    at: Instant,
    mac: Option<[u8; 6]>,
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
    /// The MAC address to send a packet for `dst` to, if known: the route's gateway's, or
    /// `dst`'s own when it is on the link. What is not known is asked.
    pub fn lookup(&mut self, dst: IpAddr, now: Instant) -> Result<[u8; 6], NoHop> {
        let Some(&r) = self.routes.get(&dst) else {
            self.ask(Query::Route(dst), now);
            return Err(NoHop::Unresolved);
        };
        if now.saturating_duration_since(r.at) >= FRESH {
            self.ask(Query::Route(dst), now);
        }
        match (r.hop, r.mac) {
            (Hop::OtherInterface, _) => Err(NoHop::OtherInterface),
            (Hop::Via(_), Some(mac)) => Ok(mac),
            (Hop::Via(h), None) => {
                self.ask(Query::Neighbour(h), now);
                Err(NoHop::Unresolved)
            }
        }
    }

    fn ask(&mut self, q: Query, now: Instant) {
        if let Some(at) = self.asked.get(&q)
            && now.saturating_duration_since(*at) < RETRY
        {
            return;
        }
        if self.asked.len() >= CAPACITY {
            self.asked.clear();
        }
        self.asked.insert(q, now);
        self.queries.push_back(q);
    }

    /// The next question for the kernel.
    pub fn poll_query(&mut self) -> Option<Query> {
        self.queries.pop_front()
    }

    /// The kernel's route to `dst`. Its next hop's MAC address is asked afresh (the neighbour
    /// table's changes keep it current meanwhile).
    pub fn on_route(&mut self, dst: IpAddr, hop: Hop, now: Instant) {
        if self.routes.len() >= CAPACITY && !self.routes.contains_key(&dst) {
            self.routes.clear();
        }
        let mac = match hop {
            Hop::Via(h) => self.macs.get(&h).copied(),
            Hop::OtherInterface => None,
        };
        self.routes.insert(dst, Route { hop, at: now, mac });
        self.asked.remove(&Query::Route(dst));
        if let Hop::Via(h) = hop {
            self.asked.remove(&Query::Neighbour(h));
            self.ask(Query::Neighbour(h), now);
        }
    }

    /// The kernel's neighbour entry for `ip` on the interface: its MAC address, or `None` when
    /// it has none usable (being resolved, failed, deleted). Rare (a change of the kernel's
    /// table), so the routes through it are updated here rather than looked up per packet.
    pub fn on_neighbour(&mut self, ip: IpAddr, mac: Option<[u8; 6]>) {
        match mac {
            Some(mac) => {
                if self.macs.len() >= CAPACITY && !self.macs.contains_key(&ip) {
                    self.macs.clear();
                }
                self.macs.insert(ip, mac);
            }
            None => {
                self.macs.remove(&ip);
            }
        }
        for r in self.routes.values_mut() {
            if r.hop == Hop::Via(ip) {
                r.mac = mac;
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
    fn a_full_table_still_learns_a_real_peer_after_a_scan() {
        let mut n = Neighbours::default();
        let ours = [IpAddr::from([198, 18, 0, 1])];
        let gratuitous = |ip: Ipv4Addr, mac: [u8; 6]| arp_frame(2, mac, ip, US, ip, US);
        for i in 0..CAPACITY as u32 + 10 {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i);
            n.on_arp(&gratuitous(ip, [2, 0, 0, 0, 1, 1]), US, &ours);
        }
        assert!(n.table.len() <= CAPACITY);
        let real = Ipv4Addr::new(198, 18, 0, 2);
        n.on_arp(&gratuitous(real, PEER), US, &ours);
        assert_eq!(n.get(IpAddr::V4(real)), Some(PEER));
    }

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
        assert_eq!(n.get(IpAddr::from([198, 18, 0, 2])), Some(PEER));
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

    #[test]
    fn answers_solicitations_for_our_ipv6_addresses_and_learns_the_asker() {
        let mut n = Neighbours::default();
        let us: Ipv6Addr = "fd00:198:18::1".parse().expect("addr");
        let peer: Ipv6Addr = "fd00:198:18::2".parse().expect("addr");
        let ours = [IpAddr::V6(us)];
        let ns = Neighbours::solicit(PEER, peer, us);
        assert_eq!(
            &ns[..6],
            &[0x33, 0x33, 0xff, 0, 0, 1],
            "to the solicited-node group"
        );
        let ArpAction::Reply(na) = n.on_ndp(&ns, US, &ours) else {
            panic!("no advertisement")
        };
        assert_eq!(&na[..6], &PEER, "sent to the asker");
        assert_eq!(na[54], 136, "an advertisement");
        assert_eq!(na[58] & 0x40, 0x40, "solicited");
        assert_eq!(&na[78 + 2..78 + 8], &US, "with our MAC");
        assert_eq!(n.get(IpAddr::V6(peer)), Some(PEER));
        // The advertisement is valid NDP: a peer learns us from it.
        let mut other = Neighbours::default();
        assert_eq!(other.on_ndp(&na, PEER, &[]), ArpAction::None);
        assert_eq!(other.get(IpAddr::V6(us)), Some(US));
        // Not ours, a bad checksum, a forwarded one (hop limit < 255), truncated: ignored.
        let stranger = Neighbours::solicit(PEER, peer, "fd00:198:18::9".parse().expect("addr"));
        assert_eq!(n.on_ndp(&stranger, US, &ours), ArpAction::None);
        let mut bad = ns.clone();
        bad[60] ^= 1;
        assert_eq!(n.on_ndp(&bad, US, &ours), ArpAction::None);
        let mut hops = ns.clone();
        hops[21] = 64;
        assert_eq!(n.on_ndp(&hops, US, &ours), ArpAction::None);
        for cut in 0..ns.len() {
            assert_eq!(
                n.on_ndp(&ns[..cut], US, &ours),
                ArpAction::None,
                "cut at {cut}"
            );
        }
    }
}
