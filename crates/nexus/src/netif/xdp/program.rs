//! The steering program, written as eBPF instructions.
//!
//! For every frame: parse Ethernet (untagged, or with a VLAN-0 priority tag: any other VLAN
//! belongs to the kernel), then IPv4 (any header length, so options too) or IPv6 (through up to
//! six hop-by-hop, routing, destination-options and fragment headers), then the UDP or TCP
//! destination port, and look up (protocol, address, port) in the claims map, first with the
//! packet's destination address and then with the wildcard. A hit is redirected to the AF_XDP
//! socket of the frame's receive queue; everything else (ARP, ICMP, every other port, other
//! VLANs, a longer or unknown IPv6 header chain, a queue without a socket) passes to the
//! kernel's stack untouched, and so does a routing header with segments left (not for this
//! host yet). This is what the nexus parses past itself (`flowswitch::parse`), so every frame
//! it can take reaches it.
//!
//! Fragments: the nexus reassembles them itself, so all of a claimed datagram's fragments must
//! reach it, but only the first one carries the ports. A first fragment (offset 0, more
//! fragments set; for IPv6 a fragment header with offset 0 and M set, whose header chain goes
//! on to UDP or TCP) is looked up in the claims map like any packet, and on a hit its fragment
//! key (family, IPv4 protocol, identification, source, destination: [`frag_key`]) goes into the
//! frags map, with the time (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) as its value, before it is
//! redirected. A non-first fragment is looked up by that key in the frags map alone: a hit no
//! older than the maximum age ([`FRAG_MAX_AGE`], the nexus's default reassembly timeout, after
//! which the nexus would have dropped the datagram anyway) is steered like its first fragment;
//! a miss, or an older hit (which is deleted), passes to the kernel. Entries expire because a
//! key does not name one datagram for ever: a peer's IPv4 identification (16 bits) wraps, and
//! anyone can send a spoofed first fragment to a claimed port to mark an identification, so an
//! entry that lived until the LRU forgot it would steer the later fragments of a datagram meant
//! for a kernel socket (another port, same source, destination, protocol and identification) to
//! the nexus, and the kernel would lose that datagram. The window that remains is the maximum
//! age: within it, such a datagram is still taken. The limits: a non-first fragment that
//! arrives before its first fragment is not known yet and passes to the kernel, so the nexus
//! never sees it and that datagram is lost (the nexus counts it as a reassembly timeout). The
//! frags map is an LRU hash: apart from expired entries met by a later fragment, entries are
//! not removed by hand, the oldest are forgotten as new datagrams come, so a burst of more
//! fragmented datagrams in flight than the map holds loses some of them the same way.

use std::time::Duration;

use super::bpf::Insn;

/// Size of a claims-map key: protocol, family, port (network order), address (16 bytes, IPv4
/// in the first four).
pub const KEY_SIZE: usize = 20;

/// Size of a frags-map key: family, IPv4 protocol (0 for IPv6), two zero bytes, the
/// identification (IPv4's 16 bits then two zero bytes, or IPv6's 32 bits, as on the wire), the
/// source address and the destination address (16 bytes each, IPv4 in the first four).
pub const FRAG_KEY_SIZE: usize = 40;

/// Size of a frags-map value: when the datagram's first fragment was steered, in
/// `bpf_ktime_get_ns` nanoseconds (CLOCK_MONOTONIC), native byte order.
pub const FRAG_VALUE_SIZE: usize = 8;

/// How long after its first fragment a datagram's later fragments are still steered: the
/// default of the nexus's reassembly timeout (`datapath.reassembly_timeout_ms`, 30 000), after
/// which the nexus drops an incomplete datagram anyway.
pub const FRAG_MAX_AGE: Duration = Duration::from_secs(30);

/// The key of one claim.
pub fn claim_key(proto: u8, addr: std::net::IpAddr, port: u16) -> [u8; KEY_SIZE] {
    let mut k = [0u8; KEY_SIZE];
    k[0] = proto;
    k[2..4].copy_from_slice(&port.to_be_bytes());
    match addr {
        std::net::IpAddr::V4(a) => {
            k[1] = 4;
            k[4..8].copy_from_slice(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            k[1] = 6;
            k[4..20].copy_from_slice(&a.octets());
        }
    }
    k
}

/// The frags-map key of one fragmented datagram, as the program writes it: the family is the
/// source address's (both addresses are of one family in any packet); `proto` is the IPv4
/// header's protocol and is ignored for IPv6 (0 in the key: the fragment header's next header
/// is not part of it); `id` is the identification, of which IPv4 has the low 16 bits.
pub fn frag_key(
    proto: u8,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    id: u32,
) -> [u8; FRAG_KEY_SIZE] {
    let mut k = [0u8; FRAG_KEY_SIZE];
    match src {
        std::net::IpAddr::V4(_) => {
            k[0] = 4;
            k[1] = proto;
            k[4..6].copy_from_slice(&(id as u16).to_be_bytes());
        }
        std::net::IpAddr::V6(_) => {
            k[0] = 6;
            k[4..8].copy_from_slice(&id.to_be_bytes());
        }
    }
    for (at, addr) in [(8, src), (24, dst)] {
        match addr {
            std::net::IpAddr::V4(a) => k[at..at + 4].copy_from_slice(&a.octets()),
            std::net::IpAddr::V6(a) => k[at..at + 16].copy_from_slice(&a.octets()),
        }
    }
    k
}

// Opcode parts.
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const ALU64: u8 = 0x07;
const JMP: u8 = 0x05;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const MEM: u8 = 0x60;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const AND: u8 = 0x50;
const LSH: u8 = 0x60;
const MOV: u8 = 0xb0;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const JLT: u8 = 0xa0;
const JA: u8 = 0x00;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;

const FP: u8 = 10;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_MAP_DELETE: i32 = 3;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_REDIRECT_MAP: i32 = 51;
/// `BPF_ANY`: create or replace.
const BPF_ANY: i32 = 0;
const XDP_PASS: i32 = 2;
#[cfg(test)]
const XDP_TX: i32 = 3;

/// How many IPv6 extension headers the program walks before it gives up and passes.
const MAX_V6_EXT: usize = 6;

// The stack: the claims key (24 bytes, the last 4 padding), the frags key below it, and the
// frags map's value (the 8-byte stamp) below that; 72 bytes in all, zeroed first (the verifier
// wants map keys initialised, and the keys' unused bytes must be zero).
const CLAIM: i16 = -24;
const FRAG: i16 = -64;
const VALUE: i16 = -72;

/// A tiny assembler with forward labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of jumps to patch.
    fixups: Vec<(usize, Label)>,
    /// Where each label was placed.
    labels: Vec<Option<usize>>,
}

