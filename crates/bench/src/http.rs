//! `netchannel bench http`: the `http_server` example on netchannel's user-space stack (through
//! the nexus on AF_XDP) against the same server code on kernel sockets (its `--kernel` twin),
//! both serving the same files across `bench veth`'s bed to `curl --parallel` in the namespace.
//!
//! Scenarios: 1, 10 and 100 concurrent downloads of one M MiB file (aggregate Gbit/s, over the
//! longest transfer's `time_total`), and 1000 requests of a 1 KiB file, at most
//! [`SMALL_PARALLEL`] at once (requests/s, over the wall clock of the whole curl run). Every
//! transfer must answer 200 with the whole file, else the trial fails. Each trial starts its own
//! server (and, on the netchannel path, its own nexus, so the kernel path runs on a plain veth
//! without XDP; with `--kernel-xdp`, with the nexus's XDP program attached and claiming
//! nothing, as `bench tcp --kernel-xdp`); per repetition both paths run every scenario,
//! alternating which goes first.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::veth::{Bed, NexusRun};
use super::{Better, Options, Row};

/// First port of the servers; each trial takes the next, so no trial meets another's
/// leftovers (TIME_WAIT, a late segment).
const BASE_PORT: u16 = 9300;
/// Most requests curl keeps in flight in the 1 KiB scenario.
const SMALL_PARALLEL: usize = 100;
/// Requests in the 1 KiB scenario.
const SMALL_REQUESTS: usize = 1000;
/// Size of the small file.
const SMALL_SIZE: u64 = 1024;
/// curl's limit on each transfer (`--max-time`), so that a stall cannot hang the bench.
const MAX_TIME_S: u64 = 120;
/// How long a server may take to say it listens.
const START_LIMIT: Duration = Duration::from_secs(10);

/// Options of `bench http`.
#[derive(Debug, Clone)]
pub(crate) struct HttpOptions {
    pub(crate) common: Options,
    /// The `http_server` binary; next to this one when not given.
    pub(crate) server: Option<PathBuf>,
    /// Size of the big file, MiB.
    pub(crate) size_mib: u64,
    /// Skip the 100-download and 1 KiB scenarios (the smoke run of scripts/test.sh).
    pub(crate) quick: bool,
    /// How the server serves its connections.
    pub(crate) style: Style,
    /// Run the kernel twin with the nexus's XDP program attached (claiming nothing).
    pub(crate) kernel_xdp: bool,
}

/// The kernel path of `bench http --kernel-xdp`.
const KERNEL_XDP_PATH: &str = "the same http_server on kernel sockets (--kernel) across the same \
     veth, with the nexus's XDP program attached to the host's end and claiming nothing (so the \
     kernel pays what XDP on a veth costs, as the nexus does)";

/// The `http_server` styles (`--pool`, `--async`): each must scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// A thread per connection.
    Threads,
    /// A pool of 8 threads, one request per connection.
    Pool,
    /// Tasks on one thread's tokio runtime (the kernel twin then runs a thread per
    /// connection: `--async` serves the user-space stack only).
    Async,
}

impl Style {
    /// `http_server`'s arguments for this style, on the user-space stack or the kernel.
    fn args(self, netchannel: bool) -> &'static [&'static str] {
        match self {
            Self::Threads => &[],
            Self::Pool => &["--pool", "8"],
            Self::Async if netchannel => &["--async"],
            Self::Async => &[],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Threads => "threads",
            Self::Pool => "pool",
            Self::Async => "async",
        }
    }
}

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trial {
    /// This many concurrent downloads of the big file.
    Download(usize),
    /// [`SMALL_REQUESTS`] requests of the small file, [`SMALL_PARALLEL`] at once.
    Small,
}

/// What one trial measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Bytes of all transfers.
    bytes: u64,
    /// Transfers.
    requests: usize,
    /// The longest transfer's `time_total`, seconds.
    longest_s: f64,
    /// The whole curl run, seconds.
    wall_s: f64,
}

