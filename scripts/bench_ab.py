#!/usr/bin/env python3
"""Paired A/B of two netchannel builds on `bench tcp`, `bench veth` or `bench nexus` (root for
tcp and veth).

A whole `bench tcp` run cannot show a 10% change on a small, noisy VM: one repetition swings
by +-0.2 and the machine's speed drifts within minutes. This runs single netchannel-only trials
of build A and build B alternately (A B, B A, A B, ...) and reports, per metric, both medians,
their ratio, and in how many pairs B beat A. On the 2-vCPU machine of DESIGN.md a build against
itself gave 1.035x and won 10 of 16 pairs; real changes of 10-25% won 14 to 16 of 16.

    sudo scripts/bench_ab.py --pairs 16 ./netchannel-old ./netchannel-new \
        gbps_to_app gbps_from_app rtt_udp_p50
    sudo scripts/bench_ab.py --bench veth ./netchannel-old ./netchannel-new pps_64
    scripts/bench_ab.py --bench nexus ./netchannel-old ./netchannel-new pps_64 rtt_busy_p50

For rates bigger is better; for latencies and CPU costs (rtt_*, cpu_*) a B/A ratio under 1 is
better, and "B>A" counts the pairs where B was bigger. `bench nexus` has no one-path mode: each
of its trials runs both paths and only the netchannel figures are compared.
"""

import argparse
import json
import statistics
import subprocess
import sys


def trial(binary, bench, metrics, duration_ms):
    args = [binary, "bench", bench, "--reps", "1", "--duration-ms", str(duration_ms), "--json"]
    if bench == "nexus":
        args += ["--rtt-iterations", "20000"]
    else:
        args += ["--only-path", "netchannel"]
        for m in metrics:
            args += ["--metric", m]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{binary} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    d = json.loads(out.stdout)
    return {m: d["metrics"][m]["netchannel_median"] for m in metrics}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=12, help="A/B pairs (default 12)")
    p.add_argument("--duration-ms", type=int, default=1000, help="per throughput trial")
    p.add_argument("--bench", choices=["tcp", "veth", "nexus"], default="tcp",
                   help="which bench (default tcp)")
    p.add_argument("a", help="build A (the baseline), a netchannel binary")
    p.add_argument("b", help="build B (the change)")
    p.add_argument("metrics", nargs="*", default=["gbps_to_app", "gbps_from_app"],
                   help="bench tcp metrics (default: both bulk directions)")
    o = p.parse_args()
    runs = {o.a: [], o.b: []}
    for i in range(o.pairs):
        for b in (o.a, o.b) if i % 2 == 0 else (o.b, o.a):
            runs[b].append(trial(b, o.bench, o.metrics, o.duration_ms))
        print(f"pair {i + 1}/{o.pairs} done", file=sys.stderr)
    for m in o.metrics:
        a = [r[m] for r in runs[o.a]]
        b = [r[m] for r in runs[o.b]]
        wins = sum(1 for x, y in zip(a, b) if y > x)
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{m}: A {ma:.3f}  B {mb:.3f}  B/A {mb / ma:.3f}  B>A in {wins}/{o.pairs}")
        print("   A", " ".join(f"{x:.2f}" for x in a))
        print("   B", " ".join(f"{x:.2f}" for x in b))


if __name__ == "__main__":
    main()
