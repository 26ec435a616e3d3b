//! The few bpf(2) commands the nexus needs: make a map, look up, update and delete its
//! elements, load a program, attach it to an interface with a link that dies with the nexus,
//! and run it once on a frame of our making (how the tests check what it steers).
//!
//! There is no libbpf and no C toolchain: each command's `union bpf_attr` member is a
//! `#[repr(C)]` struct of its own, zero-padded as the kernel requires.

#![allow(unsafe_code)] // bpf(2) has no safe wrapper; each call below is documented.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::io::Errno;

/// `BPF_MAP_CREATE` and friends.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `BPF_PROG_TYPE_XDP`.
const PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP`, the attach type of an XDP program.
const ATTACH_XDP: u32 = 37;

/// Map types the nexus uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MapType {
    /// `BPF_MAP_TYPE_HASH`.
    Hash = 1,
    /// `BPF_MAP_TYPE_LRU_HASH`: a hash that forgets its least recently used entries when full.
    LruHash = 9,
    /// `BPF_MAP_TYPE_XSKMAP`: queue index → AF_XDP socket.
    XskMap = 17,
}

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register in the low nibble, source register in the high one.
    pub regs: u8,
    /// Signed offset.
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `test` member (up to `duration`; the kernel zeroes the rest).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// Issues one bpf(2) command.
///
/// # Safety
/// `attr` must be the `bpf_attr` member of command `cmd`, and every pointer it holds must be
/// valid for what that command reads or writes.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<libc::c_long, Errno> {
    // SAFETY: the caller vouches for `attr`; its size is passed so the kernel reads no further.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    } else {
        Ok(r)
    }
}

/// Wraps an fd a successful bpf(2) command returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) returned a new fd (a non-negative int) that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn name16(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    b
}

/// Creates a map.
pub fn map_create(
    ty: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> Result<OwnedFd, Errno> {
    let mut a = MapCreateAttr {
        map_type: ty as u32,
        key_size,
        value_size,
        max_entries,
        map_name: name16(name),
        ..Default::default()
    };
    // SAFETY: `a` is BPF_MAP_CREATE's attr and holds no pointers.
    unsafe { bpf(BPF_MAP_CREATE, &mut a) }.map(owned)
}

/// Sets `map[key] = value` (both exactly the map's sizes).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> Result<(), Errno> {
    let mut a = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the key and value pointers are valid for their slices' lengths, which the
    // caller made the map's key and value sizes; the kernel only reads them.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut a) }.map(drop)
}

/// Reads `map[key]` into `value` (both exactly the map's sizes): false if there is none.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> Result<bool, Errno> {
    let mut a = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the key pointer is valid for reads and the value pointer for writes of their
    // slices' lengths, which the caller made the map's key and value sizes.
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut a) } {
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `map[key]`.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> Result<(), Errno> {
    let mut a = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the key pointer is valid for the key's length (the map's key size); read only.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut a) }.map(drop)
}

/// Why a program did not load.
#[derive(Debug, thiserror::Error)]
#[error("the kernel refused the XDP program ({errno}); verifier log:\n{log}")]
pub struct LoadError {
    /// The error bpf(2) returned.
    pub errno: Errno,
    /// What the verifier said.
    pub log: String,
}

/// Loads an XDP program. On failure it loads again with the verifier's log switched on, and
/// returns that log.
pub fn prog_load_xdp(insns: &[Insn], name: &str) -> Result<OwnedFd, LoadError> {
    const LICENSE: &[u8] = b"Dual MIT/GPL\0";
    let attr = |log: &mut [u8]| ProgLoadAttr {
        prog_type: PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: log.len() as u32,
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        prog_name: name16(name),
        expected_attach_type: ATTACH_XDP,
        ..Default::default()
    };
    let mut a = attr(&mut []);
    // SAFETY: `a` is BPF_PROG_LOAD's attr; `insns` and the NUL-terminated license outlive the
    // call, and there is no log buffer.
    let errno = match unsafe { bpf(BPF_PROG_LOAD, &mut a) } {
        Ok(fd) => return Ok(owned(fd)),
        Err(e) => e,
    };
    let mut log = vec![0u8; 1 << 20];
    let mut a = attr(&mut log);
    // SAFETY: as above, plus a log buffer of `log.len()` writable bytes that outlives the call.
    match unsafe { bpf(BPF_PROG_LOAD, &mut a) } {
        Ok(fd) => Ok(owned(fd)),
        Err(_) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(LoadError {
                errno,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

/// Runs a loaded XDP program once on a copy of `data` (`BPF_PROG_TEST_RUN`) and returns its
/// verdict (`XDP_PASS`, `XDP_TX`, ...). The kernel refuses (`EINVAL`) a frame shorter than an
/// Ethernet header or longer than a page's room for one.
pub fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8]) -> Result<u32, Errno> {
    let mut a = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: `a` is BPF_PROG_TEST_RUN's attr; the kernel reads `data_size_in` bytes from
    // `data_in`, which is `data`, and writes no data or context back (no buffers given).
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut a) }.map(|_| a.retval)
}

/// How an XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`).
    Native,
    /// In the generic path, after the kernel built a socket buffer (`XDP_FLAGS_SKB_MODE`).
    Generic,
}

impl XdpMode {
    fn flags(self) -> u32 {
        match self {
            Self::Generic => 1 << 1,
            Self::Native => 1 << 2,
        }
    }
}

/// Attaches an XDP program to an interface through a BPF link: the program stays attached
/// exactly as long as the returned fd is open, so it goes with the nexus, even on `kill -9`.
pub fn link_xdp(prog: BorrowedFd<'_>, ifindex: u32, mode: XdpMode) -> Result<OwnedFd, Errno> {
    let mut a = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: ATTACH_XDP,
        flags: mode.flags(),
    };
    // SAFETY: `a` is BPF_LINK_CREATE's attr and holds no pointers.
    unsafe { bpf(BPF_LINK_CREATE, &mut a) }.map(owned)
}
