//! The packet pool: fixed-size buffers in page-multiple segments of one shared memfd.
//!
//! Both ends map the whole pool (its memfd is sized for the maximum number of segments up front,
//! and is sparse: a segment costs memory only once touched). Which segments are in service, and
//! who holds each buffer, is private bookkeeping of each end (see [`crate::ledger`]); the pool
//! itself only does bounds-checked access and gives idle segments back to the OS.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::layout::Geometry;
use crate::region::{Access, Region};
use crate::ring::Desc;
use crate::{Error, Violation};

/// The shared buffers of one channel.
#[derive(Debug)]
pub struct Pool {
    region: Region,
    geometry: Geometry,
    buf_shift: u32,
}

impl Pool {
    /// Creates the pool memfd for `g` and maps it.
    pub fn create(g: &Geometry) -> Result<Self, Error> {
        g.validate()?;
        let region = Region::create("netchannel-pool", g.pool_bytes(), Access::Shared)?;
        Ok(Self {
            region,
            geometry: *g,
            buf_shift: g.buf_size.trailing_zeros(),
        })
    }

    /// Maps a pool memfd received from the peer.
    pub fn attach(fd: OwnedFd, g: &Geometry) -> Result<Self, Error> {
        g.validate()?;
        let region = Region::attach(fd, g.pool_bytes(), true)?;
        Ok(Self {
            region,
            geometry: *g,
            buf_shift: g.buf_size.trailing_zeros(),
        })
    }