impl Measured {
    /// What a failed trial counts as: no value (left out of the medians).
    const FAILED: Self = Self {
        bytes: 0,
        requests: 0,
        longest_s: f64::NAN,
        wall_s: f64::NAN,
    };
}

fn gbps(m: &Measured, _: Trial) -> f64 {
    m.bytes as f64 * 8.0 / m.longest_s / 1e9
}

fn rps(m: &Measured, _: Trial) -> f64 {
    m.requests as f64 / m.wall_s
}

/// The files served, in a directory removed however the run ends.
struct Files {
    dir: PathBuf,
    big_size: u64,
}

impl Files {
    fn new(size_mib: u64) -> Result<Self, String> {
        let dir =
            std::env::temp_dir().join(format!("netchannel-bench-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root"))
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let files = Self {
            dir,
            big_size: size_mib << 20,
        };
        write_file(&files.root().join("big"), files.big_size)?;
        write_file(&files.root().join("small"), SMALL_SIZE)?;
        Ok(files)
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `size` bytes of a pattern that does not compress to nothing.
fn write_file(path: &Path, size: u64) -> Result<(), String> {
    let err = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).map_err(err)?;
        left -= n as u64;
    }
    f.flush().map_err(err)
}

/// A child process killed (if still running) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The `http_server` to run: `--server`, else the one next to this binary.
fn server_binary(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(format!("--server {}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let p = exe
        .parent()
        .ok_or("my own binary has no directory")?
        .join("http_server");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "bench http needs the http_server example next to this binary ({}): build it with \
             `cargo build --release -p netchannel-examples`, or pass --server PATH",
            p.display()
        ))
    }
}

/// A running `http_server` (and the nexus under it on the netchannel path), stopped when
/// dropped: the server first, then the nexus.
struct Server {
    proc: Proc,
    log: PathBuf,
    _nexus: Option<NexusRun>,
}

impl Server {
    fn start(
        bed: &Bed,
        binary: &Path,
        files: &Files,
        port: u16,
        netchannel: bool,
        style: Style,
    ) -> Result<Self, String> {
        let nexus = if netchannel {
            Some(NexusRun::start(bed)?)
        } else {
            None
        };
        let log = files.dir.join(format!("server-{port}.log"));
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut c = std::process::Command::new(binary);
        c.arg("--root")
            .arg(files.root())
            .arg("--listen")
            .arg(SocketAddrV4::new(bed.host4(), port).to_string());
        if netchannel {
            c.args(["--socket", &bed.socket]);
        } else {
            c.arg("--kernel");
        }
        c.args(style.args(netchannel));
        let mut proc = Proc(
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log_file)
                .spawn()
                .map_err(|e| format!("starting {}: {e}", binary.display()))?,
        );
        let out = proc.0.stdout.take().ok_or("the server has no stdout")?;
        // Read the first line in a thread, so that a server that says nothing cannot hang us.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Drain the rest so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let line = rx.recv_timeout(START_LIMIT).unwrap_or_default();
        if !line.starts_with("listening on") {
            return Err(format!(
                "http_server ({} path) did not start: {:?}{}",
                path_name(netchannel),
                line.trim(),
                log_tail(&log)
            ));
        }
        Ok(Self {
            proc,
            log,
            _nexus: nexus,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The server goes before the nexus (field order alone would not say so clearly).
        if matches!(self.proc.0.try_wait(), Ok(None)) {
            let _ = self.proc.0.kill();
        }
        let _ = self.proc.0.wait();
    }
}

fn path_name(netchannel: bool) -> &'static str {
    if netchannel { "netchannel" } else { "kernel" }
}

/// The last lines of a server's stderr, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!("; server stderr ends: {}", tail.join(" | "))
    }
}

