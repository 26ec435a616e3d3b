//! The command line of the benchmarks: `netchannel bench …` and the hidden helpers the
//! benchmarks start (`bench-worker`, `bench-gen`, `bench-peer`, `bench-sink`), as clap
//! subcommands the `netchannel` binary embeds.

use clap::Subcommand;

use crate::{Options, http, tcp, veth, worker};

/// How much effort a benchmark spends.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Interleaved repetitions (each runs every metric on both paths).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    reps: u64,
    /// Measured window of each throughput trial, in milliseconds (CPU trials last at least 1 s).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    duration_ms: u64,
    /// Round trips timed per busy-poll latency trial (blocking trials time a quarter as many).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    rtt_iterations: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    fn options(&self) -> Options {
        Options {
            reps: self.reps as usize,
            duration_ms: self.duration_ms,
            rtt_iterations: self.rtt_iterations as usize,
            json: self.json,
        }
    }
}

/// `netchannel bench …`: which benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// User pipe between two processes vs kernel UDP over loopback: packets/s, Gbit/s, round trips.
    Pipe(BenchArgs),
    /// App → nexus → app (the nexus validates, copies and reflects) vs kernel UDP over loopback:
    /// packets/s, round trips, and CPU per packet at a fixed offered load.
    Nexus(BenchArgs),
    /// TCP bulk both ways and UDP round trips with a kernel peer across a veth (root): an app on
    /// the user-space stack through the nexus on AF_XDP vs this host's kernel stack.
    Tcp {
        #[command(flatten)]
        args: BenchArgs,
        /// Run only this metric (repeatable): gbps_to_app, gbps_from_app, cpu_to_app,
        /// cpu_from_app, rtt_udp_p50.
        #[arg(long = "metric")]
        only: Vec<String>,
        /// Run one path only (kernel or netchannel), to profile it; no ratios then.
        #[arg(long, hide = true)]
        only_path: Option<String>,
        /// Print the nexus's status (counters) after each of its trials.
        #[arg(long, hide = true)]
        nexus_status: bool,
        /// Attach the nexus's XDP program (claiming nothing) during the kernel path's trials,
        /// so that both paths pay what XDP costs on a veth.
        #[arg(long)]
        kernel_xdp: bool,
    },
    /// The http_server example on the user-space stack vs its kernel-socket twin (root), both
    /// serving the same files across a veth to `curl --parallel` in a namespace: 1, 10 and 100
    /// concurrent downloads (aggregate Gbit/s) and 1000 requests of 1 KiB (requests/s).
    Http {
        /// Interleaved repetitions (each runs every scenario on both paths).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        reps: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// The http_server binary (default: the one next to this binary; build it with
        /// `cargo build --release -p netchannel-examples`).
        #[arg(long)]
        server: Option<std::path::PathBuf>,
        /// Size of the downloaded file, MiB.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1024))]
        size_mib: u64,
        /// Only the 1- and 10-download scenarios (for a quick smoke run).
        #[arg(long, hide = true)]
        quick: bool,
        /// The server's style: a thread per connection, a pool of 8 threads, or tasks on one
        /// thread (async; the kernel twin then runs a thread per connection).
        #[arg(long, value_enum, default_value = "threads")]
        style: http::Style,
        /// Run the kernel twin with the nexus's XDP program attached, claiming nothing (the
        /// comparison on equal terms on a veth, where XDP itself costs a copy per frame).
        #[arg(long)]
        kernel_xdp: bool,
    },
    /// UDP across a veth pair (root): an app on a channel of a nexus on AF_XDP vs a kernel UDP
    /// socket, fed by an AF_PACKET generator in a namespace; receive and transmit packets/s and
    /// the machine's CPU per packet.
    Veth {
        #[command(flatten)]
        args: BenchArgs,
        /// Offered packets/s of the CPU-per-packet trials.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1_000..=10_000_000))]
        cpu_rate: u64,
        /// Run only this metric (repeatable): pps_64, gbps_1400, cpu_per_packet, tx_pps_64,
        /// tx_cpu_per_packet.
        #[arg(long = "metric")]
        only: Vec<String>,
        /// Run one path only (kernel or netchannel), to profile it; no ratios then.
        #[arg(long, hide = true)]
        only_path: Option<String>,
    },
}

