//! What the kernel accepts, the stack accepts: IP fragments both ways, IPv4 options, IPv6
//! extension headers and VLAN-0 priority tags, with kernel peers (python3 sockets, and raw
//! frames from an AF_PACKET socket) in a namespace and `udp_echo` on the stack.
//!
//! * `udp_datagrams_...`: datagrams of 1,473, 8,000 and 65,507 bytes (65,487 over IPv6, the
//!   most a 64 KiB channel buffer holds) from a kernel socket come back intact: the peer's
//!   kernel fragments, the nexus reassembles; the echo is fragmented by the nexus and
//!   reassembled by the peer's kernel.
//! * `frames_with_...`: options, extension chains and priority tags reach the app (its echo
//!   comes back); a frame to another host's MAC does not (counted).
//! * `bad_fragment_sets_...`: overlapping, duplicate, incomplete and oversized sets are
//!   refused and counted; a flood of incomplete datagrams stays within the reassembly budget
//!   while ordinary and fragmented traffic keeps flowing.
//!
//! Slots 509 to 511 of the `robust_examples` range (which uses 504 to 508). Needs root;
//! without it every test says it skipped.

use std::time::{Duration, Instant};

use netchannel_tests::testbed::{Kid, VethNet, serial, skip_without_root};

mod common;
use common::{InProcess, app, warm_neighbours};

const UDP_ECHO: &str = env!("CARGO_BIN_EXE_udp_echo");

fn skip() -> bool {
    skip_without_root("network namespace, veth pair, XDP and AF_XDP")
}

/// One `udp_echo` per family on the stack: (v4 port, v6 port) and the processes.
fn echoes(nexus: &InProcess) -> ((u16, u16), [Kid; 2]) {
    let (e4, a4) = app(
        "udp_echo (v4)",
        UDP_ECHO,
        &["--socket", &nexus.socket, "--listen", "0.0.0.0:0"],
        1,
    );
    let (e6, a6) = app(
        "udp_echo (v6)",
        UDP_ECHO,
        &["--socket", &nexus.socket, "--listen", "[::]:0"],
        1,
    );
    ((a4[0].port(), a6[0].port()), [e4, e6])
}

/// Sends each size in turn from a kernel UDP socket and waits for its echo; prints
/// `SIZE True|False`.
const SIZES: &str = r"
import os, socket
fam = socket.AF_INET6 if ':' in '@HOST@' else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
s.settimeout(0.5)
for n in [@SIZES@]:
    data = os.urandom(n)
    ok = False
    for attempt in range(6):
        s.sendto(data, ('@HOST@', @PORT@))
        try:
            while not ok:
                got, _ = s.recvfrom(70000)
                ok = got == data
        except socket.timeout:
            pass
        if ok:
            break
    print(n, ok, flush=True)
";

/// Runs [`SIZES`] from the peer against `host`:`port` with `sizes` (comma-separated).
fn echo_sizes(net: &VethNet, host: &str, port: u16, sizes: &str) -> Vec<String> {
    net.python(
        "the python UDP client",
        SIZES,
        &[
            ("HOST", host.to_owned()),
            ("PORT", port.to_string()),
            ("SIZES", sizes.to_owned()),
        ],
    )
    .succeed(Duration::from_secs(60))
}

#[test]
fn udp_datagrams_of_1473_8000_and_65507_bytes_cross_both_ways_intact() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = VethNet::new("frag", 509);
    let nexus = InProcess::start(&net, "frag-sizes");
    warm_neighbours(&net);
    let ((p4, p6), _echoes) = echoes(&nexus);
    let t0 = Instant::now();
    for (host, port, sizes) in [
        (net.host4().to_string(), p4, "1473, 8000, 65507"),
        (net.host6().to_string(), p6, "1473, 8000, 65487"),
    ] {
        let lines = echo_sizes(&net, &host, port, sizes);
        let want: Vec<String> = sizes.split(", ").map(|n| format!("{n} True")).collect();
        assert_eq!(lines, want, "echoes from {host}");
    }
    eprintln!("6 sizes echoed in {:.3?}", t0.elapsed());
    // Both ways went through the nexus's fragment paths.
    let (reassembled, fragmented) = (
        nexus.counter("rx_reassembled"),
        nexus.counter("tx_fragmented"),
    );
    assert!(reassembled >= 6, "datagrams reassembled: {reassembled}");
    assert!(fragmented >= 6, "datagrams fragmented: {fragmented}");
    assert_eq!(nexus.counter("reassembly_bytes"), 0, "nothing left held");
}

