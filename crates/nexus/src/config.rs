//! The nexus's configuration (TOML). Every setting has a default, so the nexus runs with no file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        message: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The control socket.
    pub control: ControlConfig,
    /// Who may do what.
    pub policy: Policy,
    /// Per-user limits.
    pub limits: Limits,
    /// Channel sizes and protocol enforcement.
    pub channel: ChannelConfig,
    /// How the datapath polls and sleeps.
    pub datapath: DatapathConfig,
    /// The interface the flowswitch serves; none: channels reflect (a loopback nexus).
    pub interface: Option<InterfaceConfig>,
    /// Impair the interface on purpose (tests): drop, duplicate, reorder and delay frames in
    /// both directions.
    pub faults: Option<crate::netif::faults::FaultConfig>,
}

/// Which backend serves the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// AF_XDP on a kernel interface, shared with the kernel's stack by the XDP program.
    #[default]
    Afxdp,
    /// A TAP device the nexus creates and stands behind as a host of its own.
    Tap,
}

/// The interface section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name (AF_XDP: an existing interface; TAP: the device to create).
    pub name: String,
    /// Backend.
    #[serde(default)]
    pub backend: Backend,
    /// AF_XDP: force `"native"` or `"generic"` XDP (default: native when the driver can).
    #[serde(default)]
    pub xdp_mode: Option<crate::netif::xdp::XdpMode>,
    /// TAP: the nexus's own addresses behind the device (AF_XDP uses the interface's).
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
}

impl InterfaceConfig {
    /// `name` served by `backend`, everything else as a config file leaves it by default.
    pub fn new(name: impl Into<String>, backend: Backend) -> Self {
        Self {
            name: name.into(),
            backend,
            xdp_mode: None,
            addresses: Vec::new(),
        }
    }
}

/// Where the control socket lives and who may connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Path of the SOCK_SEQPACKET socket.
    pub socket: PathBuf,
    /// File mode of the socket, as an octal string (`"0660"`).
    pub mode: String,
    /// Group that owns the socket (name or number); none keeps root's.
    pub group: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: netchannel_shm::control::DEFAULT_SOCKET.into(),
            mode: "0666".into(),
            group: None,
        }
    }
}

/// A rule granting port claims to users or groups (checked when flows are registered).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    /// Users (uids) the rule applies to; empty means any.
    #[serde(default)]
    pub users: Vec<u32>,
    /// Groups (gids) the rule applies to; empty means any.
    #[serde(default)]
    pub groups: Vec<u32>,
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
    /// Local addresses the rule allows; empty means any.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
}

/// Who may open channels and claim ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Users allowed to open channels at all (empty: everyone). Root always may.
    pub users: Vec<u32>,
    /// Groups allowed to open channels at all (a user in either list may).
    pub groups: Vec<u32>,
    /// Users allowed to open low-latency channels (root always may).
    pub low_latency_users: Vec<u32>,
    /// Users allowed to open monitor channels (root always may).
    pub monitor_users: Vec<u32>,
    /// Ports below this need root unless a rule grants them.
    pub privileged_ports_below: u16,
    /// Extra grants of ports to users or groups.
    pub ports: Vec<PortRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            users: Vec::new(),
            groups: Vec::new(),
            low_latency_users: Vec::new(),
            monitor_users: Vec::new(),
            privileged_ports_below: 1024,
            ports: Vec::new(),
        }
    }
}

/// Per-user limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Channels one user may have open.
    pub channels_per_user: usize,
    /// Flows one user may have registered.
    pub flows_per_user: usize,
    /// Control connections one user may have open.
    pub connections_per_user: usize,
    /// Control requests one connection of an unprivileged user may make per second (a
    /// quarter second's worth may come at once); beyond, the nexus stops reading it for a
    /// while. A reply costs one more request per 256 bytes (a listing of 64 channels about 160),
    /// a channel one more per 256 buffers of its pool.
    pub requests_per_sec: u32,
    /// Control requests all connections of one unprivileged user may make per second.
    pub user_requests_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            channels_per_user: 64,
            flows_per_user: 4096,
            connections_per_user: 64,
            requests_per_sec: 1000,
            user_requests_per_sec: 2000,
        }
    }
}

