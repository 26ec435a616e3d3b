//! `netchannel bench`: netchannel against the kernel path, side by side in one run.
//!
//! Every trial runs two fresh processes (the running binary's hidden `bench-worker` command,
//! started through `std::env::current_exe()`), pinned one per core. Each repetition runs every
//! metric on both paths, alternating which path goes first, and the report gives
//! per-repetition ratios and their median: only ratios measured side by side mean anything on a
//! noisy two-core machine.
//!
//! The `netchannel` binary is the entry point: it embeds [`BenchCommand`] as its `bench`
//! subcommand and flattens [`HelperCommand`] (the workers, the AF_PACKET generator, the kernel
//! peers) into its own subcommands, since the benchmarks start those from the same binary; it
//! runs them with [`run`] and [`run_helper`]. The veth benchmarks build their bed with
//! `netchannel-testbed`.

mod afpacket;
mod command;
mod http;
mod nexus_path;
mod pipe_path;
mod sys;
mod tcp;
mod udp_path;
mod veth;
mod worker;

pub use command::{BenchArgs, BenchCommand, HelperCommand, run, run_helper};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use worker::{Kind, Path, Report, Spec, WaitMode};

/// Options of `bench pipe`.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) reps: usize,
    pub(crate) duration_ms: u64,
    pub(crate) rtt_iterations: usize,
    pub(crate) json: bool,
}

/// A measured quantity and which way is better.
#[derive(Debug, Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// One row of the comparison.
struct Metric {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    kind: Kind,
    /// Turns the two workers' reports into the metric's value.
    value: fn(&Kind, &Report, &Report) -> f64,
    /// The netchannel side of the metric, if it differs from the kernel side's wait mode.
    pipe_kind: Option<Kind>,
}

/// The report of the side that received the trial's packets.
fn receiver<'a>(server: &'a Report, client: &'a Report) -> &'a Report {
    if server.received > 0 { server } else { client }
}

fn mpps(_: &Kind, server: &Report, client: &Report) -> f64 {
    let r = receiver(server, client);
    r.received as f64 / r.secs.max(1e-9) / 1e6
}

/// CPU time (user + system, both processes) per packet received, in µs.
fn cpu_us_per_packet(_: &Kind, server: &Report, client: &Report) -> f64 {
    let r = receiver(server, client);
    (server.cpu_s + client.cpu_s) / (r.received.max(1) as f64) * 1e6
}

fn gbps(k: &Kind, server: &Report, c: &Report) -> f64 {
    let Kind::Throughput { size, .. } = k else {
        return 0.0;
    };
    mpps(k, server, c) * 1e6 * *size as f64 * 8.0 / 1e9
}

fn rtt_p50_us(_: &Kind, _: &Report, client: &Report) -> f64 {
    client.rtt_p50_ns.unwrap_or(0) as f64 / 1e3
}

fn rtt_p99_us(_: &Kind, _: &Report, client: &Report) -> f64 {
    client.rtt_p99_ns.unwrap_or(0) as f64 / 1e3
}

/// The per-metric record in the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    label: &'static str,
    unit: &'static str,
    kernel: Vec<f64>,
    netchannel: Vec<f64>,
    /// Per repetition, oriented so that bigger is better for netchannel.
    ratios: Vec<f64>,
    kernel_median: f64,
    netchannel_median: f64,
    ratio_median: f64,
}

