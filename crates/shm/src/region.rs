//! memfd-backed shared-memory regions and their mappings.
//!
//! A region is created by the side that will write it. A region that only its owner may write is
//! sealed with `F_SEAL_FUTURE_WRITE` right after the owner has mapped it writable: from then on any
//! other mapping of it can only be read-only, and `write(2)` on it fails, in every process. Every
//! region is also sealed against shrinking and growing, so that a peer can never truncate memory
//! that the other side has mapped (which would turn its next access into SIGBUS); a side that
//! receives a region checks those seals before it maps it. Last comes `F_SEAL_SEAL`, so that a
//! peer can add no seal of its own: `F_SEAL_FUTURE_WRITE` added to a pool would make the
//! owner's hole punching fail, and the pool's idle memory could never be given back.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::Error;

/// The system page size (4 KiB on the machines we run on; read once).
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Rounds `len` up to a whole number of pages, or `None` on overflow.
pub fn page_round_up(len: usize) -> Option<usize> {
    let page = page_size();
    len.checked_add(page - 1).map(|l| l / page * page)
}

/// Who may write a region once it is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only the creator writes; every other mapping is read-only (sealed `F_SEAL_FUTURE_WRITE`).
    OwnerWrites,
    /// Both sides map it writable (the packet pool).
    Shared,
}

/// A memfd and the creator's or attacher's mapping of it.
#[derive(Debug)]
pub struct Region {
    /// The memfd, until [`Region::release_fd`]: the mapping lives on without it.
    fd: Option<OwnedFd>,
    map: Mapping,
}

impl Region {
    /// Creates a zero-filled region of `len` bytes (rounded up to pages), maps it writable, and
    /// seals it according to `access`.
    pub fn create(name: &str, len: usize, access: Access) -> Result<Self, Error> {
        let len = page_round_up(len).ok_or(Error::TooLarge {
            what: "region",
            len,
        })?;
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| Error::sys("memfd_create", e))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(|e| Error::sys("ftruncate", e))?;
        let map = Mapping::new(fd.as_fd(), len, true)?;
        let mut seals = SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
        if access == Access::OwnerWrites {
            seals |= SealFlags::FUTURE_WRITE;
        }
        rustix::fs::fcntl_add_seals(&fd, seals).map_err(|e| Error::sys("F_ADD_SEALS", e))?;
        Ok(Self { fd: Some(fd), map })
    }

    /// Maps a region received from the peer. `writable` asks for a shared writable mapping (the
    /// pool); otherwise it is read-only. Refuses a memfd whose size is not `expected_len` or that
    /// the peer could still shrink.
    pub fn attach(fd: OwnedFd, expected_len: usize, writable: bool) -> Result<Self, Error> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| Error::sys("F_GET_SEALS", e))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(Error::Unsealed);
        }
        let stat = rustix::fs::fstat(&fd).map_err(|e| Error::sys("fstat", e))?;
        let actual = u64::try_from(stat.st_size).unwrap_or(0);
        if actual != expected_len as u64 || expected_len == 0 {
            return Err(Error::RegionSize {
                expected: expected_len as u64,
                actual,
            });
        }
        let map = Mapping::new(fd.as_fd(), expected_len, writable)?;
        Ok(Self { fd: Some(fd), map })
    }

    /// The memfd, to pass to the peer (an error once released).
    pub fn fd(&self) -> Result<BorrowedFd<'_>, Error> {
        self.fd.as_ref().map(AsFd::as_fd).ok_or(Error::Handshake(
            "the region's memfd was released after set-up",
        ))
    }

    /// Closes the memfd; the mapping stays (and with it the memory). A server holding
    /// thousands of channels keeps one fd per channel (its doorbell) instead of four.
    pub fn release_fd(&mut self) {
        self.fd = None;
    }

    /// Length of the region in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Base address of this side's mapping.
    pub fn base(&self) -> NonNull<u8> {
        self.map.ptr
    }

    /// Whether this side's mapping is writable.
    pub fn writable(&self) -> bool {
        self.map.writable
    }

    /// Drops this process's page-table entries for the whole mapping (`MADV_DONTNEED`). The
    /// region is a shared memfd, so its contents are kept (in the memfd) and the next access
    /// faults them back in: only this process's resident size changes.
    pub fn forget_pages(&self) -> Result<(), Error> {
        // SAFETY: the range is exactly our own mapping; on a MAP_SHARED memfd mapping
        // MADV_DONTNEED drops page-table entries only, never contents, so no value any Rust
        // code can observe changes.
        unsafe {
            rustix::mm::madvise(
                self.map.ptr.as_ptr().cast(),
                self.map.len,
                rustix::mm::Advice::LinuxDontNeed,
            )
        }
        .map_err(|e| Error::sys("madvise(MADV_DONTNEED)", e))
    }

    /// Gives the pages of `[offset, offset + len)` back to the OS (`MADV_REMOVE` on this side's
    /// writable mapping: a hole punched in the memfd, with no need of its fd): the range reads
    /// as zeros afterwards, in every mapping, and no longer counts in anyone's resident size.
    /// Both bounds must be page-aligned and inside the region.
    pub fn punch_hole(&self, offset: usize, len: usize) -> Result<(), Error> {
        let page = page_size();
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || end.is_none_or(|e| e > self.map.len)
        {
            return Err(Error::TooLarge {
                what: "punch-hole range",
                len,
            });
        }
        // SAFETY: the range lies inside our own shared mapping (checked above). On a shared
        // memfd mapping MADV_REMOVE frees the backing pages, which then read as zeros: a
        // change of contents that the pool's ledger allows only for segments out of service,
        // whose buffers no reference points into.
        unsafe {
            rustix::mm::madvise(
                self.map.ptr.as_ptr().add(offset).cast(),
                len,
                rustix::mm::Advice::LinuxRemove,
            )
        }
        .map_err(|e| Error::sys("madvise(MADV_REMOVE)", e))
    }
}

