//! The drop taxonomy: every reason a frame from the wire or a packet from an app is not
//! delivered, one enum indexing one fixed array of counters.
//!
//! Each reason is counted in exactly one scope: a frame that reached no channel on the
//! interface, a packet for or from a channel on that channel. The status names (`rx_no_flow`,
//! `tx_spoofed_address`, ...) are derived from the enum and are the names operators' scripts
//! have always read. The parser's and the TX validator's own error types ([`RxDrop`],
//! [`TxDrop`]) map onto it.

use super::parse::RxDrop;
use super::tx::TxDrop;

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])* $v:ident = $name:literal, $scope:ident; )*) => {
        /// Why a frame or a packet was not delivered.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason {
            $( $(#[doc = $doc])* $v, )*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$v,)*];
            /// How many reasons there are (the length of a counter array).
            pub const COUNT: usize = Self::ALL.len();

            /// The counter's name in `netchannel status` (and its JSON).
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$v => $name,)* }
            }

            /// Where the reason is counted.
            pub const fn scope(self) -> Scope {
                match self { $(DropReason::$v => Scope::$scope,)* }
            }
        }
    };
}

/// Where a reason is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// On the interface: the frame reached no channel (or was the nexus's own).
    Interface,
    /// On the channel the packet was for or came from.
    Channel,
}

reasons! {
    /// ARP handled by the nexus itself (behind a TAP): not for an app.
    RxArp = "rx_arp", Interface;
    /// IPv6 neighbour discovery handled by the nexus itself (behind a TAP).
    RxNdp = "rx_ndp", Interface;
    /// Addressed to another host's MAC (neither the interface's, broadcast, nor a multicast
    /// group the host has joined): the kernel's PACKET_OTHERHOST, never an app's.
    RxOtherHost = "rx_other_host", Interface;
    /// Shorter than its headers say (at any layer).
    RxTruncated = "rx_truncated", Interface;
    /// A header field is invalid (bad IHL, bad version, inconsistent lengths).
    RxBadHeader = "rx_bad_header", Interface;
    /// Not IPv4 or IPv6 (other EtherTypes), or of a VLAN (any VLAN ID but 0).
    RxNotIp = "rx_not_ip", Interface;
    /// IPv4 with malformed options.
    RxIpOptions = "rx_ip_options", Interface;
    /// IPv6 with extension headers a host does not pass on (a routing header with segments
    /// left, an unknown option to discard, authentication).
    RxExtHeaders = "rx_ext_headers", Interface;
    /// A fragment that cannot belong to a datagram (empty, not a multiple of 8 bytes before
    /// the last, contradicting its datagram's end), or its datagram (given up).
    RxFragMalformed = "rx_frag_malformed", Interface;
    /// A fragment overlapping another of its datagram: the datagram is given up (RFC 5722).
    RxFragOverlap = "rx_frag_overlap", Interface;
    /// A fragment that repeats one already held (dropped alone; the datagram goes on).
    RxFragDuplicate = "rx_frag_duplicate", Interface;
    /// A fragment that would make its datagram longer than 65,535 bytes.
    RxFragOversized = "rx_frag_oversized", Interface;
    /// A datagram of more fragments than the reassembler takes (given up).
    RxFragTooMany = "rx_frag_too_many", Interface;
    /// A datagram not complete in time (given up, its fragments freed).
    RxFragTimeout = "rx_frag_timeout", Interface;
    /// An incomplete datagram given up to keep reassembly within its memory budget.
    RxFragMemory = "rx_frag_memory", Interface;
    /// Neither UDP nor TCP.
    RxProtocol = "rx_protocol", Interface;
    /// The IPv4 header checksum is wrong.
    RxBadL3Checksum = "rx_bad_l3_checksum", Interface;
    /// The UDP or TCP checksum is wrong (found while copying into the channel).
    RxBadL4Checksum = "rx_bad_l4_checksum", Interface;
    /// No flow claims the frame.
    RxNoFlow = "rx_no_flow", Interface;
    /// The flow's channel is defunct or gone.
    RxChannelGone = "rx_channel_gone", Interface;
    /// The channel's RX ring was full.
    RxRingFull = "rx_ring_full", Channel;
    /// The channel's pool had no free buffer.
    RxNoBuf = "rx_no_buf", Channel;
    /// The packet is larger than the channel's buffers.
    RxTooBig = "rx_too_big", Channel;
    /// An app's packet is shorter than its headers say.
    TxTruncated = "tx_truncated", Channel;
    /// An app's packet has an invalid header field.
    TxBadHeader = "tx_bad_header", Channel;
    /// An app's IPv4 packet has malformed options.
    TxIpOptions = "tx_ip_options", Channel;
    /// An app's IPv6 packet has extension headers a host would not send (see
    /// `rx_ext_headers`).
    TxExtHeaders = "tx_ext_headers", Channel;
    /// An app sent an IP fragment (it sends whole datagrams; the nexus fragments them).
    TxFragment = "tx_fragment", Channel;
    /// An app's packet is neither UDP nor TCP.
    TxProtocol = "tx_protocol", Channel;
    /// An app's IPv4 header checksum is wrong.
    TxBadL3Checksum = "tx_bad_l3_checksum", Channel;
    /// An app's packet is empty, larger than a frame, or over the MTU and not cut (a TCP
    /// packet without segmentation, headers leaving no room to fragment).
    TxBadLen = "tx_bad_len", Channel;
    /// An app's source port belongs to no flow of its channel.
    TxNoFlow = "tx_no_flow", Channel;
    /// An app's source address is not its flow's (or not the host's): a forgery.
    TxSpoofedAddress = "tx_spoofed_address", Channel;
    /// An app's 5-tuple belongs to another channel's flow: a forgery.
    TxNotOwner = "tx_not_owner", Channel;
    /// The kernel routes the destination out of another interface.
    TxOtherInterface = "tx_other_interface", Channel;
    /// The next hop was not resolved in time (or a large packet could not wait for it).
    TxUnresolved = "tx_unresolved", Channel;
    /// Too many packets already wait for their next hops.
    TxNoNeighbour = "tx_no_neighbour", Channel;
    /// The interface refused a channel's frame (queue full, down).
    TxNetif = "tx_netif", Channel;
    /// The interface refused a frame of the nexus's own (an ARP answer, a reset).
    TxNetifOwn = "tx_netif_own", Interface;
}