impl Row {
    /// The row of one metric from its per-repetition values on each path.
    fn new(
        label: &'static str,
        unit: &'static str,
        better: Better,
        k: Vec<f64>,
        n: Vec<f64>,
    ) -> Self {
        let ratios: Vec<f64> = k
            .iter()
            .zip(&n)
            .map(|(&k, &n)| oriented(better, k, n))
            .collect();
        Self {
            label,
            unit,
            kernel_median: median(&k),
            netchannel_median: median(&n),
            ratio_median: median(&ratios),
            kernel: k,
            netchannel: n,
            ratios,
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn pipe_metrics(o: &Options) -> Vec<Metric> {
    let tp = |size, batch| Kind::Throughput {
        size,
        batch,
        duration_ms: o.duration_ms,
    };
    let rtt = |wait| Kind::Rtt {
        size: 64,
        iterations: o.rtt_iterations,
        wait,
    };
    let blocking_iters = (o.rtt_iterations / 4).max(100);
    let rtt_blocking = Kind::Rtt {
        size: 64,
        iterations: blocking_iters,
        wait: WaitMode::Blocking,
    };
    vec![
        Metric {
            key: "pps_64",
            label: "64 B packets/s, batch 32",
            unit: "Mpps",
            better: Better::Higher,
            kind: tp(64, 32),
            value: mpps,
            pipe_kind: None,
        },
        Metric {
            key: "pps_64_b1",
            label: "64 B packets/s, batch 1",
            unit: "Mpps",
            better: Better::Higher,
            kind: tp(64, 1),
            value: mpps,
            pipe_kind: None,
        },
        Metric {
            key: "gbps_1400",
            label: "1400 B Gbit/s, batch 32",
            unit: "Gbit/s",
            better: Better::Higher,
            kind: tp(1400, 32),
            value: gbps,
            pipe_kind: None,
        },
        Metric {
            key: "gbps_1400_b1",
            label: "1400 B Gbit/s, batch 1",
            unit: "Gbit/s",
            better: Better::Higher,
            kind: tp(1400, 1),
            value: gbps,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_busy_p50",
            label: "round trip p50, busy poll",
            unit: "µs",
            better: Better::Lower,
            kind: rtt(WaitMode::Busy),
            value: rtt_p50_us,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_busy_p99",
            label: "round trip p99, busy poll",
            unit: "µs",
            better: Better::Lower,
            kind: rtt(WaitMode::Busy),
            value: rtt_p99_us,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_blocking_p50",
            label: "round trip p50, blocking (sleep at once)",
            unit: "µs",
            better: Better::Lower,
            kind: rtt_blocking,
            value: rtt_p50_us,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_blocking_p99",
            label: "round trip p99, blocking (sleep at once)",
            unit: "µs",
            better: Better::Lower,
            kind: rtt_blocking,
            value: rtt_p99_us,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_adaptive_p50",
            label: "round trip p50, spin 20 µs then sleep (vs blocking kernel)",
            unit: "µs",
            better: Better::Lower,
            kind: rtt_blocking,
            value: rtt_p50_us,
            pipe_kind: Some(Kind::Rtt {
                size: 64,
                iterations: blocking_iters,
                wait: WaitMode::Adaptive,
            }),
        },
    ]
}

fn nexus_metrics(o: &Options) -> Vec<Metric> {
    let blocking_iters = (o.rtt_iterations / 4).max(100);
    vec![
        Metric {
            key: "pps_64",
            label: "64 B packets/s, batch 32 (kernel: one way; netchannel: app→nexus→app)",
            unit: "Mpps",
            better: Better::Higher,
            kind: Kind::Throughput {
                size: 64,
                batch: 32,
                duration_ms: o.duration_ms,
            },
            value: mpps,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_busy_p50",
            label: "round trip p50, busy poll",
            unit: "µs",
            better: Better::Lower,
            kind: Kind::Rtt {
                size: 64,
                iterations: o.rtt_iterations,
                wait: WaitMode::Busy,
            },
            value: rtt_p50_us,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_blocking_p50",
            label: "round trip p50, blocking (app and nexus sleep at once)",
            unit: "µs",
            better: Better::Lower,
            kind: Kind::Rtt {
                size: 64,
                iterations: blocking_iters,
                wait: WaitMode::Blocking,
            },
            value: rtt_p50_us,
            pipe_kind: None,
        },
        Metric {
            key: "rtt_adaptive_p50",
            label: "round trip p50, default waits (app and nexus spin, then sleep)",
            unit: "µs",
            better: Better::Lower,
            kind: Kind::Rtt {
                size: 64,
                iterations: blocking_iters,
                wait: WaitMode::Blocking,
            },
            value: rtt_p50_us,
            pipe_kind: Some(Kind::Rtt {
                size: 64,
                iterations: blocking_iters,
                wait: WaitMode::Adaptive,
            }),
        },
        Metric {
            key: "cpu_per_packet",
            label: "CPU per packet at 100 k packets/s offered (ticks of 8), 64 B",
            unit: "µs",
            better: Better::Lower,
            kind: Kind::Paced {
                size: 64,
                per_tick: 8,
                rate: 100_000,
                duration_ms: o.duration_ms.max(1000),
            },
            value: cpu_us_per_packet,
            pipe_kind: None,
        },
    ]
}

/// Runs both workers of one trial and returns (server report, client report).
fn trial(spec: Spec) -> Result<(Report, Report), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let spec_json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
    let spawn = |server: bool, addr: Option<&str>, cpu: usize| -> Result<Child, String> {
        let mut c = Command::new(&exe);
        c.args([
            "bench-worker",
            "--spec",
            &spec_json,
            "--cpu",
            &cpu.to_string(),
        ]);
        if server {
            c.arg("--server");
        }
        if let Some(a) = addr {
            c.args(["--addr", a]);
        }
        c.stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning a worker: {e}"))
    };
    let mut server = Guard(spawn(true, None, 0)?);
    let mut out = BufReader::new(server.0.stdout.take().ok_or("worker has no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .ok_or_else(|| format!("server worker failed to start: {line:?}"))?
        .to_owned();
    let mut client = Guard(spawn(false, Some(&addr), 1)?);
    let limit = Duration::from_secs(60);
    let client_report = finish(&mut client.0, None, limit)?;
    if spec.path == Path::Nexus {
        // A nexus serves until told to stop; it reports its CPU time as it exits.
        let pid =
            rustix::process::Pid::from_raw(server.0.id() as i32).ok_or("worker has no pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| format!("stopping the nexus worker: {e}"))?;
    }
    let server_report = finish(&mut server.0, Some(out), limit)?;
    Ok((server_report, client_report))
}

/// Kills a worker that is still running when the trial is abandoned.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn finish(
    child: &mut Child,
    out: Option<BufReader<std::process::ChildStdout>>,
    limit: Duration,
) -> Result<Report, String> {
    let mut text = String::new();
    match out {
        Some(mut o) => o.read_to_string(&mut text),
        None => child
            .stdout
            .take()
            .ok_or("worker has no stdout")?
            .read_to_string(&mut text),
    }
    .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > limit {
            return Err("a worker did not finish in time".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !status.success() {
        return Err(format!("a worker failed ({status})"));
    }
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("unreadable worker report {last:?}: {e}"))
}

/// `netchannel bench pipe`.
pub(crate) fn pipe(o: &Options) -> Result<(), String> {
    compare(o, Bench::Pipe, &pipe_metrics(o))
}

/// `netchannel bench nexus`.
pub(crate) fn nexus(o: &Options) -> Result<(), String> {
    compare(o, Bench::Nexus, &nexus_metrics(o))
}

/// Which comparison runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bench {
    Pipe,
    Nexus,
    Veth,
    Tcp,
    Http,
}

impl Bench {
    fn path(self) -> Path {
        match self {
            Self::Pipe => Path::Pipe,
            Self::Nexus | Self::Veth | Self::Tcp | Self::Http => Path::Nexus,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Pipe => "pipe",
            Self::Nexus => "nexus",
            Self::Veth => "veth",
            Self::Tcp => "tcp",
            Self::Http => "http",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Pipe => "netchannel user pipe vs kernel UDP over loopback",
            Self::Nexus => {
                "app → nexus (validate, copy, reflect) → app vs kernel UDP over loopback"
            }
            Self::Veth => "UDP across a veth: app on a channel of a nexus on AF_XDP vs kernel UDP",
            Self::Tcp => {
                "TCP and UDP with a kernel peer across a veth: app on the user-space stack vs the kernel's"
            }
            Self::Http => {
                "http_server on the user-space stack vs its kernel-socket twin, curl --parallel across a veth"
            }
        }
    }

    fn kernel_path(self) -> &'static str {
        match self {
            Self::Pipe | Self::Nexus => {
                "UDP over loopback (sendmmsg/recvmmsg batch 32; send/recv batch 1)"
            }
            Self::Veth => {
                "UDP socket across the same veth without XDP (recvmmsg batch 64, sendmmsg batch 32), offloads off on both ends"
            }
            Self::Tcp => {
                "kernel TCP/UDP sockets on this host across the same veth without XDP, offloads off on both ends"
            }
            Self::Http => {
                "http_server --kernel (the same server code on kernel sockets) across the same veth without XDP, offloads off on both ends"
            }
        }
    }
}

fn compare(o: &Options, bench: Bench, ms: &[Metric]) -> Result<(), String> {
    let nc = bench.path();
    let mut rows: BTreeMap<&'static str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    // Trials shared by several metrics (p50 and p99 of one run) are run once per path and rep.
    for rep in 0..o.reps {
        let mut cache: Vec<(Spec, (Report, Report))> = Vec::new();
        for m in ms {
            let order = if rep % 2 == 0 {
                [Path::KernelUdp, nc]
            } else {
                [nc, Path::KernelUdp]
            };
            let mut vals = [0.0f64; 2];
            for path in order {
                let kind = if path == nc {
                    m.pipe_kind.unwrap_or(m.kind)
                } else {
                    m.kind
                };
                let spec = Spec { path, kind };
                let reports = match cache.iter().find(|(s, _)| *s == spec) {
                    Some((_, r)) => r.clone(),
                    None => {
                        let r = trial(spec)?;
                        cache.push((spec, r.clone()));
                        r
                    }
                };
                let v = (m.value)(&kind, &reports.0, &reports.1);
                vals[usize::from(path == nc)] = v;
            }
            let e = rows.entry(m.key).or_default();
            e.0.push(vals[0]);
            e.1.push(vals[1]);
            eprintln!(
                "[rep {}/{}] {:<58} kernel {:>9.3} {u:<6} netchannel {:>9.3} {u:<6} ({:.1}×)",
                rep + 1,
                o.reps,
                m.label,
                vals[0],
                vals[1],
                oriented(m.better, vals[0], vals[1]),
                u = m.unit,
            );
        }
    }
    let mut table: Vec<(String, Row)> = Vec::new();
    for m in ms {
        let (k, n) = rows.remove(m.key).unwrap_or_default();
        table.push((m.key.to_owned(), Row::new(m.label, m.unit, m.better, k, n)));
    }
    report(o, bench, &table)
}

/// A metric of a bench whose trials run whole on one path at a time (`bench veth`, `bench
/// tcp`): the trial `T` it reads, and how it reads the trial's measurement `M`.
struct PathMetric<T, M> {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    trial: T,
    value: fn(&M, T) -> f64,
}

/// The metrics named in `only` (all when it is empty); refuses an unknown name, and a path
/// other than `kernel` or `netchannel`.
fn select<'a, T, M>(
    metrics: &'a [PathMetric<T, M>],
    only: &[String],
    only_path: Option<&str>,
) -> Result<Vec<&'a PathMetric<T, M>>, String> {
    if let Some(bad) = only.iter().find(|k| !metrics.iter().any(|m| m.key == *k)) {
        let keys: Vec<_> = metrics.iter().map(|m| m.key).collect();
        return Err(format!(
            "unknown metric {bad:?}: pick from {}",
            keys.join(", ")
        ));
    }
    if let Some(p) = only_path.filter(|p| !matches!(*p, "kernel" | "netchannel")) {
        return Err(format!("unknown path {p:?}: pick kernel or netchannel"));
    }
    Ok(metrics
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|k| k == m.key))
        .collect())
}

