//! The memory layout of a channel: its geometry, the schema, and where every ring half lives.
//!
//! A channel has three regions:
//!
//! | region | written by | holds |
//! |---|---|---|
//! | server region | the server end (nexus, or the serving end of a user pipe) | the schema, then the producer halves of RX, ALLOC, EVENT and the consumer halves of TX, FREE |
//! | app region | the app end | the producer halves of TX, FREE and the consumer halves of RX, ALLOC, EVENT |
//! | pool | both | the packet buffers, in segments |
//!
//! Offsets are a pure function of the [`Geometry`], which the schema carries, so both ends
//! compute the same layout and nothing but indices ever crosses the boundary.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::region::page_size;
use crate::ring::{HALF_HEADER_SIZE, RingKind, SLOT_SIZE};
use crate::{Error, Role};

/// "NETCHAN1", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"NETCHAN1");
/// Version of this layout. Bump it on any change to the shared structures.
pub const LAYOUT_VERSION: u32 = 1;

/// Largest ring the layout accepts.
pub const MAX_RING_SLOTS: u32 = 1 << 16;
/// Largest number of buffers in a pool.
pub const MAX_BUFFERS: u32 = 1 << 22;

/// Sizes of a channel's rings and pool. Carried in the schema.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Slots of each ring, by [`RingKind::index`]; each a power of two.
    pub ring_slots: [u32; 5],
    /// Bytes per buffer: a power of two from 256 to 65536 (default 2 KiB).
    pub buf_size: u32,
    /// Buffers per segment; a segment is a whole number of pages.
    pub bufs_per_segment: u32,
    /// Maximum number of segments in the pool.
    pub segments: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Self {
            ring_slots: [1024, 1024, 1024, 1024, 64],
            buf_size: 2048,
            bufs_per_segment: 64,
            segments: 32,
        }
    }
}

impl Geometry {
    /// Checks every limit; the error says which one failed.
    pub fn validate(&self) -> Result<(), Error> {
        for &s in &self.ring_slots {
            if !s.is_power_of_two() || s > MAX_RING_SLOTS {
                return Err(Error::Geometry(
                    "ring sizes must be powers of two up to 65536",
                ));
            }
        }
        if !self.buf_size.is_power_of_two() || !(256..=65536).contains(&self.buf_size) {
            return Err(Error::Geometry(
                "buffer size must be a power of two from 256 to 65536",
            ));
        }
        if self.bufs_per_segment == 0 || self.segments == 0 {
            return Err(Error::Geometry(
                "a pool needs at least one segment of one buffer",
            ));
        }
        let seg = u64::from(self.buf_size) * u64::from(self.bufs_per_segment);
        if seg % page_size() as u64 != 0 {
            return Err(Error::Geometry(
                "a segment (buffer size × buffers per segment) must be a whole number of pages",
            ));
        }
        if u64::from(self.bufs_per_segment) * u64::from(self.segments) > u64::from(MAX_BUFFERS) {
            return Err(Error::Geometry("a pool holds at most 4194304 buffers"));
        }
        Ok(())
    }

    /// Slots of one ring.
    pub fn slots(&self, kind: RingKind) -> u32 {
        self.ring_slots[kind.index()]
    }

    /// Total buffers when every segment is in use.
    pub fn buffers(&self) -> u32 {
        self.bufs_per_segment * self.segments
    }

    /// Bytes per segment.
    pub fn segment_bytes(&self) -> usize {
        self.buf_size as usize * self.bufs_per_segment as usize
    }

    /// Bytes of the whole pool (all segments).
    pub fn pool_bytes(&self) -> usize {
        self.segment_bytes() * self.segments as usize
    }
}

/// State of a channel, in the schema.
pub mod state {
    /// Being set up.
    pub const INIT: u32 = 0;
    /// In service.
    pub const ACTIVE: u32 = 1;
    /// Revoked; the reason is in `defunct_reason`.
    pub const DEFUNCT: u32 = 2;
}

/// The channel header at the start of the server region (read-only to the app end).
#[repr(C)]
#[derive(Debug)]
pub struct Schema {
    pub(crate) magic: u64,
    pub(crate) version: u32,
    pub(crate) state: AtomicU32,
    pub(crate) defunct_reason: AtomicU32,
    pub(crate) _reserved: u32,
    pub(crate) epoch: AtomicU64,
    /// Random value, also written into the redzone at the end of both ring regions.
    pub(crate) cookie: u64,
    pub(crate) geometry: Geometry,
    pub(crate) server_region_len: u64,
    pub(crate) app_region_len: u64,
    pub(crate) pool_len: u64,
}

