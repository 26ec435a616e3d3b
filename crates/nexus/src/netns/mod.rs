//! One port space with the host stack.
//!
//! For every flow, the nexus holds a bound kernel socket on the flow's (protocol, address,
//! port), so no host process can take it while an app owns it, and a port the host already
//! uses is refused with the name of its holder. Addresses, routes and neighbours (netlink)
//! will live here too.

pub mod reserve;

pub use reserve::{Reservation, ReserveError, reserve};