/// Channel sizes and protocol enforcement.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    /// Default slots of each ring (a power of two).
    pub ring_slots: u32,
    /// Largest ring an app may ask for.
    pub max_ring_slots: u32,
    /// Default pool size in buffers.
    pub buffers: u32,
    /// Largest pool an app may ask for.
    pub max_buffers: u32,
    /// Buffers per pool segment (a segment is the unit of growth and of release).
    pub buffers_per_segment: u32,
    /// Largest pool buffer an app may ask for (bytes, a power of two up to 65536). A pool of
    /// larger buffers holds proportionally fewer: `max_buffers` counts 2 KiB buffers.
    pub max_buf_size: u32,
    /// Empty buffers the nexus keeps on a channel's ALLOC ring at first and when idle; the
    /// stock doubles whenever a busy app empties the ring, up to `alloc_ring_max`. Both count
    /// 2 KiB buffers: a pool of larger buffers keeps the same bytes in fewer (at least one).
    pub alloc_ring_min: u32,
    /// Most empty buffers on a channel's ALLOC ring (in 2 KiB buffers, as `alloc_ring_min`;
    /// never more than a quarter of the channel's pool, which must keep buffers to deliver
    /// into).
    pub alloc_ring_max: u32,
    /// A channel idle this long (milliseconds) has its ALLOC stock cut back to the minimum and
    /// its idle pool segments given back to the OS.
    pub idle_trim_ms: u64,
    /// Strikes a channel may earn before it is quarantined (made defunct): every protocol
    /// violation, and packets sent from an address the host does not have or from another
    /// app's flow within one housekeeping period (100 ms).
    pub max_strikes: u64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            ring_slots: 1024,
            max_ring_slots: 16384,
            buffers: 4096,
            max_buffers: 65536,
            buffers_per_segment: 64,
            max_buf_size: 65536,
            alloc_ring_min: 32,
            alloc_ring_max: 512,
            idle_trim_ms: 1000,
            max_strikes: 64,
        }
    }
}