/// Python helpers that build frames by hand and send them from an AF_PACKET socket on the
/// peer's end, to the host end's MAC.
const FRAMES: &str = r"
import socket, struct, time
IF = '@IF@'
HMAC = bytes.fromhex('@HMAC@')
PMAC = bytes.fromhex('@PMAC@')
H4, P4 = socket.inet_aton('@H4@'), socket.inet_aton('@P4@')
H6 = socket.inet_pton(socket.AF_INET6, '@H6@')
P6 = socket.inet_pton(socket.AF_INET6, '@P6@')
PORT4, PORT6 = @PORT4@, @PORT6@
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((IF, 0))
u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u4.bind(('@P4@', 0))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u6.bind(('@P6@', 0))
SPORT4, SPORT6 = u4.getsockname()[1], u6.getsockname()[1]

def csum(b):
    if len(b) % 2:
        b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def udp(v6, payload):
    src, dst, sport, dport = (P6, H6, SPORT6, PORT6) if v6 else (P4, H4, SPORT4, PORT4)
    n = 8 + len(payload)
    pseudo = src + dst + (struct.pack('!IxxxB', n, 17) if v6 else struct.pack('!xBH', 17, n))
    c = csum(pseudo + struct.pack('!HHHH', sport, dport, n, 0) + payload) or 0xffff
    return struct.pack('!HHHH', sport, dport, n, c) + payload

