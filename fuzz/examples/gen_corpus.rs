//! Writes the seed corpus: `cargo run --example gen_corpus` (from `fuzz/`). Seeds are small,
//! meaningful inputs from which the fuzzer starts; the fuzzer's own finds are merged in beside
//! them (`scripts/fuzz.sh`).

use std::fs;
use std::path::Path;

use etherparse::{PacketBuilder, TcpOptionElement};
use netchannel_fuzz::shm::{self, BufSel, HDesc, IndexVal, Op};
use netchannel_shm::control::{
    ChannelKind, ChannelStatus, ErrorCode, FlowProto, FlowStatus, NexusStatus, Offloads, Reply,
    Request, encode,
};

const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn build(b: etherparse::PacketBuilderStep<etherparse::UdpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn frames() {
    let t = "parse_frame";
    let udp4 = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
        .udp(40000, 53);
    write(t, "eth_ipv4_udp", &build(udp4, b"hello netchannel"));

    let udp6 = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(SRC6, DST6, 64)
        .udp(5353, 9000);
    write(t, "eth_ipv6_udp", &build(udp6, &[0xab; 40]));

    // A SYN with MSS, window scale, SACK-permitted and timestamps.
    let syn = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(SRC6, DST6, 64)
        .tcp(40001, 443, 0x1234_5678, 65535)
        .syn()
        .options(&[
            TcpOptionElement::MaximumSegmentSize(1440),
            TcpOptionElement::Noop,
            TcpOptionElement::WindowScale(7),
            TcpOptionElement::SelectiveAcknowledgementPermitted,
            TcpOptionElement::Timestamp(1, 0),
        ])
        .unwrap();
    let mut out = Vec::new();
    syn.write(&mut out, &[]).unwrap();
    write(t, "eth_ipv6_tcp_syn_mss", &out);

    let data = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .tcp(80, 40002, 1000, 512)
        .ack(77)
        .psh()
        .options(&[TcpOptionElement::Timestamp(5, 6)])
        .unwrap();
    let mut out = Vec::new();
    data.write(&mut out, &[0x5a; 100]).unwrap();
    // Ethernet padding after the IP packet, as the wire brings it.
    out.extend_from_slice(&[0; 6]);
    write(t, "eth_ipv4_tcp_psh_padded", &out);

    // An app's large TCP packet (no Ethernet header) for the segmentation offload.
    let big = PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .tcp(4000, 80, 0xffff_f000, 512)
        .ack(9)
        .fin()
        .options(&[TcpOptionElement::Timestamp(5, 6)])
        .unwrap();
    let mut out = Vec::new();
    big.write(&mut out, &[0x11; 3000]).unwrap();
    write(t, "ipv4_tcp_large", &out);

    // A v4 UDP packet without a checksum (allowed) and a VLAN-tagged frame (refused).
    let mut z = build(
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 1).udp(1, 2),
        b"zero",
    );
    z[26..28].fill(0);
    write(t, "ipv4_udp_zero_checksum", &z);
    let vlan = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .single_vlan(0x123.try_into().unwrap())
        .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
        .udp(1, 2);
    write(t, "eth_vlan_ipv4_udp", &build(vlan, b"x"));
    let prio = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .single_vlan(0.try_into().unwrap())
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(1, 2);
    write(t, "eth_vlan0_ipv6_udp", &build(prio, b"priority"));
    // IPv4 options (router alert, NOPs, EOL), as received: the parser walks past them.
    let plain = build(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
            .udp(1, 2),
        &[0x42; 700],
    );
    let mut opts = plain[..34].to_vec();
    opts.extend_from_slice(&[0x94, 4, 0, 0, 1, 1, 1, 0]);
    opts.extend_from_slice(&plain[34..]);
    opts[14] = 0x47;
    let total = (opts.len() - 14) as u16;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    opts[24..26].fill(0);
    let c = netchannel_nexus::flowswitch::parse::checksum(&[&opts[14..42]], 0);
    opts[24..26].copy_from_slice(&c.to_be_bytes());
    write(t, "eth_ipv4_options_udp_700", &opts);
    // IPv6 with hop-by-hop, destination options and routing (no segment left) before UDP.
    let v6 = build(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1, 2),
        &[0x24; 900],
    );
    let mut chain = v6[..54].to_vec();
    chain[20] = 0;
    chain.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0, 43, 0, 1, 4, 0, 0, 0, 0]);
    chain.extend_from_slice(&[17, 0, 253, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(&v6[54..]);
    let len = (chain.len() - 54) as u16;
    chain[18..20].copy_from_slice(&len.to_be_bytes());
    write(t, "eth_ipv6_ext_chain_udp_900", &chain);
    // A first IPv4 fragment (more fragments, 16 bytes of data).
    let mut frag = build(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
            .udp(1, 2),
        &[7; 8],
    );
    frag[20] = 0x20;
    frag[24..26].fill(0);
    let c = netchannel_nexus::flowswitch::parse::checksum(&[&frag[14..34]], 0);
    frag[24..26].copy_from_slice(&c.to_be_bytes());
    write(t, "eth_ipv4_first_fragment", &frag);
}

fn control() {
    let t = "control_decode";
    let reqs = [
        (
            "req_open_channel",
            Request::OpenChannel {
                kind: ChannelKind::LowLatency,
                ring_slots: Some(256),
                buffers: None,
                buf_size: Some(16384),
                offloads: Offloads::ALL,
            },
        ),
        ("req_channel_ready", Request::ChannelReady { channel: 3 }),
        (
            "req_close_channel",
            Request::CloseChannel { channel: u64::MAX },
        ),
        ("req_status", Request::Status { after: None }),
        ("req_status_page", Request::Status { after: Some(12) }),
        ("req_defunct", Request::Defunct { channel: 9 }),
        (
            "req_add_flow_v4",
            Request::AddFlow {
                channel: 1,
                proto: FlowProto::Udp,
                local: "0.0.0.0:0".parse().unwrap(),
                remote: None,
            },
        ),
        (
            "req_add_flow_v6",
            Request::AddFlow {
                channel: 2,
                proto: FlowProto::Tcp,
                local: "[fd00::1]:8080".parse().unwrap(),
                remote: Some("[fd00::2%3]:443".parse().unwrap()),
            },
        ),
        ("req_remove_flow", Request::RemoveFlow { flow: 17 }),
        ("req_flows", Request::Flows { after: Some(3) }),
    ];
    for (name, r) in &reqs {
        write(t, name, &encode(r));
    }
    // (The struct update keeps this building when NexusStatus gains a field.)
    #[allow(clippy::needless_update)]
    let status = NexusStatus {
        pid: 42,
        uptime_s: 12.5,
        clients: 1,
        fds: 9,
        rss_bytes: 1 << 20,
        control_errors: vec![("bad_message".into(), 2)],
        interface: vec![("rx_frames".into(), 10)],
        channels: vec![ChannelStatus {
            id: 1,
            pid: 100,
            uid: 1000,
            state: "defunct: quarantined".into(),
            drops: vec![("tx_not_owner".into(), 3)],
            audit: "ok".into(),
            ..ChannelStatus::default()
        }],
        next_after: Some(1),
        ..NexusStatus::default()
    };
    let replies = [
        ("reply_offer", Reply::ChannelOffer { channel: 5 }),
        (
            "reply_opened",
            Reply::ChannelOpened {
                channel: 5,
                addresses: vec!["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                mtu: 1500,
                offloads: Offloads {
                    rx_coalesce: true,
                    tx_segment: false,
                },
            },
        ),
        ("reply_done", Reply::Done),
        ("reply_status", Reply::Status(Box::new(status))),
        (
            "reply_flow_added",
            Reply::FlowAdded {
                flow: 4,
                local: "192.0.2.1:40000".parse().unwrap(),
            },
        ),
        (
            "reply_flows",
            Reply::Flows {
                flows: vec![FlowStatus {
                    id: 4,
                    channel: 5,
                    pid: 100,
                    uid: 1000,
                    proto: FlowProto::Tcp,
                    local: "192.0.2.1:40000".parse().unwrap(),
                    remote: Some("198.51.100.7:443".parse().unwrap()),
                    class: "best_effort".into(),
                    rx_packets: 1,
                    tx_packets: 2,
                }],
                next_after: None,
            },
        ),
        (
            "reply_error",
            Reply::Error {
                code: ErrorCode::InUse,
                message: "port 80 is held \"by\" the host\n".into(),
            },
        ),
    ];
    for (name, r) in &replies {
        write(t, name, &encode(r));
    }
    // A float serde_json does not read back exactly (the target tolerates 2 ulps there).
    let mut m = encode(&Reply::Done)[..8].to_vec();
    m.extend_from_slice(
        br#"{"op":"status","pid":1,"uptime_s":1234.5678901234567,"clients":0,"fds":3,"rss_bytes":0,"control_errors":[],"channels":[]}"#,
    );
    write(t, "reply_status_float_uptime", &m);
    // Bodies alone: the target also tries every input behind a valid header.
    write(t, "body_status", br#"{"op":"status"}"#);
    write(
        t,
        "body_open_defaults",
        br#"{"op":"open_channel","ring_slots":null,"buffers":8}"#,
    );
}

fn hostile() {
    let t = "shm_hostile_peer";
    use Op::*;
    let send_round = [
        Alloc { off: 0, len: 60 },
        Alloc { off: 3, len: 1400 },
        Alloc {
            off: 63,
            len: 0xffff,
        },
        Send { n: 3 },
        Service,
        Recv { max: 16 },
        Free {
            n: 3,
            received: true,
        },
        Service,
    ];
    write(t, "honest_ping_pong", &shm::encode(0, &send_round));

    // The tiny pool: everything runs out (ALLOC stock, RX ring, pool).
    let mut ops = Vec::new();
    for _ in 0..4 {
        ops.extend([
            Alloc { off: 1, len: 100 },
            Alloc { off: 2, len: 200 },
            Send { n: 2 },
        ]);
        ops.extend([
            Service,
            Deliver {
                n: 3,
                len: 64,
                decline: false,
            },
        ]);
    }
    ops.extend([
        Recv { max: 16 },
        Status,
        Free {
            n: 16,
            received: true,
        },
        Flush,
        Service,
    ]);
    write(t, "honest_exhaustion_tiny", &shm::encode(0x40 | 0x08, &ops));

    // Trim when idle, then revoke.
    let ops = [
        Service,
        Alloc { off: 0, len: 10 },
        Send { n: 1 },
        Service,
        Housekeeping { ms: 1 },
        Recv { max: 4 },
        Free {
            n: 4,
            received: true,
        },
        Service,
        Housekeeping { ms: 1 },
        Status,
        AuditNow,
        Defunct { reason: 0 },
        Service,
        Alloc { off: 0, len: 10 },
    ];
    write(t, "honest_trim_then_defunct", &shm::encode(0x04, &ops));

    // Flowswitch path: drain TX, refusing some as forged, with few strikes allowed.
    let ops = [
        Alloc { off: 0, len: 20 },
        Alloc { off: 0, len: 30 },
        Alloc { off: 0, len: 40 },
        Send { n: 3 },
        DrainTx {
            budget: 8,
            refuse: 0b101,
            forged: true,
        },
        Arm { on: true },
        Bells,
        Arm { on: false },
        Service,
    ];
    write(t, "drain_tx_forged", &shm::encode(0x01, &ops));

    let d = |buf, offset, len, flags| HDesc {
        buf,
        offset,
        len,
        flags,
    };
    let ops = [
        Alloc { off: 0, len: 10 },
        HostileTx(vec![
            d(BufSel::Held(0), None, 10, None),
            d(BufSel::Held(0), None, 10, None),
            d(BufSel::Small(64), None, 1, None),
            d(BufSel::Small(1), Some(2040), 9, None),
            d(BufSel::Small(2), Some(u32::MAX), 2, None),
            d(BufSel::Small(3), None, 0, Some(1)),
            d(BufSel::Raw(u32::MAX), None, 1, None),
        ]),
        Service,
        Recv { max: 16 },
        Service,
    ];
    write(t, "hostile_tx_descs", &shm::encode(0, &ops));

    let ops = [
        Service,
        Alloc { off: 0, len: 10 },
        Free {
            n: 1,
            received: false,
        },
        HostileFree(vec![
            d(BufSel::Small(0), None, 0, None),
            d(BufSel::Small(0), None, 0, None),
            d(BufSel::Small(63), None, 0, None),
            d(BufSel::Raw(1 << 31), None, 0, None),
        ]),
        Service,
        Service,
    ];
    write(t, "hostile_free_double", &shm::encode(0x02, &ops));

    let ops = [
        Alloc { off: 0, len: 10 },
        Send { n: 1 },
        HostileIndex {
            producer: true,
            v: IndexVal::Near(9),
        },
        Service,
        HostileIndex {
            producer: false,
            v: IndexVal::Raw(u32::MAX),
        },
        Service,
        Status,
        AuditNow,
    ];
    write(t, "hostile_ring_index", &shm::encode(0, &ops));
}

fn main() {
    frames();
    control();
    hostile();
    println!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
