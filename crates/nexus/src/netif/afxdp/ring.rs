//! The memory an AF_XDP socket shares with the kernel: the UMEM (packet frames) and the four
//! single-producer single-consumer rings (fill, completion, RX, TX).
//!
//! This is the backend's only unsafe code. The kernel is trusted to keep to its side of each
//! ring, but not blindly: every frame address it hands back is bounds-checked against the UMEM
//! before a slice is made of it.

#![allow(unsafe_code)] // mmap'd rings and UMEM shared with the kernel; each block documented.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::xdp::XdpRingOffset;

/// A private mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; access to it is coordinated by the rings' protocol and
// by `&mut self` on every method that writes.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap, and nothing borrowed from the
        // mapping outlives its owner (slices are tied to `&self`/`&mut self`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The frames of an AF_XDP socket: `count` frames of `frame_size` bytes.
#[derive(Debug)]
pub(super) struct Umem {
    map: Mapping,
    frame_size: usize,
}

impl Umem {
    /// Anonymous, page-aligned memory for `count` frames.
    pub(super) fn new(count: usize, frame_size: usize) -> Result<Self, Errno> {
        let len = count.checked_mul(frame_size).ok_or(Errno::INVAL)?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::POPULATE,
            )
        }?;
        let ptr = NonNull::new(ptr.cast()).ok_or(Errno::NOMEM)?;
        Ok(Self {
            map: Mapping { ptr, len },
            frame_size,
        })
    }

    /// Start address and length, for `XDP_UMEM_REG`.
    pub(super) fn region(&self) -> (u64, u64) {
        (self.map.ptr.as_ptr() as u64, self.map.len as u64)
    }

    /// The `len` bytes at UMEM offset `addr`, if they lie inside one frame.
    pub(super) fn frame(&self, addr: u64, len: u32) -> Option<&[u8]> {
        let (addr, len) = self.check(addr, len as usize)?;
        // SAFETY: in bounds (checked), and the frame is ours: it came off the RX ring and goes
        // back to the fill ring only after the slice is dropped.
        Some(unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().add(addr), len) })
    }

    /// The whole frame at `addr`, to fill before it goes on the TX ring.
    pub(super) fn frame_mut(&mut self, addr: u64) -> Option<&mut [u8]> {
        let (addr, len) = self.check(addr, self.frame_size)?;
        // SAFETY: in bounds (checked); the frame is on our free list, so the kernel holds it
        // in no ring, and `&mut self` excludes other slices.
        Some(unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr().add(addr), len) })
    }

    fn check(&self, addr: u64, len: usize) -> Option<(usize, usize)> {
        let addr = usize::try_from(addr).ok()?;
        let frame_end = (addr / self.frame_size + 1) * self.frame_size;
        (addr.checked_add(len)? <= frame_end.min(self.map.len)).then_some((addr, len))
    }
}

/// One ring shared with the kernel. `T` is `u64` (fill, completion) or `XdpDesc` (RX, TX).
#[derive(Debug)]
pub(super) struct Ring<T> {
    _map: Mapping,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    mask: u32,
    /// Our copy of our own index, and the last seen value of the kernel's.
    local: u32,
    remote: u32,
}

// SAFETY: see `Mapping`; the pointers point into the mapping the ring owns.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T: Copy> Ring<T> {
    /// Maps the ring of `size` entries (a power of two) at page offset `pgoff` of `fd`.
    pub(super) fn map(
        fd: BorrowedFd<'_>,
        off: &XdpRingOffset,
        pgoff: u64,
        size: u32,
    ) -> Result<Self, Errno> {
        if !size.is_power_of_two() {
            return Err(Errno::INVAL);
        }
        let len =
            usize::try_from(off.desc).map_err(|_| Errno::INVAL)? + size as usize * size_of::<T>();
        // SAFETY: maps the ring the kernel made for this socket; the length is the kernel's
        // descriptor offset plus `size` entries, exactly what it allocated.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                pgoff,
            )
        }?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::NOMEM)?;
        let at = |o: u64| -> Result<NonNull<u8>, Errno> {
            let o = usize::try_from(o).map_err(|_| Errno::INVAL)?;
            if o + 4 > len {
                return Err(Errno::INVAL);
            }
            // SAFETY: `o` is inside the mapping (checked above).
            Ok(unsafe { base.add(o) })
        };
        let flags_off = off.flags.unwrap_or(off.consumer + 4);
        let ring = Self {
            producer: at(off.producer)?.cast(),
            consumer: at(off.consumer)?.cast(),
            flags: at(flags_off)?.cast(),
            descs: at(off.desc)?.cast(),
            _map: Mapping { ptr: base, len },
            mask: size - 1,
            local: 0,
            remote: 0,
        };
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping at the kernel's (4-aligned) producer offset.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    /// Whether the kernel asks to be woken (`XDP_RING_NEED_WAKEUP`).
    pub(super) fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        let flags = unsafe { self.flags.as_ref() };
        flags.load(Ordering::Relaxed) & 1 != 0
    }

    fn slot(&self, index: u32) -> *mut T {
        // SAFETY: `index & mask` < size, and the mapping holds `size` entries from `descs`.
        unsafe { self.descs.as_ptr().add((index & self.mask) as usize) }
    }

    // Producer side (fill, TX).

    /// Whether the kernel has yet to consume some of what we published.
    pub(super) fn outstanding(&mut self) -> bool {
        self.remote = self.consumer().load(Ordering::Acquire);
        self.remote != self.local
    }

    /// Free entries we may write, at most `want`.
    pub(super) fn free(&mut self, want: u32) -> u32 {
        let size = self.mask + 1;
        let mut free = size - self.local.wrapping_sub(self.remote);
        if free < want {
            self.remote = self.consumer().load(Ordering::Acquire);
            free = size - self.local.wrapping_sub(self.remote);
        }
        free.min(want)
    }

    /// Writes entry `i` past our producer index (`i` < what [`Ring::free`] granted).
    pub(super) fn write(&mut self, i: u32, v: T) {
        // SAFETY: the slot is free (granted by `free`), so the kernel does not read it until
        // `submit` publishes it.
        unsafe { self.slot(self.local.wrapping_add(i)).write_volatile(v) }
    }

    /// Publishes `n` written entries.
    pub(super) fn submit(&mut self, n: u32) {
        self.local = self.local.wrapping_add(n);
        self.producer().store(self.local, Ordering::Release);
    }

    // Consumer side (RX, completion).

    /// Entries ready to read, at most `max`.
    pub(super) fn ready(&mut self, max: u32) -> u32 {
        let mut ready = self.remote.wrapping_sub(self.local);
        if ready == 0 {
            self.remote = self.producer().load(Ordering::Acquire);
            ready = self.remote.wrapping_sub(self.local);
        }
        // A kernel that ran ahead by more than the ring holds would be a kernel bug; never
        // read more than one ring's worth.
        ready.min(self.mask + 1).min(max)
    }

    /// Reads entry `i` past our consumer index (`i` < what [`Ring::ready`] granted).
    pub(super) fn read(&self, i: u32) -> T {
        // SAFETY: the kernel published this slot (its producer index is past it) and does not
        // reuse it until `release` moves our consumer index.
        unsafe { self.slot(self.local.wrapping_add(i)).read_volatile() }
    }

    /// Gives `n` read entries back.
    pub(super) fn release(&mut self, n: u32) {
        self.local = self.local.wrapping_add(n);
        self.consumer().store(self.local, Ordering::Release);
    }
}