impl DropReason {
    /// Index into a counter array.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A forged packet: it claims an address or a flow that is not its sender's. A stream of
    /// them is a strike against the app (see the channel's strikes).
    pub const fn is_forgery(self) -> bool {
        matches!(self, Self::TxSpoofedAddress | Self::TxNotOwner)
    }

    /// Counted in the interface's interface-wide `tx_unresolved` total (with the channels').
    pub const fn is_unresolved(self) -> bool {
        matches!(self, Self::TxUnresolved | Self::TxNoNeighbour)
    }

    /// Counted in the interface's `tx_netif_errors` total.
    pub const fn is_netif_error(self) -> bool {
        matches!(self, Self::TxNetif | Self::TxNetifOwn)
    }
}

impl From<RxDrop> for DropReason {
    fn from(d: RxDrop) -> Self {
        match d {
            RxDrop::Truncated => Self::RxTruncated,
            RxDrop::BadHeader => Self::RxBadHeader,
            RxDrop::NotIp => Self::RxNotIp,
            RxDrop::IpOptions => Self::RxIpOptions,
            RxDrop::ExtHeaders => Self::RxExtHeaders,
            RxDrop::Fragment => Self::RxFragMalformed,
            RxDrop::Protocol => Self::RxProtocol,
            RxDrop::BadL3Checksum => Self::RxBadL3Checksum,
            RxDrop::BadL4Checksum => Self::RxBadL4Checksum,
            RxDrop::NoFlow => Self::RxNoFlow,
        }
    }
}