/// Runs `metrics` for `reps` interleaved repetitions: each metric on both paths, which one goes
/// first alternating; a trial runs once per repetition and path however many metrics read
/// it; `only_path` runs one path (to profile it). `run(trial, netchannel)` measures. Prints a
/// line per metric and repetition; returns the table.
fn interleave<T: Copy + PartialEq, M: Copy>(
    reps: usize,
    metrics: &[&PathMetric<T, M>],
    only_path: Option<&str>,
    mut run: impl FnMut(T, bool) -> Result<M, String>,
) -> Result<Vec<(String, Row)>, String> {
    let mut rows: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); metrics.len()];
    for rep in 0..reps {
        let mut cache: Vec<(T, bool, M)> = Vec::new();
        for (i, m) in metrics.iter().enumerate() {
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            let mut vals = [0.0; 2];
            for nc in order {
                if only_path.is_some_and(|p| (p == "netchannel") != nc) {
                    continue;
                }
                let meas = match cache.iter().find(|(t, n, _)| *t == m.trial && *n == nc) {
                    Some(&(_, _, meas)) => meas,
                    None => {
                        let meas = run(m.trial, nc)?;
                        cache.push((m.trial, nc, meas));
                        meas
                    }
                };
                vals[usize::from(nc)] = (m.value)(&meas, m.trial);
            }
            rows[i].0.push(vals[0]);
            rows[i].1.push(vals[1]);
            eprintln!(
                "[rep {}/{}] {:<62} kernel {:>9.3} {u:<6} netchannel {:>9.3} {u:<6} ({:.2}×)",
                rep + 1,
                reps,
                m.label,
                vals[0],
                vals[1],
                oriented(m.better, vals[0], vals[1]),
                u = m.unit,
            );
        }
    }
    Ok(metrics
        .iter()
        .zip(rows)
        .map(|(m, (k, n))| (m.key.to_owned(), Row::new(m.label, m.unit, m.better, k, n)))
        .collect())
}

