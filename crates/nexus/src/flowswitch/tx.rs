//! Validation of what an app transmits (anti-spoofing).
//!
//! The caller has already copied the packet out of the app's memory, so the app cannot change
//! it between the check and the send. The headers are checked as on receive; the UDP/TCP
//! checksum is not (a wrong one hurts only the sender). A packet is accepted only if its 5-tuple belongs to a
//! flow of the sending channel: an exact flow, or a listener whose address is the packet's
//! source (a wildcard listener accepts any address the host owns).

use std::net::{IpAddr, SocketAddr};

use netchannel_shm::control::ChannelId;

use super::parse::{RxDrop, parse_ip_headers};
use super::table::{FlowId, FlowKey, FlowSpec, FlowTable};

/// Why a packet from an app was refused. Each maps to one counter (`tx_<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxDrop {
    /// The packet did not parse (the reason is the same as on receive).
    Malformed(RxDrop),
    /// The source address is not the flow's (or not the host's, for a wildcard flow).
    SpoofedAddress,
    /// The source port belongs to no flow of this channel.
    NoFlow,
    /// The 5-tuple belongs to another channel's flow.
    NotOwner,
}

impl TxDrop {
    /// Counter suffix.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed(r) => r.name(),
            Self::SpoofedAddress => "spoofed_address",
            Self::NoFlow => "no_flow",
            Self::NotOwner => "not_owner",
        }
    }
}

/// A packet that may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Valid {
    /// Its flow.
    pub flow: FlowId,
    /// Its 5-tuple (local: its source).
    pub key: FlowKey,
    /// Offset of its transport header (past IPv4 options and IPv6 extension headers).
    pub l4: usize,
}

/// Checks an IP packet sent by `channel`. `host_addrs` are the addresses of the interface.
pub fn validate(
    table: &FlowTable,
    channel: ChannelId,
    packet: &[u8],
    host_addrs: &[IpAddr],
) -> Result<Valid, TxDrop> {
    let p = parse_ip_headers(packet).map_err(TxDrop::Malformed)?;
    let key = FlowKey {
        proto: p.proto,
        local: SocketAddr::from(p.src),
        remote: SocketAddr::from(p.dst),
    };
    if let Some(hit) = table.lookup(&key) {
        if hit.channel != channel {
            return Err(TxDrop::NotOwner);
        }
        if hit.listener
            && let Some(FlowSpec::Listener(_, a)) = table.get(hit.id).map(|f| f.spec)
            && a.ip().is_unspecified()
            && !host_addrs.contains(&key.local.ip())
        {
            return Err(TxDrop::SpoofedAddress);
        }
        return Ok(Valid {
            flow: hit.id,
            key,
            l4: p.l4,
        });
    }
    // Nothing matches: a flow of this channel on the same port means a forged address.
    if table.channel_uses_port(channel, p.proto, p.src.1) {
        Err(TxDrop::SpoofedAddress)
    } else {
        Err(TxDrop::NoFlow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowswitch::Proto;
    use crate::flowswitch::parse::tests::{A, B, udp4};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_spoof_is_refused_with_its_reason() {
        let mut t = FlowTable::new(10);
        let mine = t
            .insert(1, FlowSpec::Listener(Proto::Udp, sa("198.18.0.1:5000")))
            .unwrap();
        t.insert(2, FlowSpec::Listener(Proto::Udp, sa("198.18.0.1:6000")))
            .unwrap();
        let host = [IpAddr::from(A)];
        let send = |src: [u8; 4], sport, dport| {
            validate(&t, 1, &udp4(src, sport, B, dport, b"x")[14..], &host).map(|v| v.flow)
        };
        assert_eq!(send(A, 5000, 9), Ok(mine));
        assert_eq!(send(A, 5001, 9), Err(TxDrop::NoFlow), "other source port");
        assert_eq!(
            send([198, 18, 0, 77], 5000, 9),
            Err(TxDrop::SpoofedAddress),
            "other source address"
        );
        assert_eq!(
            send(A, 6000, 9),
            Err(TxDrop::NotOwner),
            "another app's flow"
        );
        let mut arp_like = udp4(A, 5000, B, 9, b"x")[14..].to_vec();
        arp_like[0] = 0x00;
        assert!(
            matches!(validate(&t, 1, &arp_like, &host), Err(TxDrop::Malformed(_))),
            "not IP"
        );
        let mut tcp_proto = udp4(A, 5000, B, 9, b"x")[14..].to_vec();
        tcp_proto[9] = 1; // ICMP
        assert!(
            matches!(
                validate(&t, 1, &tcp_proto, &host),
                Err(TxDrop::Malformed(_))
            ),
            "other protocol"
        );
    }

    #[test]
    fn ipv6_extension_headers_are_parsed_past_and_bad_ones_refused() {
        use crate::flowswitch::parse::tests::{A6, B6, tcp6, with_hop_by_hop};
        let mut t = FlowTable::new(10);
        let mine = t
            .insert(
                1,
                FlowSpec::Listener(Proto::Tcp, "[fd00:198:18::1]:5000".parse().unwrap()),
            )
            .unwrap();
        let host = [IpAddr::from(A6)];
        let plain = tcp6(A6, 5000, B6, 80, b"x");
        assert_eq!(
            validate(&t, 1, &plain[14..], &host).map(|v| v.flow),
            Ok(mine)
        );
        let hbh = with_hop_by_hop(&plain);
        let v = validate(&t, 1, &hbh[14..], &host).expect("a hop-by-hop header is fine");
        assert_eq!((v.flow, v.l4), (mine, 48));
        // An unknown hop-by-hop option whose type says "discard" (high bits 01).
        let mut discard = hbh.clone();
        discard[14 + 40 + 2..14 + 40 + 8].copy_from_slice(&[0x47, 4, 0, 0, 0, 0]);
        assert_eq!(
            validate(&t, 1, &discard[14..], &host).map(|v| v.flow),
            Err(TxDrop::Malformed(RxDrop::ExtHeaders))
        );
    }

    #[test]
    fn a_wildcard_flow_may_use_only_host_addresses() {
        let mut t = FlowTable::new(10);
        t.insert(1, FlowSpec::Listener(Proto::Udp, sa("0.0.0.0:7000")))
            .unwrap();
        let host = [IpAddr::from(A)];
        assert!(validate(&t, 1, &udp4(A, 7000, B, 9, b"x")[14..], &host).is_ok());
        assert_eq!(
            validate(&t, 1, &udp4(B, 7000, A, 9, b"x")[14..], &host),
            Err(TxDrop::SpoofedAddress)
        );
    }
}