/// Where the ring halves start in the server region (after the schema).
const SCHEMA_SPAN: usize = 256;
const _: () = assert!(size_of::<Schema>() <= SCHEMA_SPAN);
/// Bytes of the redzone at the end of each ring region.
const REDZONE_SPAN: usize = 64;

impl Schema {
    /// Current state (one of [`state`]).
    pub fn state(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }

    /// The defunct reason code (meaningful once the state is DEFUNCT).
    pub fn defunct_reason(&self) -> u32 {
        self.defunct_reason.load(Ordering::Acquire)
    }

    /// Epoch, bumped by the server whenever it re-initialises the channel.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// Offsets inside one ring region (server or app).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLayout {
    /// Which end writes this region.
    pub role: Role,
    /// Offset of this region's half of each ring, by [`RingKind::index`].
    pub half: [usize; 5],
    /// Offset of the redzone word.
    pub redzone: usize,
    /// Length of the region (whole pages).
    pub len: usize,
}

impl RegionLayout {
    /// Computes the layout of the region written by `role`.
    pub fn new(role: Role, g: &Geometry) -> Result<Self, Error> {
        g.validate()?;
        let mut off = if role == Role::Server { SCHEMA_SPAN } else { 0 };
        let mut half = [0usize; 5];
        for kind in RingKind::ALL {
            half[kind.index()] = off;
            let produces = kind.app_produces() == (role == Role::App);
            off += HALF_HEADER_SIZE;
            if produces {
                off += g.slots(kind) as usize * SLOT_SIZE;
            }
        }
        let redzone = off;
        let len = crate::region::page_round_up(off + REDZONE_SPAN).ok_or(Error::TooLarge {
            what: "ring region",
            len: off,
        })?;
        Ok(Self {
            role,
            half,
            redzone,
            len,
        })
    }

    /// Offset of the slot array of a ring this region produces.
    pub fn slots(&self, kind: RingKind) -> usize {
        self.half[kind.index()] + HALF_HEADER_SIZE
    }
}

/// Everything both ends derive from a geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelLayout {
    /// The geometry.
    pub geometry: Geometry,
    /// The server's region.
    pub server: RegionLayout,
    /// The app's region.
    pub app: RegionLayout,
    /// Bytes of the pool.
    pub pool_len: usize,
}

impl ChannelLayout {
    /// Computes the whole layout, validating the geometry.
    pub fn new(geometry: Geometry) -> Result<Self, Error> {
        Ok(Self {
            server: RegionLayout::new(Role::Server, &geometry)?,
            app: RegionLayout::new(Role::App, &geometry)?,
            pool_len: geometry.pool_bytes(),
            geometry,
        })
    }

    /// The region written by `role`.
    pub fn region(&self, role: Role) -> &RegionLayout {
        match role {
            Role::Server => &self.server,
            Role::App => &self.app,
        }
    }
}

/// Writes a fresh schema at the start of a server region.
///
/// # Safety
/// `base` must point to a writable mapping of at least `layout.server.len` bytes, aligned to a
/// page, that nobody else accesses until this returns.
pub(crate) unsafe fn init_schema(base: *mut u8, layout: &ChannelLayout, cookie: u64) {
    let schema = Schema {
        magic: MAGIC,
        version: LAYOUT_VERSION,
        state: AtomicU32::new(state::INIT),
        defunct_reason: AtomicU32::new(0),
        _reserved: 0,
        epoch: AtomicU64::new(1),
        cookie,
        geometry: layout.geometry,
        server_region_len: layout.server.len as u64,
        app_region_len: layout.app.len as u64,
        pool_len: layout.pool_len as u64,
    };
    // SAFETY: in bounds and aligned per the contract; no reference to the memory exists yet.
    unsafe { base.cast::<Schema>().write(schema) };
}

/// What the app end reads out of a schema it does not trust (each field read once).
#[derive(Debug, Clone)]
pub struct SchemaView {
    /// The validated layout.
    pub layout: ChannelLayout,
    /// The redzone cookie.
    pub cookie: u64,
}

