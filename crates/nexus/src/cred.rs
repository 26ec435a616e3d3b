//! Who a control client is: a bottom module, so that the control path (which decides what a
//! client may do) and the channels (which remember their owner) share it without importing
//! each other.

/// The credentials of a control client, from SO_PEERCRED (plus its supplementary groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups, read from `/proc/<pid>/status` when the client connects.
    pub groups: Vec<u32>,
}
