//! The steering program, written as eBPF instructions.
//!
//! For every frame: parse Ethernet, then IPv4 (any header length) or IPv6 (no extension
//! headers), then the UDP or TCP destination port, and look up (protocol, address, port) in the
//! claims map, first with the packet's destination address and then with the wildcard. A hit
//! is redirected to the AF_XDP socket of the frame's receive queue; everything else (ARP, ICMP,
//! every other port, a queue without a socket) passes to the kernel's stack untouched.
//!
//! Fragments: a non-first IPv4 fragment carries no ports, so it passes to the kernel, which
//! holds the reserved port and drops what it cannot reassemble. A first fragment of a claimed
//! port is steered, and the flowswitch counts and drops it (see `flowswitch::parse`).
//! IPv6 packets with extension headers (fragments included) pass to the kernel likewise.

use super::bpf::Insn;

/// Size of a claims-map key: protocol, family, port (network order), address (16 bytes, IPv4
/// in the first four).
pub const KEY_SIZE: usize = 20;

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
const HELPER_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;

/// A tiny assembler with forward labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of jumps to patch.
    fixups: Vec<(usize, Label)>,
    labels: [Option<usize>; Label::COUNT],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Pass,
    V4,
    V4L4,
    V6,
    V6L4,
    Lookup,
    Redirect,
}

impl Label {
    const COUNT: usize = 7;
}

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
    /// `dst = map fd` (a two-slot `BPF_LD | BPF_DW | BPF_IMM` with `BPF_PSEUDO_MAP_FD`).
    fn load_map(&mut self, dst: u8, fd: i32) {
        self.raw(0x18, dst, 1, 0, fd);
        self.raw(0, 0, 0, 0, 0);
    }
    fn call(&mut self, helper: i32) {
        self.raw(JMP | CALL, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.raw(JMP | EXIT, 0, 0, 0, 0);
    }
    fn label(&mut self, l: Label) {
        self.labels[l as usize] = Some(self.insns.len());
    }
    fn finish(mut self) -> Vec<Insn> {
        for &(at, l) in &self.fixups {
            // Every label used is placed below; a missing one would be a bug in this file,
            // caught by the unit test, so fall back to a jump to the next instruction.
            let to = self.labels[l as usize].unwrap_or(at + 1);
            self.insns[at].off = (to as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// The steering program for a claims map and an XSK map (given as fds).
pub fn steering(claims_fd: i32, xsks_fd: i32) -> Vec<Insn> {
    use Label::*;
    let mut a = Asm::default();
    // r6 = ctx; r2 = data; r3 = data_end; key (24 bytes at fp-24) zeroed.
    a.mov_reg(6, 1);
    a.load(W, 2, 6, 0);
    a.load(W, 3, 6, 4);
    a.mov_imm(7, 0);
    for off in [-24, -16, -8] {
        a.store(DW, FP, off, 7);
    }
    // Ethernet.
    a.mov_reg(4, 2);
    a.add_imm(4, 14);
    a.jump_reg(JGT, 4, 3, Pass);
    a.load(H, 5, 2, 12);
    a.jump_imm(JEQ, 5, 0x0008, V4); // 0x0800, read little-endian
    a.jump_imm(JEQ, 5, 0xdd86, V6); // 0x86dd
    a.goto(Pass);

    // IPv4: the fixed header must be there; a non-first fragment passes.
    a.label(V4);
    a.mov_reg(4, 2);
    a.add_imm(4, 14 + 20);
    a.jump_reg(JGT, 4, 3, Pass);
    a.load(H, 5, 2, 14 + 6);
    a.and_imm(5, 0xff1f); // fragment offset, read little-endian
    a.jump_imm(JNE, 5, 0, Pass);
    a.load(B, 5, 2, 14 + 9);
    a.jump_imm(JEQ, 5, 17, V4L4);
    a.jump_imm(JEQ, 5, 6, V4L4);
    a.goto(Pass);
    a.label(V4L4);
    a.store(B, FP, -24, 5);
    a.mov_imm(7, 4);
    a.store(B, FP, -23, 7);
    a.load(W, 5, 2, 14 + 16);
    a.store(W, FP, -20, 5);
    // The L4 header starts after IHL words.
    a.load(B, 5, 2, 14);
    a.and_imm(5, 0x0f);
    a.lsh_imm(5, 2);
    a.jump_imm(JLT, 5, 20, Pass);
    a.mov_reg(4, 2);
    a.add_reg(4, 5);
    a.add_imm(4, 14);
    a.mov_reg(8, 4);
    a.add_imm(8, 4);
    a.jump_reg(JGT, 8, 3, Pass);
    a.load(H, 5, 4, 2);
    a.store(H, FP, -22, 5);
    a.goto(Lookup);

    // IPv6 with UDP or TCP right after the fixed header.
    a.label(V6);
    a.mov_reg(4, 2);
    a.add_imm(4, 14 + 40 + 4);
    a.jump_reg(JGT, 4, 3, Pass);
    a.load(B, 5, 2, 14 + 6);
    a.jump_imm(JEQ, 5, 17, V6L4);
    a.jump_imm(JEQ, 5, 6, V6L4);
    a.goto(Pass);
    a.label(V6L4);
    a.store(B, FP, -24, 5);
    a.mov_imm(7, 6);
    a.store(B, FP, -23, 7);
    for i in 0..4i16 {
        a.load(W, 5, 2, 14 + 24 + 4 * i);
        a.store(W, FP, -20 + 4 * i, 5);
    }
    a.load(H, 5, 2, 14 + 40 + 2);
    a.store(H, FP, -22, 5);

    // Claimed with this address, or with the wildcard?
    a.label(Lookup);
    a.load_map(1, claims_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, -24);
    a.call(HELPER_MAP_LOOKUP);
    a.jump_imm(JNE, 0, 0, Redirect);
    a.mov_imm(7, 0);
    a.store(W, FP, -20, 7);
    a.store(DW, FP, -16, 7);
    a.store(W, FP, -8, 7);
    a.load_map(1, claims_fd);
    a.mov_reg(2, FP);
    a.add_imm(2, -24);
    a.call(HELPER_MAP_LOOKUP);
    a.jump_imm(JEQ, 0, 0, Pass);

    // To the socket of this queue; to the kernel if the queue has none.
    a.label(Redirect);
    a.load(W, 2, 6, 16);
    a.load_map(1, xsks_fd);
    a.mov_imm(3, XDP_PASS);
    a.call(HELPER_REDIRECT_MAP);
    a.exit();

    a.label(Pass);
    a.mov_imm(0, XDP_PASS);
    a.exit();
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let p = steering(3, 4);
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

    #[test]
    fn keys_put_the_port_in_network_order() {
        let k = claim_key(17, "198.18.0.1".parse().expect("addr"), 7);
        assert_eq!(&k[..8], &[17, 4, 0, 7, 198, 18, 0, 1]);
        assert!(k[8..].iter().all(|&b| b == 0));
    }
}
