//! `netchannel`: the command-line front end of the netchannel user-space networking stack.

mod admin;
mod bench;
mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "netchannel",
    version,
    about = "User-space networking over shared-memory channels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the nexus daemon in the foreground (root). SIGTERM or SIGINT stops it, revoking
    /// every channel first.
    Nexus {
        /// TOML configuration; every setting has a default.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Control socket (overrides control.socket of the config).
        #[arg(long)]
        socket: Option<std::path::PathBuf>,
    },
    /// The running nexus: pid, uptime, clients, channels, control-socket error counters.
    Status {
        /// Control socket of the nexus.
        #[arg(long, default_value = netchannel_shm::control::DEFAULT_SOCKET)]
        socket: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every channel: owner, state, ring occupancy, pool usage, drop counters.
    Channels {
        /// Control socket of the nexus.
        #[arg(long, default_value = netchannel_shm::control::DEFAULT_SOCKET)]
        socket: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every flow: owner, protocol, local and remote address, class.
    Flows {
        /// Control socket of the nexus.
        #[arg(long, default_value = netchannel_shm::control::DEFAULT_SOCKET)]
        socket: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a channel: its app's next call fails with Defunct, its memory is reclaimed.
    Defunct {
        /// The channel id (see `netchannel channels`).
        channel: u64,
        /// Control socket of the nexus.
        #[arg(long, default_value = netchannel_shm::control::DEFAULT_SOCKET)]
        socket: String,
    },
    /// The main job: a nexus on a test interface (TAP, in a network namespace of its own on
    /// 198.18.0.0/15) serving a UDP echo app to a kernel peer; prints what happened and removes
    /// everything it made. Needs root, no configuration.
    Demo {
        /// Datagrams the kernel peer sends.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
        /// The interface: a veth pair shared with the kernel over AF_XDP, or a TAP device.
        #[arg(long, value_enum, default_value = "afxdp")]
        backend: demo::DemoBackend,
    },
    /// The kernel peer of the demo (started by `demo` inside its namespace).
    #[command(hide = true)]
    DemoPeer {
        /// Where to send.
        #[arg(long)]
        target: String,
        /// How many datagrams.
        #[arg(long)]
        count: u32,
    },
    /// Benchmarks against the kernel path, measured side by side in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
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

/// How much effort a benchmark spends.
#[derive(Debug, clap::Args)]
struct BenchArgs {
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
    fn options(&self) -> bench::Options {
        bench::Options {
            reps: self.reps as usize,
            duration_ms: self.duration_ms,
            rtt_iterations: self.rtt_iterations as usize,
            json: self.json,
        }
    }
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// User pipe between two processes vs kernel UDP over loopback: packets/s, Gbit/s, round trips.
    Pipe(BenchArgs),
    /// App → nexus → app (the nexus validates, copies and reflects) vs kernel UDP over loopback:
    /// packets/s, round trips, and CPU per packet at a fixed offered load.
    Nexus(BenchArgs),
}

fn run_nexus(
    config: Option<&std::path::Path>,
    socket: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let mut cfg = match config {
        Some(path) => netchannel_nexus::Config::load(path).map_err(|e| e.to_string())?,
        None => netchannel_nexus::Config::default(),
    };
    if let Some(s) = socket {
        cfg.control.socket = s;
    }
    let mut nexus = netchannel_nexus::Nexus::new(cfg).map_err(|e| e.to_string())?;
    nexus.run().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon says what it does; the other commands speak only of trouble.
    let default_level = if matches!(cli.command, Command::Nexus { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Nexus { config, socket } => run_nexus(config.as_deref(), socket),
        Command::Demo { count, backend } => demo::run(count, backend),
        Command::DemoPeer { target, count } => demo::peer(&target, count),
        Command::Status { socket, json } => admin::status(&socket, json),
        Command::Channels { socket, json } => admin::channels(&socket, json),
        Command::Flows { socket, json } => admin::flows(&socket, json),
        Command::Defunct { channel, socket } => admin::defunct(&socket, channel),
        Command::Bench {
            what: BenchCommand::Pipe(a),
        } => bench::pipe(&a.options()),
        Command::Bench {
            what: BenchCommand::Nexus(a),
        } => bench::nexus(&a.options()),
        Command::BenchWorker {
            spec,
            server,
            addr,
            cpu,
        } => bench::worker::run(&spec, server, addr.as_deref(), cpu),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netchannel: {e}");
            ExitCode::FAILURE
        }
    }
}