/// netchannel/kernel for rates, kernel/netchannel for latencies: bigger is better.
fn oriented(b: Better, kernel: f64, nc: f64) -> f64 {
    match b {
        Better::Higher => nc / kernel,
        Better::Lower => kernel / nc,
    }
}

fn report(o: &Options, bench: Bench, table: &[(String, Row)]) -> Result<(), String> {
    report_paths(o, bench, bench.kernel_path(), table)
}

/// [`report`] with the kernel path described as `kernel_path`.
fn report_paths(
    o: &Options,
    bench: Bench,
    kernel_path: &str,
    table: &[(String, Row)],
) -> Result<(), String> {
    report_extras(o, bench, kernel_path, table, &[])
}

/// [`report_paths`] with derived figures (`extras`, name and value) after the table, and as
/// top-level keys of the JSON.
fn report_extras(
    o: &Options,
    bench: Bench,
    kernel_path: &str,
    table: &[(String, Row)],
    extras: &[(String, serde_json::Value)],
) -> Result<(), String> {
    if o.json {
        let mut obj = serde_json::Map::new();
        obj.insert("benchmark".into(), bench.name().into());
        obj.insert("reps".into(), o.reps.into());
        obj.insert("kernel_path".into(), kernel_path.into());
        for (k, v) in extras {
            obj.insert(k.clone(), v.clone());
        }
        let mut metrics = serde_json::Map::new();
        for (k, r) in table {
            obj.insert(format!("ratio_{k}"), serde_json::json!(r.ratio_median));
            metrics.insert(
                k.clone(),
                serde_json::to_value(r).map_err(|e| e.to_string())?,
            );
        }
        obj.insert("metrics".into(), metrics.into());
        println!("{}", serde_json::Value::Object(obj));
        return Ok(());
    }
    println!(
        "{}: median of {} interleaved repetitions",
        bench.title(),
        o.reps
    );
    println!(
        "{:<60} {:>14} {:>14} {:>8}   per-repetition ratios",
        "metric", "kernel", "netchannel", "ratio"
    );
    for (_, r) in table {
        let reps: Vec<String> = r.ratios.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "{:<60} {:>7.3} {:<6} {:>7.3} {:<6} {:>7.1}×   {}",
            r.label,
            r.kernel_median,
            r.unit,
            r.netchannel_median,
            r.unit,
            r.ratio_median,
            reps.join(" ")
        );
    }
    for (k, v) in extras {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                println!("{k}: {:.2}", n.as_f64().unwrap_or(f64::NAN));
            }
            serde_json::Value::Null => println!("{k}: n/a"),
            serde_json::Value::Array(a) if a.is_empty() => println!("{k}: none"),
            serde_json::Value::Array(a) => {
                println!("{k}:");
                for x in a {
                    println!(
                        "  {}",
                        x.as_str().map_or_else(|| x.to_string(), str::to_owned)
                    );
                }
            }
            other => println!("{k}: {other}"),
        }
    }
    println!(
        "ratios: netchannel/kernel for rates, kernel/netchannel for latencies (bigger is better)"
    );
    println!("kernel path: {kernel_path}");
    Ok(())
}
