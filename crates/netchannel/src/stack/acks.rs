//! Thinning of queued pure ACKs: a pure ACK waiting in the stack's receive queue is dropped
//! when a later pure ACK of the same connection, acknowledging more, joins the queue.
//!
//! A server sending to many peers at once receives an ACK for every two segments of each;
//! when the stack falls behind for a moment (a thread descheduled on a small machine), those
//! ACKs pile up in the queue, each in a pool buffer, until the pool is empty and the nexus
//! drops what comes next (`rx_no_buf`): the peers' data and the last ACKs of a transfer,
//! which smoltcp then waits a whole second (its least retransmission timeout) to recover. An
//! ACK's news is cumulative, so the older of two carries nothing the newer does not (as with
//! a stretch ACK), and its buffer goes back to the nexus at once.
//!
//! Only what is safe to lose is dropped: ACKs with no payload, no flag but ACK, no SACK
//! blocks, whose acknowledgement number the later one strictly passes (by less than 2^30: an
//! injected ACK far out of any window displaces nothing). A run of duplicate ACKs (the same
//! number: the fast-retransmit signal) stays whole but for its last, and only when a later
//! ACK acknowledges more, that is, once the hole they signal is filled. Window updates
//! without new data acknowledged are kept, as is everything with a payload, SYN, FIN, RST,
//! URG or ECN flags.

use std::collections::HashMap;

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, TcpSeqNumber};

/// One direction of a TCP connection, as the peer sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Conn {
    src: IpAddress,
    dst: IpAddress,
    src_port: u16,
    dst_port: u16,
}

/// The TCP segment of IP packet `ip`, with its addresses (`None` for anything else, a
/// fragment, or IPv6 with extension headers).
pub(super) fn tcp_in(ip: &[u8]) -> Option<(IpAddress, IpAddress, TcpPacket<&[u8]>)> {
    let (src, dst, l4) = match ip.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(ip).ok()?;
            if p.next_header() != IpProtocol::Tcp || p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            let h = usize::from(p.header_len());
            let end = usize::from(p.total_len());
            (
                IpAddress::Ipv4(p.src_addr()),
                IpAddress::Ipv4(p.dst_addr()),
                ip.get(h..end)?,
            )
        }
        6 => {
            let p = Ipv6Packet::new_checked(ip).ok()?;
            // Extension headers: not worth walking for this.
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            let end = 40 + usize::from(p.payload_len());
            (
                IpAddress::Ipv6(p.src_addr()),
                IpAddress::Ipv6(p.dst_addr()),
                ip.get(40..end)?,
            )
        }
        _ => return None,
    };
    Some((src, dst, TcpPacket::new_checked(l4).ok()?))
}

/// A pure ACK, if `ip` (an IP packet as delivered by the nexus) is one: its connection and
/// acknowledgement number.
fn pure_ack(ip: &[u8]) -> Option<(Conn, TcpSeqNumber)> {
    let (src, dst, t) = tcp_in(ip)?;
    let only_ack =
        t.ack() && !(t.syn() || t.fin() || t.rst() || t.psh() || t.urg()) && !(t.ece() || t.cwr());
    if !only_ack || !t.payload().is_empty() || has_sack(t.options()) {
        return None;
    }
    let conn = Conn {
        src,
        dst,
        src_port: t.src_port(),
        dst_port: t.dst_port(),
    };
    Some((conn, t.ack_number()))
}

/// Whether TCP options hold SACK blocks (kind 5). A malformed list counts as holding them.
fn has_sack(mut opts: &[u8]) -> bool {
    while let Some(&kind) = opts.first() {
        match kind {
            0 => return false,
            1 => opts = &opts[1..],
            5 => return true,
            _ => {
                let len = usize::from(opts.get(1).copied().unwrap_or(0));
                if len < 2 || len > opts.len() {
                    return true;
                }
                opts = &opts[len..];
            }
        }
    }
    false
}

/// The queued pure ACKs, by connection: where each waits (a position counted from the start
/// of the queue's life) and what it acknowledges.
#[derive(Debug, Default)]
pub(crate) struct AckThinner {
    latest: HashMap<Conn, (u64, TcpSeqNumber)>,
    /// ACKs dropped so far.
    pub(crate) thinned: u64,
}

impl AckThinner {
    /// Packet `ip` joins the queue at position `pos`; `front` is the position of the queue's
    /// head (anything before it was handed to smoltcp). Returns the position of a queued pure
    /// ACK that `ip` makes redundant, to be dropped.
    pub(crate) fn queued(&mut self, ip: &[u8], pos: u64, front: u64) -> Option<u64> {
        let (conn, ack) = pure_ack(ip)?;
        match self.latest.insert(conn, (pos, ack)) {
            Some((old, old_ack)) if old >= front && ack > old_ack && ack - old_ack < 1 << 30 => {
                self.thinned += 1;
                Some(old)
            }
            // Not passed (a duplicate ACK): both stay, and the newer one is the one to beat.
            _ => None,
        }
    }

    /// The queue is empty: every remembered ACK is gone.
    pub(crate) fn clear(&mut self) {
        self.latest.clear();
    }

