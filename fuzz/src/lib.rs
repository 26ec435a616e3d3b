//! The fuzz targets of netchannel, as plain functions of the input bytes: the libFuzzer
//! binaries in `fuzz_targets/` call them, and `tests/corpus.rs` replays the committed corpus
//! through them on any toolchain without instrumentation.

#![forbid(unsafe_code)]

pub mod control;
pub mod frame;
pub mod shm;

/// A target: a function of the input bytes that panics on a failed check.
pub type Target = fn(&[u8]);

/// The targets by name, for replaying inputs.
pub const TARGETS: [(&str, Target); 3] = [
    ("parse_frame", frame::run),
    ("control_decode", control::run),
    ("shm_hostile_peer", shm::run),
];