/// Runs curl in the namespace: `n` transfers of `name` (of `size` bytes) from `url_base`, at
/// most `parallel` at once; checks each answered 200 with the whole file.
#[allow(clippy::too_many_arguments)]
fn curl(
    bed: &Bed,
    files: &Files,
    url_base: &str,
    name: &str,
    size: u64,
    n: usize,
    parallel: usize,
    path: &str,
) -> Result<Measured, String> {
    let config = files.dir.join(format!("curl-{name}-{n}.conf"));
    let mut text = String::new();
    for _ in 0..n {
        let _ = writeln!(text, "url = \"{url_base}/{name}\"\noutput = \"/dev/null\"");
    }
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let out_path = files.dir.join("curl.out");
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let mut cmd = bed.command_in_ns("curl");
    cmd.args([
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        &parallel.to_string(),
        "--max-time",
        &MAX_TIME_S.to_string(),
        "-s",
        "-w",
        "%{http_code} %{size_download} %{time_total}\\n",
        "-K",
    ])
    .arg(&config)
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = Proc(cmd.spawn().map_err(|e| format!("starting curl: {e}"))?);
    let limit = Duration::from_secs(MAX_TIME_S + 30);
    let status = loop {
        if let Some(s) = child.0.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "the {path} path: curl did not finish in {limit:?} ({n} × {name})"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let mut report = String::new();
    std::fs::File::open(&out_path)
        .and_then(|mut f| f.read_to_string(&mut report))
        .map_err(|e| e.to_string())?;
    let (mut ok, mut longest_s, mut bytes) = (0usize, 0.0f64, 0u64);
    // Failed transfers by HTTP code (000: no answer) and whether any byte came.
    let mut bad: std::collections::BTreeMap<(String, bool), (usize, f64)> = Default::default();
    for line in report.lines() {
        let mut it = line.split_whitespace();
        let code = it.next().unwrap_or_default();
        let got: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        let t: f64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
        longest_s = longest_s.max(t);
        if code == "200" && got == size {
            ok += 1;
            bytes += got;
        } else {
            let e = bad.entry((code.to_owned(), got > 0)).or_default();
            e.0 += 1;
            e.1 = e.1.max(t);
        }
    }
    if ok != n {
        let kinds: Vec<String> = bad
            .iter()
            .map(|((code, some), (count, t))| {
                format!(
                    "{count} with HTTP {code} and {} bytes (within {t:.1} s)",
                    if *some { "some but not all" } else { "no" }
                )
            })
            .collect();
        let hint = match status.code() {
            Some(7) => " (curl exit 7: a connection was refused)",
            Some(28) => " (curl exit 28: a transfer timed out)",
            _ => "",
        };
        return Err(format!(
            "the {path} path: {} of {n} transfers of {name} ({size} B, {parallel} at once) \
             failed: {}; curl {status}{hint}",
            n - ok,
            if kinds.is_empty() {
                "no report from curl".to_owned()
            } else {
                kinds.join(", ")
            }
        ));
    }
    Ok(Measured {
        bytes,
        requests: n,
        longest_s,
        wall_s,
    })
}

fn trial(
    bed: &Bed,
    binary: &Path,
    files: &Files,
    port: u16,
    t: Trial,
    netchannel: bool,
    ho: &HttpOptions,
) -> Result<Measured, String> {
    let path = path_name(netchannel);
    // Detached at the end of the trial (the netchannel path attaches its own).
    let _xdp = if ho.kernel_xdp && !netchannel {
        Some(bed.steering_without_claims()?)
    } else {
        None
    };
    let server = Server::start(bed, binary, files, port, netchannel, ho.style)?;
    let base = format!("http://{}", SocketAddrV4::new(bed.host4(), port));
    let m = match t {
        Trial::Download(n) => curl(bed, files, &base, "big", files.big_size, n, n, path),
        Trial::Small => curl(
            bed,
            files,
            &base,
            "small",
            SMALL_SIZE,
            SMALL_REQUESTS,
            SMALL_PARALLEL,
            path,
        ),
    };
    m.map_err(|e| format!("{e}{}", log_tail(&server.log)))
}

type HttpMetric = super::PathMetric<Trial, Measured>;

/// `netchannel bench http`.
pub(crate) fn http(ho: &HttpOptions) -> Result<(), String> {
    let o = &ho.common;
    if !rustix::process::geteuid().is_root() {
        return Err("bench http makes a network namespace and attaches XDP: run it as root".into());
    }
    let binary = server_binary(ho.server.as_deref())?;
    let mib = ho.size_mib;
    // The labels name the size; leaked once per run, as the table's labels are `&'static`.
    let label = |n: usize| -> &'static str {
        let what = if n == 1 {
            format!("1 download of {mib} MiB, aggregate Gbit/s")
        } else {
            format!("{n} concurrent downloads of {mib} MiB, aggregate Gbit/s")
        };
        Box::leak(what.into_boxed_str())
    };
    let labels = [label(1), label(10), label(100)];
    let mut metrics = vec![
        HttpMetric {
            key: "gbps_c1",
            label: labels[0],
            unit: "Gbit/s",
            better: Better::Higher,
            trial: Trial::Download(1),
            value: gbps,
        },
        HttpMetric {
            key: "gbps_c10",
            label: labels[1],
            unit: "Gbit/s",
            better: Better::Higher,
            trial: Trial::Download(10),
            value: gbps,
        },
    ];
    if !ho.quick {
        metrics.push(HttpMetric {
            key: "gbps_c100",
            label: labels[2],
            unit: "Gbit/s",
            better: Better::Higher,
            trial: Trial::Download(100),
            value: gbps,
        });
        metrics.push(HttpMetric {
            key: "rps_1k",
            label: "1000 requests of 1 KiB, 100 at once, requests/s",
            unit: "req/s",
            better: Better::Higher,
            trial: Trial::Small,
            value: rps,
        });
    }
    let files = Files::new(mib)?;
    let bed = Bed::new()?;
    let selected: Vec<&HttpMetric> = metrics.iter().collect();
    let mut port = BASE_PORT;
    // A failed trial is reported and left out (its value is NaN); the others still run, and
    // the run fails at the end, after the report.
    let mut failures: Vec<String> = Vec::new();
    let table = super::interleave(o.reps, &selected, None, |t, nc| {
        port = port.checked_add(1).unwrap_or(BASE_PORT);
        let t0 = Instant::now();
        match trial(&bed, &binary, &files, port, t, nc, ho) {
            Ok(m) => Ok(m),
            Err(e) => {
                let e = format!("{t:?}: {e} ({:.1} s)", t0.elapsed().as_secs_f64());
                eprintln!("trial failed: {e}");
                failures.push(e);
                Ok(Measured::FAILED)
            }
        }
    })?;
    drop(bed);
    drop(files);
    // Scaling: our (and the twin's) median aggregate at N over the median at 1.
    let med = |key: &str, nc: bool| -> f64 {
        table
            .iter()
            .find(|(k, _)| k == key)
            .map_or(f64::NAN, |(_, r): &(String, Row)| {
                if nc {
                    r.netchannel_median
                } else {
                    r.kernel_median
                }
            })
    };
    let mut extras: Vec<(String, serde_json::Value)> = Vec::new();
    for n in ["c10", "c100"] {
        let key = format!("gbps_{n}");
        if table.iter().any(|(k, _)| *k == key) {
            extras.push((
                format!("scaling_{n}_over_c1"),
                serde_json::json!(med(&key, true) / med("gbps_c1", true)),
            ));
            extras.push((
                format!("kernel_scaling_{n}_over_c1"),
                serde_json::json!(med(&key, false) / med("gbps_c1", false)),
            ));
        }
    }
    extras.push(("style".into(), serde_json::json!(ho.style.name())));
    extras.push(("failed_trials".into(), serde_json::json!(failures)));
    let kernel_path = if ho.kernel_xdp {
        KERNEL_XDP_PATH
    } else {
        super::Bench::Http.kernel_path()
    };
    super::report_extras(o, super::Bench::Http, kernel_path, &table, &extras)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} trial(s) failed (left out of the figures above; listed under failed_trials)",
            failures.len()
        ))
    }
}
