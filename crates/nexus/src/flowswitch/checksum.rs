//! The Internet checksum (RFC 1071), summed wide and folded late, and summed while copying:
//! the nexus copies every packet once anyway (the isolation boundary), so verifying or
//! computing a checksum in the same pass costs a few adds per eight bytes instead of a second
//! pass over the payload.
//!
//! A [`Sum`] is kept in the machine's byte order (RFC 1071 §2(B): the one's-complement sum is
//! byte-order independent up to a final swap), so the inner loops are plain 64-bit loads.
//! Sums of pieces combine; a piece that starts at an odd offset of the whole is added with
//! its bytes swapped ([`Sum::plus_at`]).

/// A one's-complement sum in progress (native byte order, not yet folded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum(u64);

/// Adds the two 32-bit halves of `v` (at most 2^33 per call, so 2^31 calls fit in a u64).
#[inline(always)]
fn halves(v: u64) -> u64 {
    (v >> 32) + (v & 0xffff_ffff)
}

/// The sum of a tail shorter than eight bytes, zero-padded where it stands.
#[inline(always)]
fn tail(t: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..t.len()].copy_from_slice(t);
    halves(u64::from_ne_bytes(b))
}

impl Sum {
    /// The sum of `data` (starting at an even offset of whatever it belongs to).
    pub fn of(data: &[u8]) -> Self {
        let mut acc = 0u64;
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            acc += halves(u64::from_ne_bytes(w));
        }
        Self(acc + tail(chunks.remainder()))
    }

    /// Copies `src` into `dst` (equal lengths; extra bytes of either are left alone) and
    /// returns the sum of what was copied.
    pub fn copy(dst: &mut [u8], src: &[u8]) -> Self {
        let n = dst.len().min(src.len());
        let (dst, src) = (&mut dst[..n], &src[..n]);
        let mut acc = 0u64;
        let mut d = dst.chunks_exact_mut(8);
        let mut s = src.chunks_exact(8);
        for (dc, sc) in (&mut d).zip(&mut s) {
            let mut w = [0u8; 8];
            w.copy_from_slice(sc);
            dc.copy_from_slice(&w);
            acc += halves(u64::from_ne_bytes(w));
        }
        let (dt, st) = (d.into_remainder(), s.remainder());
        dt.copy_from_slice(st);
        Self(acc + tail(st))
    }

    /// Adds a sum of data that follows at an even offset.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    /// Adds a sum of data that starts `offset` bytes into the whole.
    #[must_use]
    pub fn plus_at(self, other: Self, offset: usize) -> Self {
        if offset.is_multiple_of(2) {
            self.plus(other)
        } else {
            Self(self.0 + u64::from(fold64(other.0).swap_bytes()))
        }
    }

    /// Adds a 16-bit field (in network order) at an even offset.
    #[must_use]
    pub fn plus_u16(self, v: u16) -> Self {
        self.plus(Self::of(&v.to_be_bytes()))
    }

    /// The folded sum in network order (0xffff over data that includes a correct checksum).
    pub fn fold(self) -> u16 {
        u16::from_be(fold64(self.0))
    }

    /// The checksum field for data summed with its checksum field zero; 0 over data that
    /// includes a correct checksum.
    pub fn finish(self) -> u16 {
        !self.fold()
    }
}

/// Folds a native-order sum to 16 bits (still native order).
fn fold64(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The sum of the UDP/TCP pseudo-header: addresses, protocol and transport length.
pub fn pseudo(src: std::net::IpAddr, dst: std::net::IpAddr, proto: u8, l4_len: usize) -> Sum {
    use std::net::IpAddr;
    let addrs = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Sum::of(&s.octets()).plus(Sum::of(&d.octets())),
        (IpAddr::V6(s), IpAddr::V6(d)) => Sum::of(&s.octets()).plus(Sum::of(&d.octets())),
        // Mixed families never reach here (one IP header holds both); a sum that cannot
        // verify is the safe answer.
        _ => return Sum(1),
    };
    let len = l4_len as u32;
    addrs
        .plus_u16(u16::from(proto))
        .plus_u16((len >> 16) as u16)
        .plus_u16(len as u16)
}

/// Updates a checksum field for one 16-bit word changed from `old` to `new` (RFC 1624).
pub fn adjust(check: u16, old: u16, new: u16) -> u16 {
    let s = Sum::default().plus_u16(!check).plus_u16(!old).plus_u16(new);
    !s.fold()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 word by word, the definition.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    proptest::proptest! {
        #[test]
        fn sum_matches_the_definition(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            proptest::prop_assert_eq!(Sum::of(&data).fold(), reference(&data));
        }

        #[test]
        fn copy_copies_and_sums(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut dst = vec![0u8; data.len()];
            let s = Sum::copy(&mut dst, &data);
            proptest::prop_assert_eq!(&dst, &data);
            proptest::prop_assert_eq!(s.fold(), reference(&data));
        }

        #[test]
        fn pieces_combine_at_any_offset(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            cut in 0usize..300,
        ) {
            let cut = cut.min(data.len());
            let s = Sum::of(&data[..cut]).plus_at(Sum::of(&data[cut..]), cut);
            proptest::prop_assert_eq!(s.fold(), reference(&data));
        }

        #[test]
        fn adjust_matches_a_full_recompute(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 4..64),
            word in 0usize..30,
            new in proptest::num::u16::ANY,
        ) {
            let len = data.len() & !1;
            data.truncate(len);
            let i = (word * 2) % (len - 2).max(2);
            // Bytes 0..2 hold the checksum, over the rest.
            data[0] = 0;
            data[1] = 0;
            let c = Sum::of(&data).finish();
            data[..2].copy_from_slice(&c.to_be_bytes());
            let i = i.max(2);
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            let adjusted = adjust(c, old, new);
            data[..2].copy_from_slice(&adjusted.to_be_bytes());
            // The adjusted packet verifies.
            proptest::prop_assert_eq!(Sum::of(&data).fold(), 0xffff);
        }
    }

    #[test]
    fn a_known_packet_verifies() {
        // RFC 1071's example words.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(Sum::of(&d).fold(), 0xddf2);
    }
}
