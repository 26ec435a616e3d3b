//! `netchannel status`, `channels` and `defunct`: asking a running nexus.

use netchannel::nexus::Nexus;
use netchannel_shm::control::NexusStatus;

fn connect(socket: &str) -> Result<Nexus, String> {
    Nexus::connect(socket).map_err(|e| e.to_string())
}

fn fetch(socket: &str) -> Result<NexusStatus, String> {
    connect(socket)?.status().map_err(|e| e.to_string())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `netchannel status`.
pub(crate) fn status(socket: &str, json: bool) -> Result<(), String> {
    let s = fetch(socket)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "nexus pid {} up {:.0} s, {} clients, {} channels, {} fds, {:.1} MiB resident",
        s.pid,
        s.uptime_s,
        s.clients,
        s.channels.len(),
        s.fds,
        mib(s.rss_bytes)
    );
    if !s.control_errors.is_empty() {
        let list: Vec<String> = s
            .control_errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("control: {}", list.join(" "));
    }
    Ok(())
}

/// `netchannel channels`.
pub(crate) fn channels(socket: &str, json: bool) -> Result<(), String> {
    let s = fetch(socket)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s.channels).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:>8} {:>6} {:<28} {:>7} {:>7} {:>21} {:>12} {:>12}  drops",
        "id",
        "pid",
        "uid",
        "state",
        "tx ring",
        "rx ring",
        "bufs free/nexus/app",
        "tx pkts",
        "rx pkts"
    );
    for c in &s.channels {
        let drops: Vec<String> = c.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:>6} {:>8} {:>6} {:<28} {:>7} {:>7} {:>21} {:>12} {:>12}  {}{}",
            c.id,
            c.pid,
            c.uid,
            if c.parked {
                format!("{} (parked)", c.state)
            } else {
                c.state.clone()
            },
            c.tx_ring,
            c.rx_ring,
            format!("{}/{}/{}", c.buffers_free, c.buffers_nexus, c.buffers_app),
            c.tx_packets,
            c.rx_packets,
            if drops.is_empty() {
                "-".into()
            } else {
                drops.join(" ")
            },
            if c.audit == "ok" {
                String::new()
            } else {
                format!("  AUDIT: {}", c.audit)
            },
        );
    }
    Ok(())
}

/// `netchannel defunct CHANNEL`.
pub(crate) fn defunct(socket: &str, channel: u64) -> Result<(), String> {
    connect(socket)?
        .defunct(channel)
        .map_err(|e| e.to_string())?;
    println!("channel {channel} is defunct");
    Ok(())
}

/// `netchannel flows`.
pub(crate) fn flows(socket: &str, json: bool) -> Result<(), String> {
    let flows = connect(socket)?.flows().map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&flows).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:>8} {:>8} {:>6} {:<5} {:<40} {:<40} {:<12} {:>10} {:>10}",
        "flow", "channel", "pid", "uid", "proto", "local", "remote", "class", "rx pkts", "tx pkts"
    );
    for f in &flows {
        let remote = f
            .remote
            .map_or_else(|| "* (listener)".to_owned(), |r| r.to_string());
        println!(
            "{:>6} {:>8} {:>8} {:>6} {:<5} {:<40} {:<40} {:<12} {:>10} {:>10}",
            f.id,
            f.channel,
            f.pid,
            f.uid,
            format!("{:?}", f.proto).to_lowercase(),
            f.local.to_string(),
            remote,
            f.class,
            f.rx_packets,
            f.tx_packets
        );
    }
    Ok(())
}