/// A jump target, made by [`Asm::new_label`] and placed by [`Asm::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        });
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | MOV | K, dst, 0, 0, imm);
    }
    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.raw(ALU64 | MOV | X, dst, src, 0, 0);
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | ADD | K, dst, 0, 0, imm);
    }
    fn add_reg(&mut self, dst: u8, src: u8) {
        self.raw(ALU64 | ADD | X, dst, src, 0, 0);
    }
    fn sub_reg(&mut self, dst: u8, src: u8) {
        self.raw(ALU64 | SUB | X, dst, src, 0, 0);
    }
    fn and_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | AND | K, dst, 0, 0, imm);
    }
    fn lsh_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | LSH | K, dst, 0, 0, imm);
    }
    fn load(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.raw(LDX | MEM | size, dst, src, off, 0);
    }
    fn store(&mut self, size: u8, dst: u8, off: i16, src: u8) {
        self.raw(STX | MEM | size, dst, src, off, 0);
    }
    fn jump_imm(&mut self, op: u8, dst: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.raw(JMP | op | K, dst, 0, 0, imm);
    }
    fn jump_reg(&mut self, op: u8, dst: u8, src: u8, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.raw(JMP | op | X, dst, src, 0, 0);
    }
    fn goto(&mut self, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.raw(JMP | JA, 0, 0, 0, 0);
    }
    /// `if ptr + len > end goto to`: the bounds check the verifier wants before every packet
    /// load, on the same pointer (`scratch` is clobbered).
    fn check(&mut self, scratch: u8, ptr: u8, len: i32, end: u8, to: Label) {
        self.mov_reg(scratch, ptr);
        self.add_imm(scratch, len);
        self.jump_reg(JGT, scratch, end, to);
    }
    /// `dst = map fd` (a two-slot `BPF_LD | BPF_DW | BPF_IMM` with `BPF_PSEUDO_MAP_FD`).
    fn load_map(&mut self, dst: u8, fd: i32) {
        self.raw(0x18, dst, 1, 0, fd);
        self.raw(0, 0, 0, 0, 0);
    }
    /// `dst = imm` for any 64-bit value (a two-slot `BPF_LD | BPF_DW | BPF_IMM`, source 0: the
    /// low 32 bits in the first slot, the high ones in the second).
    fn load_imm64(&mut self, dst: u8, imm: u64) {
        self.raw(0x18, dst, 0, 0, imm as u32 as i32);
        self.raw(0, 0, 0, 0, (imm >> 32) as u32 as i32);
    }
    fn call(&mut self, helper: i32) {
        self.raw(JMP | CALL, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.raw(JMP | EXIT, 0, 0, 0, 0);
    }
    fn new_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    fn label(&mut self, l: Label) {
        if let Some(at) = self.labels.get_mut(l.0) {
            *at = Some(self.insns.len());
        }
    }
    /// How many labels were made and never placed (a bug in this file; the tests check 0).
    #[cfg(test)]
    fn unplaced(&self) -> usize {
        self.labels.iter().filter(|l| l.is_none()).count()
    }
    fn finish(mut self) -> Vec<Insn> {
        for &(at, l) in &self.fixups {
            // Every label used is placed; a missing one would be a bug in this file, caught
            // by the unit tests, so fall back to a jump to the next instruction.
            let to = self.labels.get(l.0).copied().flatten().unwrap_or(at + 1);
            self.insns[at].off = (to as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// What the program does with a frame it steers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Redirect it to the AF_XDP socket of its queue in this XSK map (fd), or pass it to the
    /// kernel if the queue has none.
    Redirect(i32),
    /// Return `XDP_TX`: the tests' way to tell "steered" from "passed" in `BPF_PROG_TEST_RUN`,
    /// where a redirect to a socket-less XSK map falls back to `XDP_PASS`.
    #[cfg(test)]
    Tx,
}

/// The steering program for a claims map, a frags map and an XSK map (given as fds). The
/// later fragments of a datagram are steered for `frag_max_age` after its first fragment was
/// ([`FRAG_MAX_AGE`] unless the reassembly timeout is configured otherwise; an age past
/// `u64::MAX` nanoseconds is taken as that, so as for ever).
pub fn steering(claims_fd: i32, frags_fd: i32, xsks_fd: i32, frag_max_age: Duration) -> Vec<Insn> {
    assemble(
        claims_fd,
        frags_fd,
        max_age_ns(frag_max_age),
        Verdict::Redirect(xsks_fd),
    )
    .finish()
}

fn max_age_ns(age: Duration) -> u64 {
    u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)
}

/// The program, unpatched. Registers: r6 = ctx and r9 = "a first fragment" survive the helper
/// calls; before them r2 = data, r3 = data_end, r7 = the start of the IP header, r4 the
/// current header, r5, r8 and r0 scratch. A later fragment keeps its stamp in r7 across the
/// clock's call.
fn assemble(claims_fd: i32, frags_fd: i32, max_age_ns: u64, verdict: Verdict) -> Asm {
    let mut a = Asm::default();
    let pass = a.new_label();
    let ether = a.new_label();
    let vlan = a.new_label();
    let v4 = a.new_label();
    let v4_l4 = a.new_label();
    let v4_first = a.new_label();
    let v6 = a.new_label();
    let l4 = a.new_label();
    let frag_lookup = a.new_label();
    let expired = a.new_label();
    let lookup = a.new_label();
    let hit = a.new_label();
    let steer = a.new_label();

    // r6 = ctx; r2 = data; r3 = data_end; r9 = 0 (not a first fragment); the stack zeroed.
    a.mov_reg(6, 1);
    a.load(W, 2, 6, 0);
    a.load(W, 3, 6, 4);
    a.mov_imm(9, 0);
    for off in (VALUE..0).step_by(8) {
        a.store(DW, FP, off, 9);
    }

    // Ethernet, maybe with a VLAN-0 priority tag (r5 = EtherType, r7 = the IP header).
    a.check(4, 2, 14, 3, pass);
    a.load(H, 5, 2, 12);
    a.mov_reg(7, 2);
    a.add_imm(7, 14);
    a.jump_imm(JEQ, 5, 0x0081, vlan); // 0x8100, read little-endian
    a.goto(ether);
    a.label(vlan);
    a.check(4, 2, 18, 3, pass);
    a.load(H, 5, 2, 14);
    a.and_imm(5, 0xff0f); // the VLAN ID (TCI & 0x0fff), read little-endian
    a.jump_imm(JNE, 5, 0, pass);
    a.load(H, 5, 2, 16);
    a.mov_reg(7, 2);
    a.add_imm(7, 18);
    a.label(ether);
    a.jump_imm(JEQ, 5, 0x0008, v4); // 0x0800
    a.jump_imm(JEQ, 5, 0xdd86, v6); // 0x86dd
    a.goto(pass);

    // IPv4: the fixed header must be there, and carry UDP or TCP.
    a.label(v4);
    a.check(4, 7, 20, 3, pass);
    a.load(B, 5, 7, 9);
    a.jump_imm(JEQ, 5, 17, v4_l4);
    a.jump_imm(JEQ, 5, 6, v4_l4);
    a.goto(pass);
    a.label(v4_l4);
    // The claims key: protocol, family, address (the port comes later).
    a.store(B, FP, CLAIM, 5);
    a.mov_imm(8, 4);
    a.store(B, FP, CLAIM + 1, 8);
    a.load(W, 0, 7, 16);
    a.store(W, FP, CLAIM + 4, 0);
    // The frags key: family, protocol, identification, source, destination.
    a.store(B, FP, FRAG, 8);
    a.store(B, FP, FRAG + 1, 5);
    a.load(H, 0, 7, 4);
    a.store(H, FP, FRAG + 4, 0);
    a.load(W, 0, 7, 12);
    a.store(W, FP, FRAG + 8, 0);
    a.load(W, 0, 7, 16);
    a.store(W, FP, FRAG + 24, 0);
    // A non-first fragment (offset != 0) has no ports; a first one (offset 0, MF) is marked.
    a.load(H, 8, 7, 6);
    a.mov_reg(0, 8);
    a.and_imm(0, 0xff1f); // the fragment offset, read little-endian
    a.jump_imm(JNE, 0, 0, frag_lookup);
    a.and_imm(8, 0x0020); // MF, read little-endian
    a.jump_imm(JEQ, 8, 0, v4_first);
    a.mov_imm(9, 1);
    a.label(v4_first);
    // The L4 header starts after IHL words (options included).
    a.load(B, 5, 7, 0);
    a.and_imm(5, 0x0f);
    a.lsh_imm(5, 2);
    a.jump_imm(JLT, 5, 20, pass);
    a.mov_reg(4, 7);
    a.add_reg(4, 5);
    a.check(8, 4, 4, 3, pass);
    a.load(H, 5, 4, 2);
    a.store(H, FP, CLAIM + 2, 5);
    a.goto(lookup);

    // IPv6: the fixed header, then the header chain (r5 = next header, r4 = its start).
    a.label(v6);
    a.check(4, 7, 40, 3, pass);
    a.mov_imm(8, 6);
    a.store(B, FP, CLAIM + 1, 8);
    a.store(B, FP, FRAG, 8);
    for i in 0..4i16 {
        a.load(W, 0, 7, 8 + 4 * i);
        a.store(W, FP, FRAG + 8 + 4 * i, 0);
        a.load(W, 0, 7, 24 + 4 * i);
        a.store(W, FP, CLAIM + 4 + 4 * i, 0);
        a.store(W, FP, FRAG + 24 + 4 * i, 0);
    }
    a.load(B, 5, 7, 6);
    a.mov_reg(4, 7);
    a.add_imm(4, 40);
    // Unrolled: the verifier takes no loops it cannot bound, and six headers are plenty.
    for _ in 0..MAX_V6_EXT {
        let opts = a.new_label();
        let routing = a.new_label();
        let frag = a.new_label();
        let next = a.new_label();
        a.jump_imm(JEQ, 5, 17, l4);
        a.jump_imm(JEQ, 5, 6, l4);
        a.jump_imm(JEQ, 5, 0, opts); // hop-by-hop options
        a.jump_imm(JEQ, 5, 60, opts); // destination options
        a.jump_imm(JEQ, 5, 43, routing);
        a.jump_imm(JEQ, 5, 44, frag);
        a.goto(pass);
        // A routing header with segments left is not for this host yet: the kernel's to route
        // (the nexus would drop it).
        a.label(routing);
        a.check(8, 4, 8, 3, pass);
        a.load(B, 0, 4, 3);
        a.jump_imm(JNE, 0, 0, pass);
        // Options and routing headers: (length + 1) * 8 bytes, 8 at least.
        a.label(opts);
        a.check(8, 4, 8, 3, pass);
        a.load(B, 5, 4, 0);
        a.load(B, 8, 4, 1);
        a.add_imm(8, 1);
        a.lsh_imm(8, 3);
        a.add_reg(4, 8);
        a.goto(next);
        // The fragment header: 8 bytes; offset 0 with M set is a first fragment.
        a.label(frag);
        a.check(8, 4, 8, 3, pass);
        a.load(W, 0, 4, 4);
        a.store(W, FP, FRAG + 4, 0);
        a.load(H, 0, 4, 2);
        a.mov_reg(9, 0);
        a.and_imm(0, 0xf8ff); // the fragment offset, read little-endian
        a.jump_imm(JNE, 0, 0, frag_lookup);
        a.and_imm(9, 0x0100); // M, read little-endian
        a.load(B, 5, 4, 0);
        a.add_imm(4, 8);
        a.label(next);
    }
    a.jump_imm(JEQ, 5, 17, l4);
    a.jump_imm(JEQ, 5, 6, l4);
    a.goto(pass);

    // The UDP or TCP destination port of an IPv6 packet (r5 = protocol, r4 = its header).
    a.label(l4);
    a.check(8, 4, 4, 3, pass);
    a.store(B, FP, CLAIM, 5);
    a.load(H, 5, 4, 2);
    a.store(H, FP, CLAIM + 2, 5);
    a.goto(lookup);

    // A non-first fragment: steered if its first fragment was, at most `max_age_ns` ago. The
    // time is read after the lookup, so it is never before the stamp found (CLOCK_MONOTONIC
    // is one clock for all CPUs) and the unsigned difference does not wrap.
    a.label(frag_lookup);
    a.load_map(1, frags_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, i32::from(FRAG));
    a.call(HELPER_MAP_LOOKUP);
    a.jump_imm(JEQ, 0, 0, pass);
    a.load(DW, 7, 0, 0);
    a.call(HELPER_KTIME_GET_NS);
    a.sub_reg(0, 7);
    a.load_imm64(1, max_age_ns);
    a.jump_reg(JGT, 0, 1, expired);
    a.goto(steer);
    // Expired: another datagram's, or a stale or spoofed mark. Forget it and pass.
    a.label(expired);
    a.load_map(1, frags_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, i32::from(FRAG));
    a.call(HELPER_MAP_DELETE);
    a.goto(pass);

    // Claimed with this address, or with the wildcard?
    a.label(lookup);
    a.load_map(1, claims_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, i32::from(CLAIM));
    a.call(HELPER_MAP_LOOKUP);
    a.jump_imm(JNE, 0, 0, hit);
    a.mov_imm(7, 0);
    a.store(W, FP, CLAIM + 4, 7);
    a.store(DW, FP, CLAIM + 8, 7);
    a.store(W, FP, CLAIM + 16, 7);
    a.load_map(1, claims_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, i32::from(CLAIM));
    a.call(HELPER_MAP_LOOKUP);
    a.jump_imm(JEQ, 0, 0, pass);

    // A first fragment of a claimed port: its other fragments follow it, for the maximum age
    // from now (the stamp; BPF_ANY restamps a key seen before). If the map cannot take the
    // key (it always can: it is an LRU), they pass, and the datagram times out.
    a.label(hit);
    a.jump_imm(JEQ, 9, 0, steer);
    a.call(HELPER_KTIME_GET_NS);
    a.store(DW, FP, VALUE, 0);
    a.load_map(1, frags_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, i32::from(FRAG));
    a.mov_reg(3, FP);
    a.add_imm(3, i32::from(VALUE));
    a.mov_imm(4, BPF_ANY);
    a.call(HELPER_MAP_UPDATE);

    a.label(steer);
    match verdict {
        // To the socket of this queue; to the kernel if the queue has none.
        Verdict::Redirect(xsks_fd) => {
            a.load(W, 2, 6, 16);
            a.load_map(1, xsks_fd);
            a.mov_imm(3, XDP_PASS);
            a.call(HELPER_REDIRECT_MAP);
        }
        #[cfg(test)]
        Verdict::Tx => a.mov_imm(0, XDP_TX),
    }
    a.exit();

    a.label(pass);
    a.mov_imm(0, XDP_PASS);
    a.exit();
    a
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};

    use rustix::io::Errno;

    use super::super::bpf;
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        for verdict in [Verdict::Redirect(4), Verdict::Tx] {
            let a = assemble(3, 5, max_age_ns(FRAG_MAX_AGE), verdict);
            assert_eq!(a.unplaced(), 0, "labels made and never placed");
            let p = a.finish();
            for (i, insn) in p.iter().enumerate() {
                let class = insn.code & 0x07;
                let op = insn.code & 0xf0;
                if class == JMP && op != CALL && op != EXIT {
                    let to = i as i64 + 1 + i64::from(insn.off);
                    assert!(
                        to > i as i64 && (to as usize) < p.len(),
                        "jump at {i} to {to}"
                    );
                }
            }
            assert_eq!(p.last().map(|i| i.code), Some(JMP | EXIT));
        }
        assert_eq!(
            steering(3, 5, 4, FRAG_MAX_AGE),
            assemble(3, 5, 30_000_000_000, Verdict::Redirect(4)).finish()
        );
    }

    #[test]
    fn the_max_age_is_one_64_bit_immediate() {
        // 30 s in ns does not fit an i32: a two-slot load, low half first, source register 0
        // (a plain constant, not a map fd).
        let p = steering(3, 5, 4, FRAG_MAX_AGE);
        let at = p
            .iter()
            .position(|i| i.code == 0x18 && i.regs >> 4 == 0)
            .expect("a 64-bit immediate");
        let got = u64::from(p[at].imm as u32) | (u64::from(p[at + 1].imm as u32) << 32);
        assert_eq!(got, 30_000_000_000);
        assert_eq!((p[at + 1].code, p[at + 1].regs, p[at + 1].off), (0, 0, 0));
        // It is compared unsigned (JGT, register) right after.
        assert_eq!(p[at + 2].code, JMP | JGT | X);
        assert_eq!(max_age_ns(Duration::MAX), u64::MAX);
    }

    #[test]
    fn keys_put_the_port_in_network_order() {
        let k = claim_key(17, "198.18.0.1".parse().expect("addr"), 7);
        assert_eq!(&k[..8], &[17, 4, 0, 7, 198, 18, 0, 1]);
        assert!(k[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn frag_keys_follow_the_layout() {
        let k = frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), 0x1234);
        let mut want = [0u8; FRAG_KEY_SIZE];
        want[..6].copy_from_slice(&[4, 17, 0, 0, 0x12, 0x34]);
        want[8..12].copy_from_slice(&SRC4.octets());
        want[24..28].copy_from_slice(&DST4.octets());
        assert_eq!(k, want);

        let k = frag_key(17, IpAddr::V6(SRC6), IpAddr::V6(DST6), 0x8765_4321);
        let mut want = [0u8; FRAG_KEY_SIZE];
        want[..8].copy_from_slice(&[6, 0, 0, 0, 0x87, 0x65, 0x43, 0x21]);
        want[8..24].copy_from_slice(&SRC6.octets());
        want[24..40].copy_from_slice(&DST6.octets());
        assert_eq!(k, want);
    }

    // Frames. The IPv4 claim is of the destination address, the IPv6 one of the wildcard, so
    // both lookups are exercised.
    const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const DST4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
    const DST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const CLAIMED: u16 = 4791;
    const OTHER: u16 = 4792;
    const TX: u32 = XDP_TX as u32;
    const PASS: u32 = XDP_PASS as u32;

    fn eth(vlan: Option<u16>, ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if let Some(tci) = vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    /// A UDP header to `port` and 8 bytes of payload.
    fn udp(port: u16) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&40000u16.to_be_bytes());
        u.extend_from_slice(&port.to_be_bytes());
        u.extend_from_slice(&16u16.to_be_bytes());
        u.extend_from_slice(&[0; 2]);
        u.extend_from_slice(b"netchanl");
        u
    }

    /// An IPv4 packet; `frag` is the flags and fragment offset field.
    fn ipv4(proto: u8, id: u16, frag: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + options.len();
        let mut p = vec![0x40 | (hlen / 4) as u8, 0];
        p.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0]);
        p.extend_from_slice(&SRC4.octets());
        p.extend_from_slice(&DST4.octets());
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        p
    }

    /// An IPv6 packet; `exts` is the header chain after the fixed header, `next` its first.
    fn ipv6(next: u8, exts: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((exts.len() + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&SRC6.octets());
        p.extend_from_slice(&DST6.octets());
        p.extend_from_slice(exts);
        p.extend_from_slice(payload);
        p
    }

    /// An options header (hop-by-hop or destination) of `(len + 1) * 8` bytes of PadN.
    fn v6_opts(next: u8, len: u8) -> Vec<u8> {
        let total = (usize::from(len) + 1) * 8;
        let mut h = vec![next, len, 1, (total - 4) as u8];
        h.resize(total, 0);
        h
    }

    /// A routing header (type 4, segment routing) with segments left 0 and one segment.
    fn v6_routing(next: u8) -> Vec<u8> {
        let mut h = vec![next, 2, 4, 0, 0, 0, 0, 0];
        h.extend_from_slice(&DST6.octets());
        h
    }

    /// A fragment header: `offset` in 8-byte units.
    fn v6_frag(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
        let mut h = vec![next, 0];
        h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h
    }

    fn v4(l3: &[u8]) -> Vec<u8> {
        eth(None, 0x0800, l3)
    }

    fn v6(l3: &[u8]) -> Vec<u8> {
        eth(None, 0x86dd, l3)
    }

    /// The program, loaded, with its maps.
    struct Rig {
        _claims: OwnedFd,
        frags: OwnedFd,
        _xsks: Option<OwnedFd>,
        prog: OwnedFd,
    }

    /// Loads the program in its test verdict (a steered frame gets `XDP_TX`).
    fn rig(test: &str) -> Option<Rig> {
        rig_with(test, false)
    }

    /// Loads the program, the production one if `redirect` (with an XSK map and no socket in
    /// it), with a claim of UDP to `DST4:CLAIMED` and `[::]:CLAIMED`; None (after saying why)
    /// where bpf(2) is not allowed. A program the verifier refuses fails the test, with the
    /// verifier's log.
    fn rig_with(test: &str, redirect: bool) -> Option<Rig> {
        let skip = |why: &dyn std::fmt::Display| {
            println!("skipped: {test} needs to load an XDP program (root or CAP_BPF): {why}");
        };
        let maps = || -> Result<_, Errno> {
            let claims =
                bpf::map_create(bpf::MapType::Hash, KEY_SIZE as u32, 4, 16, "nc_claims_t")?;
            let frags = bpf::map_create(
                bpf::MapType::LruHash,
                FRAG_KEY_SIZE as u32,
                FRAG_VALUE_SIZE as u32,
                4096,
                "nc_frags_t",
            )?;
            let xsks = if redirect {
                Some(bpf::map_create(bpf::MapType::XskMap, 4, 4, 1, "nc_xsks_t")?)
            } else {
                None
            };
            Ok((claims, frags, xsks))
        };
        let (claims, frags, xsks) = match maps() {
            Ok(m) => m,
            Err(e) => {
                skip(&e);
                return None;
            }
        };
        let insns = match &xsks {
            Some(x) => steering(
                claims.as_raw_fd(),
                frags.as_raw_fd(),
                x.as_raw_fd(),
                FRAG_MAX_AGE,
            ),
            None => assemble(
                claims.as_raw_fd(),
                frags.as_raw_fd(),
                max_age_ns(FRAG_MAX_AGE),
                Verdict::Tx,
            )
            .finish(),
        };
        let prog = match bpf::prog_load_xdp(&insns, "nc_steer_t") {
            Ok(p) => p,
            Err(e) if e.log.is_empty() || matches!(e.errno, Errno::PERM | Errno::NOSYS) => {
                skip(&e);
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        for addr in [IpAddr::V4(DST4), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
            bpf::map_update(
                claims.as_fd(),
                &claim_key(17, addr, CLAIMED),
                &1u32.to_ne_bytes(),
            )
            .expect("claim");
        }
        Some(Rig {
            _claims: claims,
            frags,
            _xsks: xsks,
            prog,
        })
    }

    impl Rig {
        fn run(&self, frame: &[u8]) -> u32 {
            bpf::prog_test_run(self.prog.as_fd(), frame).expect("BPF_PROG_TEST_RUN")
        }

        fn knows(&self, key: &[u8; FRAG_KEY_SIZE]) -> bool {
            self.stamp(key).is_some()
        }

        /// The frags map's stamp for `key`, if it has one.
        fn stamp(&self, key: &[u8; FRAG_KEY_SIZE]) -> Option<u64> {
            let mut v = [0u8; FRAG_VALUE_SIZE];
            bpf::map_lookup(self.frags.as_fd(), key, &mut v)
                .expect("lookup")
                .then_some(u64::from_ne_bytes(v))
        }

        /// Stamps `key` by hand, as if its first fragment had been steered at `ns`.
        fn mark(&self, key: &[u8; FRAG_KEY_SIZE], ns: u64) {
            bpf::map_update(self.frags.as_fd(), key, &ns.to_ne_bytes()).expect("update");
        }
    }

    /// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
    fn monotonic_ns() -> u64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
    }

    #[test]
    fn claimed_ports_are_steered_and_others_pass() {
        let Some(r) = rig("claimed_ports_are_steered_and_others_pass") else {
            return;
        };
        assert_eq!(r.run(&v4(&ipv4(17, 1, 0, &[], &udp(CLAIMED)))), TX);
        assert_eq!(r.run(&v4(&ipv4(17, 1, 0, &[], &udp(OTHER)))), PASS);
        assert_eq!(r.run(&v6(&ipv6(17, &[], &udp(CLAIMED)))), TX);
        assert_eq!(r.run(&v6(&ipv6(17, &[], &udp(OTHER)))), PASS);
        // TCP to the port is another claim (none here).
        assert_eq!(r.run(&v4(&ipv4(6, 1, 0, &[], &udp(CLAIMED)))), PASS);
        // IPv4 options: the port is found after them.
        assert_eq!(r.run(&v4(&ipv4(17, 1, 0, &[1; 8], &udp(CLAIMED)))), TX);
        assert_eq!(r.run(&v4(&ipv4(17, 1, 0, &[1; 8], &udp(OTHER)))), PASS);
        // An unfragmented datagram leaves nothing in the frags map, nor DF a fragment.
        assert_eq!(r.run(&v4(&ipv4(17, 9, 0x4000, &[], &udp(CLAIMED)))), TX);
        let key = frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), 1);
        assert!(!r.knows(&key));
        assert!(!r.knows(&frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), 9)));
        // Not IP.
        assert_eq!(r.run(&eth(None, 0x0806, &[0; 28])), PASS);
    }

    #[test]
    fn the_redirecting_program_loads_and_falls_back_to_pass_without_a_socket() {
        let test = "the_redirecting_program_loads_and_falls_back_to_pass_without_a_socket";
        let Some(r) = rig_with(test, true) else {
            return;
        };
        // bpf_redirect_map to a queue with no socket returns its flags, XDP_PASS; but the
        // first fragment of a claimed port was seen, and remembered, on the way.
        let first = v4(&ipv4(17, 0x4444, 0x2000, &[], &udp(CLAIMED)));
        assert_eq!(r.run(&first), PASS);
        assert!(r.knows(&frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), 0x4444)));
        assert_eq!(r.run(&v4(&ipv4(17, 0x4444, 2, &[], b"the rest"))), PASS);
        assert_eq!(r.run(&v4(&ipv4(17, 1, 0, &[], &udp(OTHER)))), PASS);
    }

    #[test]
    fn vlan_0_priority_tags_are_steered_and_other_vlans_pass() {
        let Some(r) = rig("vlan_0_priority_tags_are_steered_and_other_vlans_pass") else {
            return;
        };
        let l3v4 = ipv4(17, 1, 0, &[], &udp(CLAIMED));
        let l3v6 = ipv6(17, &[], &udp(CLAIMED));
        // Priority 5, VLAN 0; and VLAN 0 with no priority.
        for tci in [0xa000, 0] {
            assert_eq!(r.run(&eth(Some(tci), 0x0800, &l3v4)), TX, "{tci:#x}");
            assert_eq!(r.run(&eth(Some(tci), 0x86dd, &l3v6)), TX, "{tci:#x}");
        }
        assert_eq!(
            r.run(&eth(Some(0), 0x0800, &ipv4(17, 1, 0, &[], &udp(OTHER)))),
            PASS
        );
        // Any other VLAN is the kernel's, low or high bits of the ID.
        for tci in [5, 0xa005, 0x0800, 0x0fff] {
            assert_eq!(r.run(&eth(Some(tci), 0x0800, &l3v4)), PASS, "{tci:#x}");
            assert_eq!(r.run(&eth(Some(tci), 0x86dd, &l3v6)), PASS, "{tci:#x}");
        }
        // Two tags (QinQ inside a priority tag) pass too.
        let mut inner = 0x0005u16.to_be_bytes().to_vec();
        inner.extend_from_slice(&0x0800u16.to_be_bytes());
        inner.extend_from_slice(&l3v4);
        assert_eq!(r.run(&eth(Some(0), 0x8100, &inner)), PASS);
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let Some(r) = rig("ipv6_extension_headers_are_walked") else {
            return;
        };
        // Hop-by-hop, destination options, routing (segments left 0), UDP.
        let mut chain = v6_opts(60, 0);
        chain.extend(v6_opts(43, 1));
        chain.extend(v6_routing(17));
        assert_eq!(r.run(&v6(&ipv6(0, &chain, &udp(CLAIMED)))), TX);
        assert_eq!(r.run(&v6(&ipv6(0, &chain, &udp(OTHER)))), PASS);
        // A routing header with a segment left is the kernel's to route.
        let mut routed = v6_routing(17);
        routed[3] = 1;
        assert_eq!(r.run(&v6(&ipv6(43, &routed, &udp(CLAIMED)))), PASS);
        // Six headers are walked; a seventh is too many.
        let chain = |n: usize| {
            let mut c = Vec::new();
            for i in 0..n {
                c.extend(v6_opts(if i + 1 == n { 17 } else { 60 }, 0));
            }
            c
        };
        assert_eq!(r.run(&v6(&ipv6(0, &chain(6), &udp(CLAIMED)))), TX);
        assert_eq!(r.run(&v6(&ipv6(0, &chain(7), &udp(CLAIMED)))), PASS);
        // An unknown header (ESP, 50) or none (59) ends the walk.
        assert_eq!(r.run(&v6(&ipv6(0, &v6_opts(50, 0), &udp(CLAIMED)))), PASS);
        assert_eq!(r.run(&v6(&ipv6(59, &[], &udp(CLAIMED)))), PASS);
        // An atomic fragment (offset 0, no M) is a whole datagram: steered, not remembered.
        let f = v6_frag(17, 0, false, 77);
        assert_eq!(r.run(&v6(&ipv6(44, &f, &udp(CLAIMED)))), TX);
        assert!(!r.knows(&frag_key(0, IpAddr::V6(SRC6), IpAddr::V6(DST6), 77)));
    }

    #[test]
    fn ipv4_fragments_follow_their_first_fragment() {
        let Some(r) = rig("ipv4_fragments_follow_their_first_fragment") else {
            return;
        };
        let key = |id: u16| frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), u32::from(id));
        // Offset 0 with MF (and DF clear); then offset 2 (16 bytes), the last one.
        let first = |id, port| v4(&ipv4(17, id, 0x2000, &[], &udp(port)));
        let rest = |id| v4(&ipv4(17, id, 2, &[], b"the rest"));
        assert_eq!(r.run(&rest(0x1234)), PASS, "before its first fragment");
        assert_eq!(r.run(&first(0x1234, CLAIMED)), TX);
        assert!(r.knows(&key(0x1234)));
        assert_eq!(r.run(&rest(0x1234)), TX);
        // A middle fragment (MF and an offset) too.
        assert_eq!(r.run(&v4(&ipv4(17, 0x1234, 0x2001, &[], b"middle!!"))), TX);
        assert_eq!(r.run(&rest(0x1235)), PASS, "another datagram");
        // The same ID of another protocol is another datagram.
        assert_eq!(r.run(&v4(&ipv4(6, 0x1234, 2, &[], b"the rest"))), PASS);
        // A first fragment of an unclaimed port is not remembered, nor its fragments steered.
        assert_eq!(r.run(&first(0x2222, OTHER)), PASS);
        assert!(!r.knows(&key(0x2222)));
        assert_eq!(r.run(&rest(0x2222)), PASS);
        // With options, and behind a priority tag.
        let opt = eth(
            Some(0),
            0x0800,
            &ipv4(17, 0x3333, 0x2000, &[1; 8], &udp(CLAIMED)),
        );
        assert_eq!(r.run(&opt), TX);
        assert!(r.knows(&key(0x3333)));
        let rest = eth(
            Some(0x2000),
            0x0800,
            &ipv4(17, 0x3333, 2, &[1; 4], b"the rest"),
        );
        assert_eq!(r.run(&rest), TX);
    }

    #[test]
    fn ipv6_fragments_follow_their_first_fragment() {
        let Some(r) = rig("ipv6_fragments_follow_their_first_fragment") else {
            return;
        };
        let key = |id| frag_key(0, IpAddr::V6(SRC6), IpAddr::V6(DST6), id);
        let first = |id, port| v6(&ipv6(44, &v6_frag(17, 0, true, id), &udp(port)));
        let rest = |id| v6(&ipv6(44, &v6_frag(17, 2, false, id), b"the rest"));
        assert_eq!(r.run(&rest(0xdead_beef)), PASS, "before its first fragment");
        assert_eq!(r.run(&first(0xdead_beef, CLAIMED)), TX);
        assert!(r.knows(&key(0xdead_beef)));
        assert_eq!(r.run(&rest(0xdead_beef)), TX);
        assert_eq!(
            r.run(&v6(&ipv6(
                44,
                &v6_frag(17, 1, true, 0xdead_beef),
                b"middle!!"
            ))),
            TX
        );
        assert_eq!(r.run(&rest(0xdead_bef0)), PASS, "another datagram");
        assert_eq!(r.run(&first(0x2222, OTHER)), PASS);
        assert!(!r.knows(&key(0x2222)));
        assert_eq!(r.run(&rest(0x2222)), PASS);
        // Behind other headers, and with headers after the fragment header (hop-by-hop, the
        // fragment header, destination options, UDP); a later fragment has only the
        // unfragmentable part before its fragment header.
        let mut chain = v6_opts(44, 0);
        chain.extend(v6_frag(60, 0, true, 0x77));
        chain.extend(v6_opts(17, 0));
        assert_eq!(
            r.run(&eth(Some(0), 0x86dd, &ipv6(0, &chain, &udp(CLAIMED)))),
            TX
        );
        assert!(r.knows(&key(0x77)));
        let mut chain = v6_opts(44, 0);
        chain.extend(v6_frag(60, 3, false, 0x77));
        assert_eq!(r.run(&v6(&ipv6(0, &chain, b"the rest"))), TX);
    }

    #[test]
    fn fragment_marks_expire_after_the_max_age() {
        let Some(r) = rig("fragment_marks_expire_after_the_max_age") else {
            return;
        };
        let key = |id: u16| frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), u32::from(id));
        let key6 = |id| frag_key(0, IpAddr::V6(SRC6), IpAddr::V6(DST6), id);
        let first = |id| v4(&ipv4(17, id, 0x2000, &[], &udp(CLAIMED)));
        let rest = |id| v4(&ipv4(17, id, 2, &[], b"the rest"));
        let first6 = |id| v6(&ipv6(44, &v6_frag(17, 0, true, id), &udp(CLAIMED)));
        let rest6 = |id| v6(&ipv6(44, &v6_frag(17, 2, false, id), b"the rest"));

        // A first fragment steered now is stamped with the time (ktime: CLOCK_MONOTONIC), and
        // its later fragments follow.
        let before = monotonic_ns();
        assert_eq!(r.run(&first(0x5555)), TX);
        let after = monotonic_ns();
        let stamp = r.stamp(&key(0x5555)).expect("remembered");
        assert_ne!(stamp, 0);
        assert!(stamp <= after, "stamp {stamp} after the clock's {after}");
        // (With a second of slack for the NMI-safe clock the helper reads.)
        assert!(
            stamp + 1_000_000_000 >= before,
            "stamp {stamp}, {before} before"
        );
        assert_eq!(r.run(&rest(0x5555)), TX);
        assert_eq!(r.run(&first6(0x5555)), TX);
        assert_ne!(r.stamp(&key6(0x5555)), Some(0));
        assert_eq!(r.run(&rest6(0x5555)), TX);

        let now = monotonic_ns();
        let max = max_age_ns(FRAG_MAX_AGE);
        if now < 2 * max {
            println!(
                "skipped: fragment_marks_expire_after_the_max_age needs CLOCK_MONOTONIC past {} s \
                 to stamp old marks (it is at {} s)",
                2 * max / 1_000_000_000,
                now / 1_000_000_000
            );
            return;
        }
        // A mark from boot (as a stale entry of a wrapped identification, or a spoofed first
        // fragment, would be): the later fragment is the kernel's, and the mark is forgotten.
        for (k, frame) in [(key(0x6666), rest(0x6666)), (key6(0x6666), rest6(0x6666))] {
            r.mark(&k, 0);
            assert_eq!(r.run(&frame), PASS);
            assert!(!r.knows(&k), "an expired mark is deleted");
            assert_eq!(r.run(&frame), PASS);
        }
        // Just inside and just outside the age (5 s either side of it).
        r.mark(&key(0x7777), now - max + 5_000_000_000);
        assert_eq!(r.run(&rest(0x7777)), TX);
        r.mark(&key(0x7777), now - max - 5_000_000_000);
        assert_eq!(r.run(&rest(0x7777)), PASS);
        // An identification seen again after a wrap: the old mark no longer steers, and a new
        // first fragment of a claimed port stamps it afresh.
        r.mark(&key(0x5555), 1);
        assert_eq!(r.run(&rest(0x5555)), PASS);
        assert_eq!(r.run(&first(0x5555)), TX);
        assert!(
            r.stamp(&key(0x5555))
                .is_some_and(|s| s + 1_000_000_000 >= now)
        );
        assert_eq!(r.run(&rest(0x5555)), TX);
    }

    #[test]
    fn truncated_frames_pass_or_are_steered_only_when_whole_enough() {
        let Some(r) = rig("truncated_frames_pass_or_are_steered_only_when_whole_enough") else {
            return;
        };
        let mut chain = v6_opts(60, 0);
        chain.extend(v6_opts(43, 1));
        chain.extend(v6_routing(17));
        let mut rest6 = v6_opts(44, 0);
        rest6.extend(v6_frag(17, 2, false, 0x99));
        // (frame, the shortest prefix that is steered: up to the destination port), first
        // fragments before the later ones, which are steered once their first one was.
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (v4(&ipv4(17, 1, 0, &[], &udp(CLAIMED))), 14 + 20 + 4),
            (v4(&ipv4(17, 1, 0, &[1; 8], &udp(CLAIMED))), 14 + 28 + 4),
            (
                eth(Some(0), 0x0800, &ipv4(17, 1, 0, &[], &udp(CLAIMED))),
                18 + 20 + 4,
            ),
            (v6(&ipv6(17, &[], &udp(CLAIMED))), 14 + 40 + 4),
            (
                eth(Some(0), 0x86dd, &ipv6(17, &[], &udp(CLAIMED))),
                18 + 40 + 4,
            ),
            (
                v6(&ipv6(0, &chain, &udp(CLAIMED))),
                14 + 40 + chain.len() + 4,
            ),
            (v4(&ipv4(17, 0x99, 0x2000, &[], &udp(CLAIMED))), 14 + 20 + 4),
            (
                v6(&ipv6(44, &v6_frag(17, 0, true, 0x99), &udp(CLAIMED))),
                14 + 48 + 4,
            ),
            (v4(&ipv4(17, 0x99, 2, &[], b"the rest")), 14 + 20),
            (v6(&ipv6(0, &rest6, b"the rest")), 14 + 40 + 16),
        ];
        for (i, (frame, steered_from)) in cases.iter().enumerate() {
            for len in 0..=frame.len() {
                let want = if len >= *steered_from { TX } else { PASS };
                match bpf::prog_test_run(r.prog.as_fd(), &frame[..len]) {
                    Ok(got) => assert_eq!(got, want, "case {i}, {len} of {} bytes", frame.len()),
                    // The kernel runs nothing shorter than an Ethernet header.
                    Err(Errno::INVAL) if len < 14 => {}
                    Err(e) => panic!("case {i}, {len} bytes: {e}"),
                }
            }
        }
        // The first fragments long enough to show their port were remembered.
        assert!(r.knows(&frag_key(17, IpAddr::V4(SRC4), IpAddr::V4(DST4), 0x99)));
        assert!(r.knows(&frag_key(0, IpAddr::V6(SRC6), IpAddr::V6(DST6), 0x99)));
    }
}