    /// The memfd, to pass to the peer (an error once released).
    pub fn fd(&self) -> Result<BorrowedFd<'_>, Error> {
        self.region.fd()
    }

    /// Closes the memfd; the mapping stays, and segments are still given back.
    pub fn release_fd(&mut self) {
        self.region.release_fd();
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Bytes per buffer.
    pub fn buf_size(&self) -> u32 {
        self.geometry.buf_size
    }

    /// Number of buffer indices (over all segments).
    pub fn buffers(&self) -> u32 {
        self.geometry.buffers()
    }

    /// Checks the bounds of a descriptor written by the peer: index inside the pool, offset and
    /// length inside the buffer (overflow-safe), no reserved flags.
    #[inline]
    pub fn check(&self, d: &Desc) -> Result<(), Violation> {
        if d.buf >= self.geometry.buffers() {
            return Err(Violation::BadIndex { buf: d.buf });
        }
        if u64::from(d.offset) + u64::from(d.len) > u64::from(self.geometry.buf_size) {
            return Err(Violation::BadDesc {
                offset: d.offset,
                len: d.len,
                buf_size: self.geometry.buf_size,
            });
        }
        if d.flags & !Desc::KNOWN_FLAGS != 0 {
            return Err(Violation::BadFlags { flags: d.flags });
        }
        Ok(())
    }

    /// Start of buffer `buf`, which the caller has checked is inside the pool.
    #[inline]
    fn buf_ptr(&self, buf: u32) -> *mut u8 {
        debug_assert!(buf < self.geometry.buffers());
        let off = (buf as usize) << self.buf_shift;
        // SAFETY: `buf < buffers`, so `off + buf_size <= pool_bytes`, the length of the mapping.
        unsafe { self.region.base().as_ptr().add(off) }
    }

    /// The bytes `[offset, offset + len)` of a buffer, or `None` if they fall outside it.
    ///
    /// The pool is shared memory: a misbehaving peer can change these bytes while you read them.
    /// Treat them as untrusted input (copy out what you validate).
    #[inline]
    pub fn bytes(&self, buf: u32, offset: u32, len: u32) -> Option<&[u8]> {
        self.check(&Desc {
            buf,
            offset,
            len,
            flags: 0,
        })
        .ok()?;
        // SAFETY: bounds checked above; the mapping lives as long as `self`. Bytes have no
        // invalid values, so a concurrent write by the peer can garble data but not break
        // memory safety.
        Some(unsafe {
            std::slice::from_raw_parts(self.buf_ptr(buf).add(offset as usize), len as usize)
        })
    }

    /// Mutable access to a whole buffer, or `None` if `buf` is outside the pool.
    ///
    /// Only the end that holds the buffer (per its ledger) should call this; the other end has
    /// no business writing it, but nothing stops a misbehaving peer from doing so.
    #[inline]
    pub fn bytes_mut(&mut self, buf: u32) -> Option<&mut [u8]> {
        if buf >= self.geometry.buffers() {
            return None;
        }
        // SAFETY: in bounds (checked above) of a writable mapping that lives as long as `self`;
        // `&mut self` keeps this end from handing out a second reference to the same buffer.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.buf_ptr(buf), self.geometry.buf_size as usize)
        })
    }

    /// The bytes `[offset, offset + len)` of buffer `src` and, at the same time, the whole of
    /// another buffer `dst` to write: for a protocol stack that builds its answer while it reads
    /// the packet. `None` if the range falls outside `src`, `dst` is outside the pool, or they
    /// are the same buffer.
    #[inline]
    pub fn bytes_and_mut(
        &mut self,
        src: u32,
        offset: u32,
        len: u32,
        dst: u32,
    ) -> Option<(&[u8], &mut [u8])> {
        if src == dst || dst >= self.geometry.buffers() {
            return None;
        }
        self.check(&Desc {
            buf: src,
            offset,
            len,
            flags: 0,
        })
        .ok()?;
        // SAFETY: both ranges are in bounds of the mapping (checked above) and lie in different
        // buffers, so they do not overlap; `&mut self` keeps this end from handing out any
        // other reference into the pool meanwhile. As with `bytes`, the peer may still write
        // the packet's bytes: they are data, not trusted structure.
        unsafe {
            let r =
                std::slice::from_raw_parts(self.buf_ptr(src).add(offset as usize), len as usize);
            let w =
                std::slice::from_raw_parts_mut(self.buf_ptr(dst), self.geometry.buf_size as usize);
            Some((r, w))
        }
    }

    /// Copies `len` bytes at `src_off` of buffer `src` to `dst_off` of buffer `dst` (different
    /// buffers). Returns false, copying nothing, if either range falls outside its buffer or the
    /// buffers are the same.
    #[inline]
    pub fn copy(&mut self, src: u32, src_off: u32, len: u32, dst: u32, dst_off: u32) -> bool {
        let ok = src != dst
            && self
                .check(&Desc {
                    buf: src,
                    offset: src_off,
                    len,
                    flags: 0,
                })
                .is_ok()
            && self
                .check(&Desc {
                    buf: dst,
                    offset: dst_off,
                    len,
                    flags: 0,
                })
                .is_ok();
        if ok {
            // SAFETY: both ranges are inside the mapping (checked above) and inside two
            // different buffers, so they do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.buf_ptr(src).add(src_off as usize),
                    self.buf_ptr(dst).add(dst_off as usize),
                    len as usize,
                );
            }
        }
        ok
    }

    /// Drops this process's mappings of the pool's pages (`MADV_DONTNEED`); see
    /// [`Region::forget_pages`].
    pub fn forget_pages(&self) -> Result<(), Error> {
        self.region.forget_pages()
    }

    /// Returns the pages of segment `seg` to the OS. Its bytes read as zeros afterwards.
    pub fn release_segment(&self, seg: u32) -> Result<(), Error> {
        let bytes = self.geometry.segment_bytes();
        self.region.punch_hole(seg as usize * bytes, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::resident_shmem_bytes;

    fn small() -> Geometry {
        Geometry {
            segments: 8,
            bufs_per_segment: 64,
            ..Geometry::default()
        }
    }

    #[test]
    fn check_refuses_every_out_of_bounds_shape() {
        let p = Pool::create(&small()).unwrap();
        let n = p.buffers();
        let bs = p.buf_size();
        let ok = Desc {
            buf: n - 1,
            offset: bs - 1,
            len: 1,
            flags: 0,
        };
        assert_eq!(p.check(&ok), Ok(()));
        assert_eq!(
            p.check(&Desc {
                buf: 0,
                offset: 0,
                len: bs,
                flags: 0
            }),
            Ok(())
        );
        assert_eq!(
            p.check(&Desc {
                buf: 0,
                offset: bs,
                len: 0,
                flags: 0
            }),
            Ok(())
        );
        for buf in [n, n + 1, u32::MAX] {
            assert_eq!(
                p.check(&Desc { buf, ..ok }),
                Err(Violation::BadIndex { buf })
            );
        }
        for (offset, len) in [
            (bs, 1),
            (0, bs + 1),
            (u32::MAX, 1),
            (1, u32::MAX),
            (u32::MAX, u32::MAX),
        ] {
            assert!(matches!(
                p.check(&Desc {
                    buf: 0,
                    offset,
                    len,
                    flags: 0
                }),
                Err(Violation::BadDesc { .. })
            ));
        }
        assert_eq!(
            p.check(&Desc { flags: 1, ..ok }),
            Err(Violation::BadFlags { flags: 1 })
        );
        assert!(p.bytes(n, 0, 1).is_none());
        assert!(p.bytes(0, bs, 1).is_none());
    }

    #[test]
    fn released_segments_leave_resident_memory() {
        let g = Geometry {
            segments: 16,
            bufs_per_segment: 512,
            ..Geometry::default()
        }; // 1 MiB segments
        let mut p = Pool::create(&g).unwrap();
        let before = resident_shmem_bytes().unwrap();
        for b in 0..p.buffers() {
            p.bytes_mut(b).unwrap().fill(0xa5);
        }
        let touched = resident_shmem_bytes().unwrap();
        assert!(
            touched >= before + 15 * 1024 * 1024,
            "touching 16 MiB shows up in RssShmem ({before} -> {touched})"
        );
        for seg in 0..16 {
            p.release_segment(seg).unwrap();
        }
        let after = resident_shmem_bytes().unwrap();
        assert!(
            after + 15 * 1024 * 1024 <= touched,
            "punched segments leave RssShmem ({touched} -> {after})"
        );
        assert_eq!(
            p.bytes(0, 0, 4).unwrap(),
            &[0, 0, 0, 0],
            "a released segment reads as zeros"
        );
    }
}