impl From<TxDrop> for DropReason {
    fn from(d: TxDrop) -> Self {
        match d {
            TxDrop::Malformed(r) => match r {
                RxDrop::Truncated => Self::TxTruncated,
                RxDrop::BadHeader => Self::TxBadHeader,
                // An IP packet's first nibble is its version: a wrong one is a bad header.
                RxDrop::NotIp => Self::TxBadHeader,
                RxDrop::IpOptions => Self::TxIpOptions,
                RxDrop::ExtHeaders => Self::TxExtHeaders,
                RxDrop::Fragment => Self::TxFragment,
                RxDrop::Protocol => Self::TxProtocol,
                RxDrop::BadL3Checksum => Self::TxBadL3Checksum,
                // The TX validator does not check transport checksums (a wrong one hurts
                // the sender only) nor look flows up through the parser.
                RxDrop::BadL4Checksum => Self::TxBadHeader,
                RxDrop::NoFlow => Self::TxNoFlow,
            },
            TxDrop::SpoofedAddress => Self::TxSpoofedAddress,
            TxDrop::NoFlow => Self::TxNoFlow,
            TxDrop::NotOwner => Self::TxNotOwner,
        }
    }
}

/// One counter per [`DropReason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::COUNT]);

impl Default for DropCounters {
    fn default() -> Self {
        Self([0; DropReason::COUNT])
    }
}

impl DropCounters {
    /// Counts one drop.
    #[inline]
    pub fn add(&mut self, reason: DropReason) {
        self.0[reason.index()] += 1;
    }

    /// The count of one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    /// The reasons counted at least once, in enum order.
    pub fn nonzero(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .zip(self.0.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (*r, *n))
    }

    /// Every drop counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_indexes_its_own_counter_under_a_unique_name() {
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(names.insert(r.name()), "{} twice", r.name());
            let dir = if r.name().starts_with("rx_") {
                "rx"
            } else {
                "tx"
            };
            assert!(r.name().starts_with(dir), "{}", r.name());
        }
        let mut c = DropCounters::default();
        for r in DropReason::ALL {
            c.add(*r);
        }
        assert_eq!(c.total(), DropReason::COUNT as u64);
        assert_eq!(c.nonzero().count(), DropReason::COUNT);
    }

    #[test]
    fn only_forgeries_are_strikes() {
        let forged: Vec<_> = DropReason::ALL
            .iter()
            .filter(|r| r.is_forgery())
            .map(|r| r.name())
            .collect();
        assert_eq!(forged, ["tx_spoofed_address", "tx_not_owner"]);
    }

    #[test]
    fn parser_and_validator_errors_map_to_reasons_of_their_direction() {
        use RxDrop::*;
        for d in [
            Truncated,
            BadHeader,
            NotIp,
            IpOptions,
            ExtHeaders,
            Fragment,
            Protocol,
            BadL3Checksum,
            BadL4Checksum,
            NoFlow,
        ] {
            let rx = DropReason::from(d);
            // A fragment is reassembled, not dropped: only one the reassembler cannot take
            // is, under the reason it says (`rx_frag_*`).
            if d == Fragment {
                assert!(rx.name().starts_with("rx_frag_"));
            } else {
                assert_eq!(rx.name(), format!("rx_{}", d.name()));
            }
            assert_eq!(rx.scope(), Scope::Interface);
            let tx = DropReason::from(TxDrop::Malformed(d));
            assert!(tx.name().starts_with("tx_"));
            assert_eq!(tx.scope(), Scope::Channel);
        }
        for d in [TxDrop::SpoofedAddress, TxDrop::NoFlow, TxDrop::NotOwner] {
            assert_eq!(DropReason::from(d).name(), format!("tx_{}", d.name()));
        }
    }
}
