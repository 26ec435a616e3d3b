//! Flow-table lookups per second, in-process, with 10 k and 1 M flows.
//!
//! `cargo bench -p netchannel-nexus --bench flow_lookup`. Criterion reports elements/s: each
//! iteration looks up 4096 keys of existing flows in random order (every lookup hits), one at
//! a time (`single`) and in batches of 32 as the datapath classifies a receive batch (`batch`).

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netchannel_nexus::flowswitch::Proto;
use netchannel_nexus::flowswitch::table::{BatchScratch, FlowKey, FlowSpec, FlowTable};

/// A deterministic xorshift, so every run looks up the same keys.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn table(n: usize) -> (FlowTable, Vec<FlowKey>) {
    let mut t = FlowTable::new(n + 16);
    let mut keys = Vec::with_capacity(n);
    let local = SocketAddr::new(Ipv4Addr::new(198, 18, 0, 1).into(), 443);
    let mut i = 0u32;
    while keys.len() < n {
        // Remote peers spread over 198.18.0.0/15 and their ports.
        let host = 0xc612_0000u32 | ((i >> 14) % 0x1_ffff);
        let port = 1024 + (i % 0x3fff) as u16;
        i += 1;
        let key = FlowKey {
            proto: Proto::Tcp,
            local,
            remote: SocketAddr::new(Ipv4Addr::from(host).into(), port),
        };
        if t.insert(1 + u64::from(i % 64), FlowSpec::Exact(key))
            .is_ok()
        {
            keys.push(key);
        }
    }
    (t, keys)
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_lookup");
    for n in [10_000usize, 1_000_000] {
        let (t, keys) = table(n);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let probe: Vec<FlowKey> = (0..4096)
            .map(|_| keys[(rng(&mut seed) % n as u64) as usize])
            .collect();
        g.throughput(Throughput::Elements(probe.len() as u64));
        g.bench_function(format!("batch/{n}_flows"), |b| {
            let (mut scratch, mut out) = (BatchScratch::default(), Vec::with_capacity(32));
            b.iter(|| {
                let mut hits = 0u32;
                for chunk in probe.chunks(32) {
                    t.lookup_batch(black_box(chunk), &mut scratch, &mut out);
                    hits += out.iter().filter(|h| h.is_some()).count() as u32;
                }
                assert_eq!(hits as usize, probe.len());
                hits
            })
        });
        g.bench_function(format!("single/{n}_flows"), |b| {
            b.iter(|| {
                let mut hits = 0u32;
                for k in &probe {
                    hits += u32::from(t.lookup(black_box(k)).is_some());
                }
                assert_eq!(hits as usize, probe.len());
                hits
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