/// One `mmap` of a memfd, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory; all concurrent access to it goes through atomics
// or through the ownership protocol of the rings and pool, which do not depend on the thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the base pointer.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Result<Self, Error> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a fresh shared mapping chosen by the kernel (null hint) overlaps no Rust object;
        // `len` is the memfd's size, checked by the caller, so every mapped page is backed.
        let ptr =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }
                .map_err(|e| Error::sys("mmap", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Error::TooLarge {
            what: "mapping",
            len,
        })?;
        Ok(Self { ptr, len, writable })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and every ring, pool or schema
        // reference into the mapping is owned by a structure that also owns (and so outlives
        // its use of) this mapping.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Resident shared-memory size of this process in bytes (`RssShmem` in `/proc/self/status`).
pub fn resident_shmem_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssShmem:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keeps_writing_after_seal_and_others_map_read_only() {
        let r = Region::create("t", 100, Access::OwnerWrites).unwrap();
        assert_eq!(r.len(), page_size());
        // SAFETY: in bounds of the owner's writable mapping.
        unsafe { r.base().as_ptr().write(7) };
        let dup = r.fd().unwrap().try_clone_to_owned().unwrap();
        // A second writable mapping of a FUTURE_WRITE-sealed memfd is refused...
        assert!(Mapping::new(dup.as_fd(), r.len(), true).is_err());
        // ...a read-only one works and sees the owner's write.
        let ro = Region::attach(dup, r.len(), false).unwrap();
        // SAFETY: in bounds of the read-only mapping.
        assert_eq!(unsafe { ro.base().as_ptr().read() }, 7);
    }

    #[test]
    fn attach_refuses_wrong_size_and_unsealed_memfds() {
        let r = Region::create("t", 8192, Access::Shared).unwrap();
        let dup = r.fd().unwrap().try_clone_to_owned().unwrap();
        assert!(matches!(
            Region::attach(dup, 4096, true),
            Err(Error::RegionSize {
                expected: 4096,
                actual: 8192
            })
        ));
        let raw = rustix::fs::memfd_create("u", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&raw, 4096).unwrap();
        assert!(matches!(
            Region::attach(raw, 4096, true),
            Err(Error::Unsealed)
        ));
    }

    #[test]
    fn a_peer_can_add_no_seal() {
        for access in [Access::Shared, Access::OwnerWrites] {
            let r = Region::create("t", 4 * page_size(), access).unwrap();
            let dup = r.fd().unwrap().try_clone_to_owned().unwrap();
            for seal in [SealFlags::FUTURE_WRITE, SealFlags::WRITE, SealFlags::SEAL] {
                assert_eq!(
                    rustix::fs::fcntl_add_seals(&dup, seal),
                    Err(rustix::io::Errno::PERM),
                    "{access:?} {seal:?}"
                );
            }
            if access == Access::Shared {
                // The pool's owner still gives pages back.
                r.punch_hole(page_size(), page_size()).unwrap();
            }
        }
    }

    /// An app shares the pool's open file description, so it can set its file status flags;
    /// none of them changes what the owner's calls on it do.
    #[test]
    fn a_peer_setting_file_flags_changes_nothing_for_the_owner() {
        use rustix::fs::OFlags;
        let r = Region::create("t", 4 * page_size(), Access::Shared).unwrap();
        let dup = r.fd().unwrap().try_clone_to_owned().unwrap();
        rustix::fs::fcntl_setfl(&dup, OFlags::APPEND | OFlags::NONBLOCK | OFlags::NOATIME).ok();
        r.punch_hole(page_size(), page_size()).unwrap();
        r.forget_pages().unwrap();
    }

    #[test]
    fn forgetting_pages_keeps_contents() {
        let r = Region::create("t", 64 * page_size(), Access::Shared).unwrap();
        let dup = r.fd().unwrap().try_clone_to_owned().unwrap();
        let other = Region::attach(dup, r.len(), true).unwrap();
        // SAFETY: in bounds of a writable mapping.
        unsafe { other.base().as_ptr().add(5 * page_size()).write(42) };
        r.forget_pages().unwrap();
        // SAFETY: in bounds.
        assert_eq!(unsafe { r.base().as_ptr().add(5 * page_size()).read() }, 42);
    }

    #[test]
    fn punch_hole_rejects_unaligned_or_out_of_range() {
        let r = Region::create("t", 4 * page_size(), Access::Shared).unwrap();
        assert!(r.punch_hole(1, page_size()).is_err());
        assert!(r.punch_hole(0, 5 * page_size()).is_err());
        assert!(r.punch_hole(usize::MAX - 4095, page_size()).is_err());
        r.punch_hole(page_size(), page_size()).unwrap();
    }
}
