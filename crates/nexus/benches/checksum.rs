//! The copy into a channel with its checksum summed on the way (`flowswitch::checksum`),
//! against a plain copy and against a copy followed by a separate sum, for a full-sized TCP
//! segment and a 64-byte packet.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use netchannel_nexus::flowswitch::checksum::Sum;
use std::hint::black_box;

fn copies(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy");
    for len in [64usize, 1448] {
        let src: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("memcpy", len), &len, |b, _| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        g.bench_with_input(BenchmarkId::new("copy_then_sum", len), &len, |b, _| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(Sum::of(&dst))
            })
        });
        g.bench_with_input(BenchmarkId::new("sum_while_copying", len), &len, |b, _| {
            b.iter(|| black_box(Sum::copy(&mut dst, black_box(&src))))
        });
    }
    g.finish();
}

criterion_group!(benches, copies);
criterion_main!(benches);
