//! Flow requests: claiming (proto, address, port) for a channel, in the flow table and in the
//! host's port space at once, within the policy and the per-user limit.

use std::net::SocketAddr;

use netchannel_shm::control::{ChannelId, ErrorCode, FlowProto, FlowStatus, Reply};

use super::Control;
use super::{ControlCount, policy, refuse};
use crate::flow::{FlowId, FlowKey, FlowSpec, Proto};
use crate::flowswitch::table::TableError;
use crate::netns::ReserveError;
use crate::registry::Registry;

fn proto(p: FlowProto) -> Proto {
    match p {
        FlowProto::Udp => Proto::Udp,
        FlowProto::Tcp => Proto::Tcp,
    }
}

fn wire(p: Proto) -> FlowProto {
    match p {
        Proto::Udp => FlowProto::Udp,
        Proto::Tcp => FlowProto::Tcp,
    }
}

fn spec(p: Proto, local: SocketAddr, remote: Option<SocketAddr>) -> FlowSpec {
    match remote {
        Some(remote) => FlowSpec::Exact(FlowKey {
            proto: p,
            local,
            remote,
        }),
        None => FlowSpec::Listener(p, local),
    }
}

impl Control {
    pub(super) fn add_flow(
        &mut self,
        reg: &mut Registry,
        client: u64,
        channel: ChannelId,
        fp: FlowProto,
        local: SocketAddr,
        remote: Option<SocketAddr>,
    ) -> Reply {
        let Some(c) = reg.channels.get(&channel).filter(|c| c.client == client) else {
            return refuse(
                ErrorCode::NoSuchChannel,
                format!("you have no channel {channel}"),
            );
        };
        if !c.is_active() {
            return refuse(
                ErrorCode::NoSuchChannel,
                format!("channel {channel} is defunct"),
            );
        }
        let cred = c.cred.clone();
        let p = proto(fp);
        let addr = (!local.ip().is_unspecified()).then_some(local.ip());
        if local.port() != 0
            && !policy::may_claim_port(&reg.config.policy, &cred, local.port(), addr)
        {
            self.errors.count(ControlCount::NotPermitted);
            return refuse(
                ErrorCode::NotPermitted,
                format!(
                    "uid {} may not claim port {} (policy.privileged_ports_below / policy.ports)",
                    cred.uid,
                    local.port()
                ),
            );
        }
        let owned: usize = reg
            .channels
            .values()
            .filter(|c| c.cred.uid == cred.uid)
            .map(|c| reg.flows.flows_of(c.id))
            .sum();
        let limit = reg.config.limits.flows_per_user;
        if cred.uid != 0 && owned >= limit {
            self.errors.count(ControlCount::LimitFlows);
            return refuse(
                ErrorCode::Limit,
                format!(
                    "uid {} has {owned} flows; the limit is limits.flows_per_user = {limit}",
                    cred.uid
                ),
            );
        }
        // Clashes between apps are named by the flow table (the host would only name the nexus).
        if local.port() != 0
            && let Err(e) = reg.flows.check(channel, spec(p, local, remote))
        {
            self.errors.count(ControlCount::PortInUse);
            return refuse(ErrorCode::InUse, e.to_string());
        }
        let (handle, local) = match reg.host_ports.acquire(channel, p, local) {
            Ok(h) => h,
            Err(ReserveError::InUse {
                proto,
                local,
                holder,
            }) => {
                self.errors.count(ControlCount::PortInUse);
                let by = holder.map(|h| format!(" by {h}")).unwrap_or_default();
                return refuse(
                    ErrorCode::InUse,
                    format!("{proto:?} {local} is already in use{by}"),
                );
            }
            Err(e) => return refuse(ErrorCode::Resource, e.to_string()),
        };
        let id: FlowId = match reg.flows.insert(channel, spec(p, local, remote)) {
            Ok(id) => id,
            Err(e) => {
                reg.host_ports.unacquire(handle);
                let code = match e {
                    TableError::InUse { .. } => {
                        self.errors.count(ControlCount::PortInUse);
                        ErrorCode::InUse
                    }
                    TableError::Full(_) => ErrorCode::Limit,
                };
                return refuse(code, e.to_string());
            }
        };
        reg.host_ports.bind(id, handle);
        tracing::debug!(channel, flow = id, %local, ?remote, "flow added");
        Reply::FlowAdded { flow: id, local }
    }

    pub(super) fn remove_flow(&mut self, reg: &mut Registry, client: u64, flow: FlowId) -> Reply {
        let mine = reg
            .flows
            .get(flow)
            .and_then(|f| reg.channels.get(&f.channel))
            .is_some_and(|c| c.client == client);
        if !mine {
            return refuse(ErrorCode::NoSuchChannel, format!("you have no flow {flow}"));
        }
        // What the app sent on the flow before removing it still goes out: drain the
        // channel's TX ring first (an app closes a socket right after its last send).
        if let (Some(sw), Some(f)) = (reg.datapath.as_mut(), reg.flows.get(flow)) {
            let id = f.channel;
            if let Some(c) = reg.channels.get_mut(&id) {
                let ring = reg.config.channel.max_ring_slots as usize;
                if let Err(q) = sw.tx_pass(&mut reg.flows, c, ring, std::time::Instant::now()) {
                    tracing::warn!(channel = id, reason = ?q, "draining TX before a flow removal");
                }
                sw.flush();
            }
        }
        reg.flows.remove(flow);
        reg.host_ports.release(flow);
        Reply::Done
    }

    /// A page of the flows visible to the client: those whose ids follow `after`, at most
    /// [`FLOWS_PER_PAGE`].
    pub(super) fn list_flows(&self, reg: &Registry, client: u64, after: Option<u32>) -> Reply {
        let uid = self.clients.get(&client).map_or(u32::MAX, |c| c.cred.uid);
        let first = after.map_or(0, |a| a.saturating_add(1));
        let mut flows: Vec<FlowStatus> = reg
            .flows
            .iter_from(first)
            .filter_map(|(id, f)| {
                let c = reg.channels.get(&f.channel)?;
                if uid != 0 && c.cred.uid != uid {
                    return None;
                }
                let (p, local, remote) = match f.spec {
                    FlowSpec::Exact(k) => (k.proto, k.local, Some(k.remote)),
                    FlowSpec::Listener(p, a) => (p, a, None),
                };
                let (rx_packets, tx_packets) = reg.flows.counters(id);
                Some(FlowStatus {
                    id,
                    channel: f.channel,
                    pid: c.cred.pid,
                    uid: c.cred.uid,
                    proto: wire(p),
                    local,
                    remote,
                    class: "best_effort".into(),
                    rx_packets,
                    tx_packets,
                })
            })
            .take(FLOWS_PER_PAGE + 1)
            .collect();
        let next_after = if flows.len() > FLOWS_PER_PAGE {
            flows.truncate(FLOWS_PER_PAGE);
            flows.last().map(|f| f.id)
        } else {
            None
        };
        Reply::Flows { flows, next_after }
    }
}

/// Most flows in one reply (each record is a few hundred bytes of JSON: well inside a reply).
const FLOWS_PER_PAGE: usize = 256;