/// Reads and validates a schema written by the other end.
///
/// # Safety
/// `base` must point to a readable mapping of at least `mapped_len` bytes, page aligned.
pub(crate) unsafe fn read_schema(base: *const u8, mapped_len: usize) -> Result<SchemaView, Error> {
    if mapped_len < SCHEMA_SPAN {
        return Err(Error::RegionSize {
            expected: SCHEMA_SPAN as u64,
            actual: mapped_len as u64,
        });
    }
    let s = base.cast::<Schema>();
    // SAFETY: in bounds and aligned per the contract; volatile so each field is read exactly once
    // from memory the peer may be changing.
    let (magic, version, geometry, srv_len, app_len, pool_len, cookie) = unsafe {
        (
            std::ptr::addr_of!((*s).magic).read_volatile(),
            std::ptr::addr_of!((*s).version).read_volatile(),
            std::ptr::addr_of!((*s).geometry).read_volatile(),
            std::ptr::addr_of!((*s).server_region_len).read_volatile(),
            std::ptr::addr_of!((*s).app_region_len).read_volatile(),
            std::ptr::addr_of!((*s).pool_len).read_volatile(),
            std::ptr::addr_of!((*s).cookie).read_volatile(),
        )
    };
    if magic != MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    if version != LAYOUT_VERSION {
        return Err(Error::Version {
            found: version,
            expected: LAYOUT_VERSION,
        });
    }
    let layout = ChannelLayout::new(geometry)?;
    let want = [
        (srv_len, layout.server.len),
        (app_len, layout.app.len),
        (pool_len, layout.pool_len),
    ];
    for (said, computed) in want {
        if said != computed as u64 {
            return Err(Error::RegionSize {
                expected: computed as u64,
                actual: said,
            });
        }
    }
    if mapped_len != layout.server.len {
        return Err(Error::RegionSize {
            expected: layout.server.len as u64,
            actual: mapped_len as u64,
        });
    }
    Ok(SchemaView { layout, cookie })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_is_valid_and_regions_do_not_overlap() {
        let l = ChannelLayout::new(Geometry::default()).unwrap();
        for r in [&l.server, &l.app] {
            let mut spans: Vec<(usize, usize)> = RingKind::ALL
                .iter()
                .map(|&k| {
                    let produces = k.app_produces() == (r.role == Role::App);
                    let len = HALF_HEADER_SIZE
                        + if produces {
                            l.geometry.slots(k) as usize * SLOT_SIZE
                        } else {
                            0
                        };
                    (r.half[k.index()], len)
                })
                .collect();
            spans.push((r.redzone, REDZONE_SPAN));
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?} overlap");
            }
            assert!(r.redzone + REDZONE_SPAN <= r.len);
            assert_eq!(r.len % page_size(), 0);
            for k in RingKind::ALL {
                assert_eq!(
                    r.half[k.index()] % 64,
                    0,
                    "halves sit on their own cache lines"
                );
            }
        }
        assert!(l.server.half[0] >= SCHEMA_SPAN);
    }

    #[test]
    fn bad_geometries_are_refused_with_a_reason() {
        let ok = Geometry::default();
        let cases = [
            Geometry {
                ring_slots: [3, 1024, 1024, 1024, 64],
                ..ok
            },
            Geometry {
                ring_slots: [1 << 17, 1024, 1024, 1024, 64],
                ..ok
            },
            Geometry {
                buf_size: 100,
                ..ok
            },
            Geometry {
                buf_size: 1 << 20,
                ..ok
            },
            Geometry {
                bufs_per_segment: 0,
                ..ok
            },
            Geometry {
                bufs_per_segment: 1,
                buf_size: 256,
                ..ok
            },
            Geometry {
                segments: u32::MAX,
                ..ok
            },
        ];
        for g in cases {
            assert!(matches!(g.validate(), Err(Error::Geometry(_))), "{g:?}");
        }
    }

    #[test]
    fn schema_round_trip_and_version_mismatch() {
        let l = ChannelLayout::new(Geometry::default()).unwrap();
        let mut mem = vec![0u64; l.server.len / 8];
        let base = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: `mem` is large enough and 8-byte aligned, which is all `Schema` needs.
        unsafe { init_schema(base, &l, 42) };
        // SAFETY: as above.
        let v = unsafe { read_schema(base, l.server.len) }.unwrap();
        assert_eq!(v.layout, l);
        assert_eq!(v.cookie, 42);
        // SAFETY: as above; the version field follows the magic.
        unsafe { base.add(8).cast::<u32>().write(7) };
        // SAFETY: as above.
        let err = unsafe { read_schema(base, l.server.len) }.unwrap_err();
        assert!(matches!(
            err,
            Error::Version {
                found: 7,
                expected: LAYOUT_VERSION
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains('7') && msg.contains(&LAYOUT_VERSION.to_string()),
            "{msg}"
        );
    }
}
