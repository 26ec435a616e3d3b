//! One port space with the host stack.
//!
//! For every flow, the nexus holds a bound kernel socket on the flow's (protocol, address,
//! port), so no host process can take it while an app owns it, and a port the host already
//! uses is refused with the name of its holder. Addresses, routes and neighbours (netlink)
//! will live here too.

pub mod neighbours;
pub mod netlink;
pub mod offload;
pub mod reserve;

pub use reserve::{Reservation, ReserveError, reserve};

use std::collections::BTreeMap;
use std::net::SocketAddr;

use netchannel_shm::control::ChannelId;

use crate::flow::{FlowId, Proto};

/// The host-port reservations of every flow. Flows of one channel on one (proto, address,
/// port), or on an address a reservation of that channel already covers (a wildcard), share
/// one reservation; it is released with the last of them.
#[derive(Debug, Default)]
pub struct HostPorts {
    held: BTreeMap<u64, Held>,
    by_flow: BTreeMap<FlowId, u64>,
    next: u64,
    steering: Option<Box<dyn Steering>>,
}

/// Steers the traffic of reserved ports to the nexus (on AF_XDP, the XDP program's claims
/// map). A reservation is claimed when made and released with it.
pub trait Steering: std::fmt::Debug + Send {
    /// From now on, `proto` traffic to `local` (an unspecified address: any address of the
    /// family) goes to the nexus.
    fn claim(&mut self, proto: Proto, local: SocketAddr) -> std::io::Result<()>;
    /// It goes to the kernel again.
    fn release(&mut self, proto: Proto, local: SocketAddr);
}

#[derive(Debug)]
struct Held {
    channel: ChannelId,
    res: Reservation,
    users: u32,
}

fn covers(held: SocketAddr, want: SocketAddr) -> bool {
    held.port() == want.port()
        && held.is_ipv4() == want.is_ipv4()
        && (held.ip() == want.ip() || held.ip().is_unspecified())
}

impl HostPorts {
    /// Keeps `steering` in step with the reservations from now on.
    pub fn set_steering(&mut self, steering: Box<dyn Steering>) {
        self.steering = Some(steering);
    }

    /// Finds or makes the reservation for a new flow of `channel`; returns its handle and the
    /// local address actually held.
    pub fn acquire(
        &mut self,
        channel: ChannelId,
        proto: Proto,
        local: SocketAddr,
    ) -> Result<(u64, SocketAddr), ReserveError> {
        if local.port() != 0 {
            let shared = self.held.iter_mut().find(|(_, h)| {
                h.channel == channel && h.res.proto() == proto && covers(h.res.local(), local)
            });
            if let Some((&id, h)) = shared {
                h.users += 1;
                return Ok((id, local));
            }
        }
        let res = reserve(proto, local)?;
        let actual = res.local();
        if let Some(s) = self.steering.as_mut() {
            s.claim(proto, actual)
                .map_err(|source| ReserveError::Steering {
                    local: actual,
                    source,
                })?;
        }
        let id = self.next;
        self.next += 1;
        self.held.insert(
            id,
            Held {
                channel,
                res,
                users: 1,
            },
        );
        Ok((id, actual))
    }

    /// Records that `flow` uses reservation `handle`.
    pub fn bind(&mut self, flow: FlowId, handle: u64) {
        self.by_flow.insert(flow, handle);
    }

    /// Gives up a handle acquired for a flow that was never added.
    pub fn unacquire(&mut self, handle: u64) {
        self.drop_user(handle);
    }

    /// The flow is gone: its reservation loses a user (and is released with the last).
    pub fn release(&mut self, flow: FlowId) {
        if let Some(handle) = self.by_flow.remove(&flow) {
            self.drop_user(handle);
        }
    }

    fn drop_user(&mut self, handle: u64) {
        if let Some(h) = self.held.get_mut(&handle) {
            h.users = h.users.saturating_sub(1);
            if h.users == 0
                && let Some(h) = self.held.remove(&handle)
                && let Some(s) = self.steering.as_mut()
            {
                s.release(h.res.proto(), h.res.local());
            }
        }
    }

    /// Reservations held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The link-layer multicast groups the host has joined on interface `ifindex`
/// (`/proc/net/dev_mcast`): what, besides its own MAC and broadcast, a frame to the host may be
/// addressed to.
pub fn multicast_groups(ifindex: u32) -> std::io::Result<Vec<[u8; 6]>> {
    let text = std::fs::read_to_string("/proc/net/dev_mcast")?;
    Ok(parse_dev_mcast(&text, ifindex))
}

fn parse_dev_mcast(text: &str, ifindex: u32) -> Vec<[u8; 6]> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || f[0].parse::<u32>().ok()? != ifindex || f[4].len() != 12 {
                return None;
            }
            let mut mac = [0u8; 6];
            for (i, b) in mac.iter_mut().enumerate() {
                *b = u8::from_str_radix(f[4].get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(mac)
        })
        .collect()
}

#[cfg(test)]
mod groups_tests {
    use super::*;

    #[test]
    fn joined_groups_are_read_per_interface_and_bad_lines_skipped() {
        let text = "2    ifb0            1     0     333300000001\n\
                    4    eth0            1     0     01005e000001\n\
                    4    eth0            1     0     3333ff00zz01\n\
                    4    eth0            1     0     3333ff000001\n\
                    4    eth0\n";
        assert_eq!(
            parse_dev_mcast(text, 4),
            [[0x01, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0xff, 0, 0, 1]]
        );
        assert!(multicast_groups(1).is_ok(), "the file is readable");
    }
}
