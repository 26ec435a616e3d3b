//! `netchannel`: the command-line front end of the netchannel user-space networking stack.

mod admin;
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
        /// Interface to serve (overrides interface.name); without one, channels reflect.
        #[arg(long)]
        interface: Option<String>,
        /// Backend of the interface (overrides interface.backend).
        #[arg(long, value_enum, requires = "interface")]
        backend: Option<BackendArg>,
        /// AF_XDP: force native or generic XDP (default: native when the driver can).
        #[arg(long, value_enum, requires = "interface")]
        xdp_mode: Option<XdpModeArg>,
        /// TAP: an address of the nexus behind the device (repeatable).
        #[arg(long = "address", requires = "interface")]
        addresses: Vec<std::net::IpAddr>,
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
        /// How many datagrams (0: fetch a page over HTTP from `target` instead).
        #[arg(long)]
        count: u32,
    },
    /// Benchmarks against the kernel path, measured side by side in the same run.
    Bench {
        #[command(subcommand)]
        what: netchannel_bench::BenchCommand,
    },
    /// The hidden helpers the benchmarks start from this binary: `bench-worker`, `bench-gen`,
    /// `bench-peer`, `bench-sink`.
    #[command(flatten)]
    BenchHelper(netchannel_bench::HelperCommand),
    /// Turns an interface's offloads off (checksum, segmentation, GRO), as the tests and
    /// benchmarks need on a veth; without an ethtool binary.
    #[command(hide = true)]
    OffloadsOff {
        /// The interface.
        ifname: String,
        /// The network namespace it is in (default: this one).
        #[arg(long)]
        netns: Option<String>,
    },
}

/// `--backend`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    /// AF_XDP on an existing interface, shared with the kernel.
    Afxdp,
    /// A TAP device created by the nexus.
    Tap,
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum XdpModeArg {
    /// In the driver.
    Native,
    /// In the kernel's generic path.
    Generic,
}

/// What `netchannel nexus` was asked to serve.
#[derive(Debug)]
struct InterfaceArgs {
    interface: Option<String>,
    backend: Option<BackendArg>,
    xdp_mode: Option<XdpModeArg>,
    addresses: Vec<std::net::IpAddr>,
}

fn run_nexus(
    config: Option<&std::path::Path>,
    socket: Option<std::path::PathBuf>,
    iface: InterfaceArgs,
) -> Result<(), String> {
    use netchannel_nexus::config::{Backend, InterfaceConfig};
    use netchannel_nexus::netif::xdp::XdpMode;
    let mut cfg = match config {
        Some(path) => netchannel_nexus::Config::load(path).map_err(|e| e.to_string())?,
        None => netchannel_nexus::Config::default(),
    };
    if let Some(s) = socket {
        cfg.control.socket = s;
    }
    if let Some(name) = iface.interface {
        let i = cfg
            .interface
            .get_or_insert(InterfaceConfig::new(name.clone(), Backend::Afxdp));
        i.name = name;
        if let Some(b) = iface.backend {
            i.backend = match b {
                BackendArg::Afxdp => Backend::Afxdp,
                BackendArg::Tap => Backend::Tap,
            };
        }
        if let Some(m) = iface.xdp_mode {
            i.xdp_mode = Some(match m {
                XdpModeArg::Native => XdpMode::Native,
                XdpModeArg::Generic => XdpMode::Generic,
            });
        }
        if !iface.addresses.is_empty() {
            i.addresses = iface.addresses;
        }
    }
    let mut nexus = netchannel_nexus::Nexus::from_config(cfg).map_err(|e| e.to_string())?;
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
        Command::Nexus {
            config,
            socket,
            interface,
            backend,
            xdp_mode,
            addresses,
        } => run_nexus(
            config.as_deref(),
            socket,
            InterfaceArgs {
                interface,
                backend,
                xdp_mode,
                addresses,
            },
        ),
        Command::Demo { count, backend } => demo::run(count, backend),
        Command::DemoPeer { target, count } => demo::peer(&target, count),
        Command::Status { socket, json } => admin::status(&socket, json),
        Command::Channels { socket, json } => admin::channels(&socket, json),
        Command::Flows { socket, json } => admin::flows(&socket, json),
        Command::Defunct { channel, socket } => admin::defunct(&socket, channel),
        Command::Bench { what } => netchannel_bench::run(what),
        Command::BenchHelper(helper) => netchannel_bench::run_helper(helper),
        Command::OffloadsOff { ifname, netns } => match netns {
            Some(ns) => netchannel_nexus::netns::offload::disable_offloads_in(&ns, &ifname),
            None => netchannel_nexus::netns::offload::disable_offloads(&ifname),
        }
        .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netchannel: {e}");
            ExitCode::FAILURE
        }
    }
}