def ip4(payload, opts=b'', ident=1, frag=0):
    hl = 20 + len(opts)
    h = struct.pack('!BBHHHBBH4s4s', 0x40 | (hl // 4), 0, hl + len(payload), ident, frag, 64, 17, 0, P4, H4) + opts
    return h[:10] + struct.pack('!H', csum(h)) + h[12:] + payload

def ip6(nh, payload):
    return struct.pack('!IHBB', 6 << 28, len(payload), nh, 64) + P6 + H6 + payload

def eth(ip, dst=None, vlan=False):
    et = b'\x86\xdd' if ip[0] >> 4 == 6 else b'\x08\x00'
    return (dst or HMAC) + PMAC + (b'\x81\x00\xa0\x00' if vlan else b'') + et + ip

def echoed(sock, want, wait=2.0):
    sock.settimeout(wait)
    try:
        while True:
            got = sock.recv(70000)
            if got == want:
                return True
    except socket.timeout:
        return False
";

/// Each case sends one frame and says whether its echo came back.
const OPTIONS: &str = r"
cases = [
    ('ipv4-options', u4, b'opts4', lambda p: eth(ip4(udp(False, p), opts=b'\x94\x04\x00\x00\x01\x01\x01\x00'))),
    ('vlan0-v4', u4, b'vlan4', lambda p: eth(ip4(udp(False, p)), vlan=True)),
    ('vlan0-v6', u6, b'vlan6', lambda p: eth(ip6(17, udp(True, p)), vlan=True)),
    ('ipv6-chain', u6, b'chain', lambda p: eth(ip6(0, bytes([60, 0, 1, 4, 0, 0, 0, 0]) + bytes([43, 0, 1, 4, 0, 0, 0, 0]) + bytes([17, 0, 253, 0, 0, 0, 0, 0]) + udp(True, p)))),
    ('other-host', u4, b'other', lambda p: eth(ip4(udp(False, p)), dst=bytes([2, 0, 0, 0, 0, 0x77]))),
]
for name, sock, payload, frame in cases:
    ok = False
    for attempt in range(3):
        raw.send(frame(payload))
        if echoed(sock, payload, 1.0):
            ok = True
            break
    print(name, ok, flush=True)
";

fn frame_vars(net: &VethNet, p4: u16, p6: u16) -> Vec<(&'static str, String)> {
    let hex = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<String>();
    vec![
        ("IF", net.peer().to_owned()),
        ("HMAC", hex(net.host_mac())),
        ("PMAC", hex(net.peer_mac())),
        ("H4", net.host4().to_string()),
        ("P4", net.peer4().to_string()),
        ("H6", net.host6().to_string()),
        ("P6", net.peer6().to_string()),
        ("PORT4", p4.to_string()),
        ("PORT6", p6.to_string()),
    ]
}

#[test]
fn frames_with_ip_options_extension_headers_and_vlan_0_tags_reach_the_app() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = VethNet::new("frag", 510);
    let nexus = InProcess::start(&net, "frag-options");
    warm_neighbours(&net);
    let ((p4, p6), _echoes) = echoes(&nexus);
    let other_before = nexus.counter("rx_other_host");
    let script = format!("{FRAMES}{OPTIONS}");
    let lines = net
        .python("the raw frame sender", &script, &frame_vars(&net, p4, p6))
        .succeed(Duration::from_secs(60));
    assert_eq!(
        lines,
        [
            "ipv4-options True",
            "vlan0-v4 True",
            "vlan0-v6 True",
            "ipv6-chain True",
            "other-host False",
        ]
    );
    assert!(nexus.counter("rx_options_stripped") >= 2);
    assert!(
        nexus.counter("rx_other_host") > other_before,
        "the frame to another host's MAC is counted"
    );
}

/// Bad fragment sets of a 32-byte UDP datagram (24 bytes of payload) to the v4 echo, then a
/// flood of first fragments of datagrams that never complete.
const BAD_SETS: &str = r"
whole = udp(False, b'A' * 24)
def frag(ident, start, end, more):
    return eth(ip4(whole[start:end], ident=ident, frag=(0x2000 if more else 0) | (start // 8)))
# Overlapping: 8..24 overlaps 0..16.
for f in [frag(100, 0, 16, True), frag(100, 8, 24, True), frag(100, 24, 32, False)]:
    raw.send(f)
print('overlap-echoed', echoed(u4, b'A' * 24, 1.0), flush=True)
# A duplicate: dropped alone, the datagram still arrives (as the kernel does).
whole = udp(False, b'B' * 24)
for f in [frag(101, 0, 16, True), frag(101, 0, 16, True), frag(101, 16, 32, False)]:
    raw.send(f)
print('duplicate-echoed', echoed(u4, b'B' * 24), flush=True)
# Incomplete: the first fragment only.
raw.send(frag(102, 0, 16, True))
# Oversized: a last fragment ending past 65,535 bytes.
raw.send(frag(103, 0, 16, True))
raw.send(eth(ip4(b'x' * 16, ident=103, frag=0x1fff)))
# The flood: first fragments of datagrams that never complete, 1 KiB each.
filler = udp(False, b'F' * 2000)[:1024]
for i in range(@FLOOD@):
    raw.send(eth(ip4(filler, ident=1000 + i, frag=0x2000)))
print('flooded', flush=True)
";

#[test]
fn bad_fragment_sets_are_refused_and_counted_and_a_flood_stays_within_budget() {
    if skip() {
        return;
    }
    let _serial = serial();
    let net = VethNet::new("frag", 511);
    const BUDGET_KIB: u64 = 256;
    let nexus = InProcess::start_with(&net, "frag-bad", |cfg| {
        cfg.datapath.reassembly_memory_kib = BUDGET_KIB;
        cfg.datapath.reassembly_timeout_ms = 1000;
    });
    warm_neighbours(&net);
    let ((p4, p6), _echoes) = echoes(&nexus);
    let mut vars = frame_vars(&net, p4, p6);
    vars.push(("FLOOD", "20000".to_owned()));
    let script = format!("{FRAMES}{BAD_SETS}");
    let mut sender = net.python("the raw fragment sender", &script, &vars);
    let overlap = sender.expect_line("overlap-echoed", Duration::from_secs(30));
    assert_eq!(overlap, "overlap-echoed False");
    let dup = sender.expect_line("duplicate-echoed", Duration::from_secs(30));
    assert_eq!(dup, "duplicate-echoed True");
    let _ = sender.finish(Duration::from_secs(60));
    for (name, at_least) in [
        ("rx_frag_overlap", 1),
        ("rx_frag_duplicate", 1),
        ("rx_frag_oversized", 1),
        ("rx_frag_memory", 1000),
    ] {
        let n = nexus.counter(name);
        assert!(n >= at_least, "{name}: {n}");
    }
    let held = nexus.counter("reassembly_bytes");
    assert!(
        held <= BUDGET_KIB * 1024,
        "{held} bytes held, over the budget of {BUDGET_KIB} KiB"
    );
    // Ordinary and fragmented traffic still flows, and what was held times out.
    let host = net.host4().to_string();
    let lines = echo_sizes(&net, &host, p4, "100, 8000");
    assert_eq!(lines, ["100 True", "8000 True"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(echo_sizes(&net, &host, p4, "100"), ["100 True"]);
    let timeouts = nexus.counter("rx_frag_timeout");
    assert!(
        timeouts >= 1,
        "the incomplete datagrams timed out: {timeouts}"
    );
    assert_eq!(nexus.counter("reassembly_bytes"), 0, "nothing left held");
}
