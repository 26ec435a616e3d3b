//! The flowswitch: classifies packets into flows and flows into channels.
//!
//! * [`parse`]: one pass over L2/L3/L4 with validated lengths and software checksums;
//! * [`checksum`]: the Internet checksum, summed wide and folded into copies;
//! * [`coalesce`]: delivery into a channel (checksums verified while copying) and receive
//!   coalescing of TCP segments;
//! * [`segment`]: segmentation offload, large TCP packets from apps cut to the wire's MSS;
//! * [`reassembly`]: fragments from the wire made whole again, within the kernel's limits;
//! * [`fragment`]: datagrams from apps larger than the MTU cut into fragments;
//! * [`table`]: the flow table, exact 5-tuples first, then listeners;
//! * [`tx`]: validation of what an app sends (anti-spoofing);
//! * [`conntrack`]: just enough of each TCP connection to reset it when its app dies;
//! * [`neighbour`]: next hops (ARP/NDP behind a TAP, the kernel's answers on a shared
//!   interface);
//! * [`drop`]: the drop taxonomy, one reason per frame or packet not delivered;
//! * [`port`]: how the core reaches a channel (a trait; [`MemPort`] in memory for tests);
//! * [`switch`]: the core that ties them together, frames and packets in, decisions out.
//!
//! Everything here is a plain function of (state, bytes, now): no I/O, no clock, no waiting.
//! The driver that owns the interface, the kernel socket and the clock is [`crate::datapath`]. So the
//! whole classification path is tested in-process and benchmarked with criterion
//! (`benches/flow_lookup.rs`).
//!
//! **Fragment policy.** A fragment is never delivered to an app as it is: a non-first fragment
//! carries no ports, and classifying it by guesswork could hand one app's data to another. The
//! switch reassembles fragments first ([`reassembly`]) and classifies the whole datagram.
//! Apps send whole datagrams, never fragments (`tx_fragment`): the nexus validates a datagram
//! once, ports and all, and cuts it to the MTU ([`fragment`]).

pub mod checksum;
pub mod coalesce;
pub mod conntrack;
pub mod drop;
pub mod fragment;
pub mod index;
pub mod neighbour;
pub mod parse;
pub mod port;
pub mod reassembly;
pub mod segment;
pub mod switch;
pub mod table;
pub mod tx;

#[cfg(test)]
mod tests;

pub use drop::{DropCounters, DropReason};
pub use parse::{Parsed, Proto, RxDrop};
pub use port::{MemPort, Port, Ports};
pub use switch::{NextHop, Switch, SwitchStats, TxStep};
pub use table::{FlowId, FlowKey, FlowSpec, FlowTable, Hit, TableError};
pub use tx::TxDrop;