    /// Forgets the ACKs before `front` (handed to smoltcp) once they outnumber the `queued`
    /// packets: under load the queue never empties, and a map of every connection ever seen
    /// (or of every spoofed one) would only grow.
    pub(crate) fn forget_before(&mut self, front: u64, queued: usize) {
        if self.latest.len() > 2 * queued + 64 {
            self.latest.retain(|_, (pos, _)| *pos >= front);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Repr, TcpControl, TcpRepr, TcpTimestampRepr};

    struct Seg<'a> {
        sport: u16,
        ack: u32,
        control: TcpControl,
        payload: &'a [u8],
        sack: bool,
        ts: bool,
    }

    fn ack(sport: u16, ack: u32) -> Seg<'static> {
        Seg {
            sport,
            ack,
            control: TcpControl::None,
            payload: &[],
            sack: false,
            ts: true,
        }
    }

    fn v4(s: &Seg<'_>) -> Vec<u8> {
        let (src, dst) = (
            Ipv4Address::new(198, 18, 0, 2),
            Ipv4Address::new(198, 18, 0, 1),
        );
        let mut sack = [None; 3];
        if s.sack {
            sack[0] = Some((5000, 6000));
        }
        let tcp = TcpRepr {
            src_port: s.sport,
            dst_port: 80,
            control: s.control,
            seq_number: TcpSeqNumber(1),
            ack_number: Some(TcpSeqNumber(s.ack as i32)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: sack,
            timestamp: s.ts.then_some(TcpTimestampRepr::new(7, 9)),
            payload: s.payload,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &caps,
        );
        buf
    }

    #[test]
    fn a_pure_ack_that_acknowledges_more_drops_the_queued_one() {
        let mut t = AckThinner::default();
        assert_eq!(t.queued(&v4(&ack(1000, 100)), 0, 0), None);
        assert_eq!(
            t.queued(&v4(&ack(2000, 100)), 1, 0),
            None,
            "another connection"
        );
        assert_eq!(t.queued(&v4(&ack(1000, 200)), 2, 0), Some(0));
        assert_eq!(t.queued(&v4(&ack(1000, 300)), 3, 0), Some(2));
        assert_eq!(t.thinned, 2);
    }

    #[test]
    fn duplicate_acks_and_acks_already_taken_stay() {
        let mut t = AckThinner::default();
        assert_eq!(t.queued(&v4(&ack(1000, 100)), 0, 0), None);
        assert_eq!(
            t.queued(&v4(&ack(1000, 100)), 1, 0),
            None,
            "a duplicate ACK"
        );
        assert_eq!(t.queued(&v4(&ack(1000, 90)), 2, 0), None, "an older ACK");
        // The one at 2 was handed to smoltcp already (the queue's head is past it).
        assert_eq!(t.queued(&v4(&ack(1000, 300)), 3, 3), None);
        assert_eq!(t.queued(&v4(&ack(1000, 400)), 4, 3), Some(3));
    }

    #[test]
    fn only_pure_acks_without_sack_count() {
        let mut t = AckThinner::default();
        let keep = [
            Seg {
                payload: b"data",
                ..ack(1000, 500)
            },
            Seg {
                control: TcpControl::Fin,
                ..ack(1000, 600)
            },
            Seg {
                control: TcpControl::Psh,
                ..ack(1000, 700)
            },
            Seg {
                sack: true,
                ..ack(1000, 800)
            },
        ];
        let mut pos = 0u64;
        for s in &keep {
            // Each pure ACK passes the one before the last segment.
            let before = pos.checked_sub(2);
            assert_eq!(t.queued(&v4(&ack(1000, s.ack - 50)), pos, 0), before);
            // The segment itself is never dropped, nor does it drop the ACK before it.
            assert_eq!(t.queued(&v4(s), pos + 1, 0), None, "{:?}", s.control);
            pos += 2;
        }
        // An ACK without timestamps is as pure.
        assert_eq!(
            t.queued(
                &v4(&Seg {
                    ts: false,
                    ..ack(1000, 900)
                }),
                pos,
                0
            ),
            Some(pos - 2)
        );
    }

    #[test]
    fn acks_handed_over_are_forgotten_once_they_pile_up_and_far_jumps_thin_nothing() {
        let mut t = AckThinner::default();
        for port in 0..200u16 {
            assert_eq!(t.queued(&v4(&ack(port, 100)), u64::from(port), 0), None);
        }
        t.forget_before(150, 70);
        assert_eq!(
            t.latest.len(),
            200,
            "not yet more than twice the queue and 64"
        );
        t.forget_before(190, 10);
        assert_eq!(
            t.latest.len(),
            10,
            "only the 10 still queued are remembered"
        );
        // 190 is still queued: a jump of 2^30 or more does not displace it.
        assert_eq!(t.queued(&v4(&ack(190, 100 + (1 << 30))), 200, 190), None);
        assert_eq!(
            t.queued(&v4(&ack(191, 100 + (1 << 29))), 201, 190),
            Some(191)
        );
    }

    #[test]
    fn malformed_or_foreign_packets_are_left_alone() {
        let mut t = AckThinner::default();
        for junk in [&[][..], &[0x45, 0, 0], &[0x60; 10], &[0x11; 60]] {
            assert_eq!(t.queued(junk, 0, 0), None);
        }
        let mut p = v4(&ack(1000, 100));
        p.truncate(30);
        assert_eq!(t.queued(&p, 1, 0), None);
        assert!(has_sack(&[8, 40]), "an option longer than the list");
        assert!(!has_sack(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]));
    }
}