/// How the datapath polls and sleeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Microseconds the nexus keeps polling idle channels before it sleeps (only while
    /// packets come back within it: a round trip through a sleeping peer on this kind of VM
    /// takes 50–150 µs, and each wake-up of the nexus would add as much again).
    pub spin_us: u64,
    /// At most this long (µs) after a busy period in which apps only answered what they
    /// received (a frame or fewer sent for four received, as TCP acknowledgements are): their
    /// next packets come after they have done that work, on the CPU the spin would take.
    pub answer_spin_us: u64,
    /// Most packets taken from one channel's TX ring per pass (fairness between channels).
    pub batch: usize,
    /// Microseconds the nexus sleeps on a timer, instead of being rung, while traffic arrives in
    /// batches of `coalesce_batch` packets or more (0 disables; see the `pacer` module).
    pub coalesce_us: u64,
    /// Packets per busy period from which the nexus coalesces.
    pub coalesce_batch: usize,
    /// Microseconds after which a channel with no traffic is **parked**: no longer looked at
    /// on every pass, but armed so that its app's next packet rings its doorbell (0 never
    /// parks). Idle channels then cost a polling nexus nothing; without parking, 64 idle
    /// channels took a third of the rate of a busy app on the same nexus.
    pub park_after_us: u64,
    /// Most memory (KiB) held in IP datagrams waiting for their fragments (the kernel's
    /// `ipfrag_high_thresh`): past it, the oldest incomplete ones are given up.
    pub reassembly_memory_kib: u64,
    /// Milliseconds a datagram may take to get all its fragments (the kernel's
    /// `ipfrag_time`); at most 30,000, how long the XDP program steers a datagram's later
    /// fragments after its first.
    pub reassembly_timeout_ms: u64,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            spin_us: 200,
            answer_spin_us: 50,
            batch: 64,
            coalesce_us: 100,
            coalesce_batch: 8,
            park_after_us: 5000,
            reassembly_memory_kib: 4096,
            reassembly_timeout_ms: 30_000,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that TOML types alone do not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.datapath;
        if d.reassembly_memory_kib < 128 || d.reassembly_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "datapath.reassembly_memory_kib must be at least 128 (a datagram of 64 KiB \
                 and its bookkeeping must fit) and datapath.reassembly_timeout_ms more than 0"
                    .into(),
            ));
        }
        let steered_for = crate::netif::xdp::program::FRAG_MAX_AGE.as_millis();
        if u128::from(d.reassembly_timeout_ms) > steered_for {
            return Err(ConfigError::Invalid(format!(
                "datapath.reassembly_timeout_ms = {} is longer than the {steered_for} ms for \
                 which the XDP program steers a datagram's later fragments after its first: \
                 set it to {steered_for} or less",
                d.reassembly_timeout_ms
            )));
        }
        let c = &self.channel;
        for (name, v) in [
            ("channel.ring_slots", c.ring_slots),
            ("channel.max_ring_slots", c.max_ring_slots),
        ] {
            if !v.is_power_of_two() || v > netchannel_shm::layout::MAX_RING_SLOTS {
                return Err(ConfigError::Invalid(format!(
                    "{name} = {v} must be a power of two up to 65536"
                )));
            }
        }
        if c.ring_slots > c.max_ring_slots || c.buffers > c.max_buffers {
            return Err(ConfigError::Invalid(
                "channel defaults must not exceed the channel maxima".into(),
            ));
        }
        if c.alloc_ring_min == 0 || c.alloc_ring_min > c.alloc_ring_max {
            return Err(ConfigError::Invalid(
                "channel.alloc_ring_min must be between 1 and channel.alloc_ring_max".into(),
            ));
        }
        if !(u64::from(c.buffers_per_segment) * 2048).is_multiple_of(4096) {
            return Err(ConfigError::Invalid("channel.buffers_per_segment must be even (a segment is whole 4 KiB pages of 2 KiB buffers)".into()));
        }
        if c.buffers_per_segment == 0 || c.buffers < c.buffers_per_segment {
            return Err(ConfigError::Invalid(
                "channel.buffers must hold at least one segment".into(),
            ));
        }
        if c.max_buffers > netchannel_shm::layout::MAX_BUFFERS {
            return Err(ConfigError::Invalid(format!(
                "channel.max_buffers is at most {}",
                netchannel_shm::layout::MAX_BUFFERS
            )));
        }
        if !c.max_buf_size.is_power_of_two() || !(2048..=65536).contains(&c.max_buf_size) {
            return Err(ConfigError::Invalid(
                "channel.max_buf_size must be a power of two from 2048 to 65536".into(),
            ));
        }
        self.control_mode()?;
        if self.datapath.batch == 0 || self.datapath.batch > 4096 {
            return Err(ConfigError::Invalid(
                "datapath.batch must be between 1 and 4096".into(),
            ));
        }
        for r in &self.policy.ports {
            if r.first > r.last {
                return Err(ConfigError::Invalid(format!(
                    "policy.ports: range {}-{} is empty",
                    r.first, r.last
                )));
            }
        }
        Ok(())
    }

    /// The socket's file mode.
    pub fn control_mode(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.control.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "control.mode = {:?} is not an octal file mode like \"0660\"",
                    self.control.mode
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        Config::default().validate().unwrap();
        let c: Config = toml::from_str("[channel]\nring_slots = 256\n[[policy.ports]]\nusers = [1000]\nfirst = 80\nlast = 80\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.channel.ring_slots, 256);
        assert_eq!(c.channel.buffers, ChannelConfig::default().buffers);
        assert_eq!(c.policy.ports[0].users, vec![1000]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, needle) in [
            ("[channel]\nring_slots = 1000\n", "power of two"),
            ("[control]\nmode = \"rw\"\n", "octal"),
            ("[nonsense]\n", "unknown field"),
            ("[[policy.ports]]\nfirst = 9\nlast = 1\n", "empty"),
            ("[datapath]\nreassembly_timeout_ms = 60000\n", "steers"),
            ("[datapath]\nreassembly_memory_kib = 64\n", "at least 128"),
        ] {
            let dir = std::env::temp_dir().join(format!(
                "nc-cfg-{}-{}",
                std::process::id(),
                needle.len()
            ));
            std::fs::write(&dir, text).unwrap();
            let err = Config::load(&dir).unwrap_err().to_string();
            let _ = std::fs::remove_file(&dir);
            assert!(err.contains(needle), "{err}");
        }
    }
}