/// The hidden helper commands the benchmarks start from their own binary
/// (`std::env::current_exe()`): flatten them into the binary's top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum HelperCommand {
    /// The AF_PACKET generator of `bench veth` (run by it inside its namespace).
    #[command(hide = true)]
    BenchGen {
        #[arg(long)]
        ifname: String,
        #[arg(long)]
        dst_mac: String,
        #[arg(long)]
        src: std::net::SocketAddrV4,
        #[arg(long)]
        dst: std::net::SocketAddrV4,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        rate: Option<u64>,
    },
    /// The kernel peer of `bench tcp` (run by it inside its namespace).
    #[command(hide = true)]
    BenchPeer {
        /// tcp-send, tcp-recv or udp-echo.
        mode: String,
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        duration_ms: u64,
    },
    /// The UDP sink of `bench veth` (run by it inside its namespace).
    #[command(hide = true)]
    BenchSink {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        duration_ms: u64,
    },
    /// One side of a benchmark trial (started by `bench`; not for direct use).
    #[command(hide = true)]
    BenchWorker {
        /// The trial, as JSON.
        #[arg(long)]
        spec: String,
        /// Run the listening (receiving / echoing) side.
        #[arg(long)]
        server: bool,
        /// Address of the server side (for the client side).
        #[arg(long)]
        addr: Option<String>,
        /// CPU to pin to.
        #[arg(long)]
        cpu: Option<usize>,
    },
}

/// Runs `netchannel bench …`: prints the comparison (a table, or JSON with `--json`) on stdout
/// and each repetition's figures on stderr.
pub fn run(what: BenchCommand) -> Result<(), String> {
    match what {
        BenchCommand::Pipe(a) => crate::pipe(&a.options()),
        BenchCommand::Nexus(a) => crate::nexus(&a.options()),
        BenchCommand::Veth {
            args,
            cpu_rate,
            only,
            only_path,
        } => veth::veth(&veth::VethOptions {
            common: args.options(),
            cpu_rate,
            only,
            only_path,
        }),
        BenchCommand::Http {
            reps,
            json,
            server,
            size_mib,
            quick,
            style,
            kernel_xdp,
        } => http::http(&http::HttpOptions {
            common: Options {
                reps: reps as usize,
                duration_ms: 0,
                rtt_iterations: 0,
                json,
            },
            server,
            size_mib,
            quick,
            style,
            kernel_xdp,
        }),
        BenchCommand::Tcp {
            args,
            only,
            only_path,
            nexus_status,
            kernel_xdp,
        } => tcp::tcp(&tcp::TcpOptions {
            common: args.options(),
            only,
            only_path,
            show_status: nexus_status,
            kernel_xdp,
        }),
    }
}

/// Runs one of the hidden helpers (in the process a benchmark started).
pub fn run_helper(helper: HelperCommand) -> Result<(), String> {
    match helper {
        HelperCommand::BenchGen {
            ifname,
            dst_mac,
            src,
            dst,
            size,
            duration_ms,
            rate,
        } => veth::generator(&ifname, &dst_mac, src, dst, size, duration_ms, rate),
        HelperCommand::BenchPeer {
            mode,
            addr,
            duration_ms,
        } => tcp::peer(&mode, addr, duration_ms),
        HelperCommand::BenchSink { port, duration_ms } => veth::sink_main(port, duration_ms),
        HelperCommand::BenchWorker {
            spec,
            server,
            addr,
            cpu,
        } => worker::run(&spec, server, addr.as_deref(), cpu),
    }
}
