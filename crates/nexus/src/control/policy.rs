//! The policy: who may open which kinds of channel and claim which ports.

use netchannel_shm::control::ChannelKind;

use crate::config::Policy;

pub use crate::cred::Cred;

impl Cred {
    fn in_any(&self, groups: &[u32]) -> bool {
        groups.contains(&self.gid) || self.groups.iter().any(|g| groups.contains(g))
    }

    /// Supplementary groups of `pid`, best effort.
    pub fn groups_of(pid: i32) -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .filter_map(|g| g.parse().ok())
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

/// Whether `cred` may open a channel of `kind`; the error says why not.
pub fn may_open(p: &Policy, cred: &Cred, kind: ChannelKind) -> Result<(), String> {
    if cred.uid == 0 {
        return Ok(());
    }
    let listed = p.users.contains(&cred.uid) || cred.in_any(&p.groups);
    let open_to_all = p.users.is_empty() && p.groups.is_empty();
    if !open_to_all && !listed {
        return Err(format!(
            "uid {} is not in policy.users or policy.groups of the nexus config",
            cred.uid
        ));
    }
    match kind {
        ChannelKind::Normal => Ok(()),
        ChannelKind::LowLatency if p.low_latency_users.contains(&cred.uid) => Ok(()),
        ChannelKind::Monitor if p.monitor_users.contains(&cred.uid) => Ok(()),
        ChannelKind::LowLatency => Err(format!(
            "uid {} may not open low-latency channels (policy.low_latency_users)",
            cred.uid
        )),
        ChannelKind::Monitor => Err(format!(
            "uid {} may not open monitor channels (policy.monitor_users)",
            cred.uid
        )),
    }
}

/// Whether `cred` may claim `port` on `addr` (`None`: the wildcard address).
pub fn may_claim_port(p: &Policy, cred: &Cred, port: u16, addr: Option<std::net::IpAddr>) -> bool {
    if cred.uid == 0 {
        return true;
    }
    let granted = p.ports.iter().any(|r| {
        (r.first..=r.last).contains(&port)
            && (r.users.is_empty() || r.users.contains(&cred.uid))
            && (r.groups.is_empty() || cred.in_any(&r.groups))
            && (r.addresses.is_empty() || addr.is_some_and(|a| r.addresses.contains(&a)))
    });
    granted
        || (port >= p.privileged_ports_below
            && p.ports.iter().all(|r| !(r.first..=r.last).contains(&port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRule;

    fn user(uid: u32, gid: u32) -> Cred {
        Cred {
            pid: 1,
            uid,
            gid,
            groups: vec![],
        }
    }

    #[test]
    fn open_rules() {
        let mut p = Policy::default();
        assert!(may_open(&p, &user(1000, 1000), ChannelKind::Normal).is_ok());
        assert!(may_open(&p, &user(1000, 1000), ChannelKind::LowLatency).is_err());
        assert!(may_open(&p, &user(0, 0), ChannelKind::Monitor).is_ok());
        p.groups = vec![50];
        assert!(may_open(&p, &user(1000, 1000), ChannelKind::Normal).is_err());
        assert!(may_open(&p, &user(1000, 50), ChannelKind::Normal).is_ok());
        let mut c = user(1001, 1001);
        c.groups = vec![50];
        assert!(may_open(&p, &c, ChannelKind::Normal).is_ok());
    }

    #[test]
    fn port_rules() {
        let mut p = Policy::default();
        let u = user(1000, 1000);
        assert!(
            !may_claim_port(&p, &u, 80, None),
            "privileged ports need root"
        );
        assert!(may_claim_port(&p, &u, 8080, None));
        assert!(may_claim_port(&p, &user(0, 0), 80, None));
        p.ports.push(PortRule {
            users: vec![1000],
            groups: vec![],
            first: 80,
            last: 80,
            addresses: vec![],
        });
        p.ports.push(PortRule {
            users: vec![2000],
            groups: vec![],
            first: 9000,
            last: 9001,
            addresses: vec![],
        });
        assert!(may_claim_port(&p, &u, 80, None), "granted by a rule");
        assert!(
            !may_claim_port(&p, &u, 9000, None),
            "a rule reserves its range for its users"
        );
        assert!(may_claim_port(&p, &user(2000, 1), 9001, None));
    }
}
