//! `control_decode`: the control protocol's decoder, on whole messages and on JSON bodies
//! behind a valid header. Nothing may panic, and whatever decodes re-encodes to a message that
//! decodes to an equal value.
//!
//! One tolerance: serde_json is built without its `float_roundtrip` feature, so its parser is
//! not correctly rounded and a float (`NexusStatus::uptime_s`, the protocol's only one) may come
//! back up to 2 units in the last place off (e.g. 1234.5678901234567 reads back as
//! 1234.567890123457). Harmless for an uptime; everything else must be exact.

use netchannel_shm::control::{MAX_REPLY, MAX_REQUEST, Reply, Request, decode, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The header of a message of the version this build speaks.
pub fn header() -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(netchannel_shm::control::MAGIC);
    h[4..6].copy_from_slice(&netchannel_shm::control::VERSION.to_le_bytes());
    h
}

/// Runs every check on one input: as a whole message, and as a body behind a valid header
/// (so that the fuzzer's effort goes to the JSON, not to rediscovering the header).
pub fn run(data: &[u8]) {
    whole(data);
    let mut msg = header().to_vec();
    msg.extend_from_slice(data);
    whole(&msg);
}

fn whole(msg: &[u8]) {
    check::<Request>(msg, MAX_REQUEST);
    check::<Reply>(msg, MAX_REPLY);
}

/// A control message and what "the same after a round trip" means for it.
trait Msg: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug {
    fn same(a: &Self, b: &Self) -> bool {
        a == b
    }
}

impl Msg for Request {}

impl Msg for Reply {
    fn same(a: &Self, b: &Self) -> bool {
        match (a, b) {
            (Reply::Status(x), Reply::Status(y)) if ulps(x.uptime_s, y.uptime_s) <= 2 => {
                let mut y = (**y).clone();
                y.uptime_s = x.uptime_s;
                **x == y
            }
            _ => a == b,
        }
    }
}

/// Distance in units in the last place between two finite floats of the same sign.
fn ulps(a: f64, b: f64) -> u64 {
    if a == b {
        return 0;
    }
    if a.is_sign_negative() != b.is_sign_negative() {
        return u64::MAX;
    }
    a.to_bits().abs_diff(b.to_bits())
}

fn check<T: Msg>(msg: &[u8], max: usize) {
    let Ok(v) = decode::<T>(msg, max) else {
        return;
    };
    let again = encode(&v);
    // The size limit is the reader's; the codec itself must round-trip whatever it accepted.
    let w = decode::<T>(&again, usize::MAX).unwrap_or_else(|e| {
        panic!(
            "{v:?} re-encoded as {:?} does not decode: {e}",
            String::from_utf8_lossy(&again)
        )
    });
    assert!(
        T::same(&v, &w),
        "round trip changed the value: {v:?} became {w:?}; re-encoded as {:?}",
        String::from_utf8_lossy(&again)
    );
}
