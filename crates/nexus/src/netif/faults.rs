//! A fault-injecting layer around any backend: drops, duplicates, reorders and delays frames
//! in both directions, from a seeded generator, so that tests can impair a link the way a bad
//! network would (this kernel has no netem) and replay the same impairment.
//!
//! Held frames (reordered or delayed) are copied into the layer's own memory, since a backend
//! lends its frames only for the duration of a call; they go out on a later `recv`, `send` or
//! `flush`, once due.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Netif, NetifError};

/// Longest delay the layer inflicts (a longer one would hold frames, and memory, for ever).
const MAX_DELAY_US: u64 = 10_000_000;

/// What to inflict, per frame and direction. Rates are probabilities in `[0, 1]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Seed of the generator (the same seed and traffic give the same faults).
    pub seed: u64,
    /// Frames lost.
    pub drop: f64,
    /// Frames delivered twice.
    pub duplicate: f64,
    /// Frames held back and delivered after the next one.
    pub reorder: f64,
    /// Frames delayed by `delay_us`.
    pub delay: f64,
    /// How long a delayed frame is held, in microseconds.
    pub delay_us: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: 0.0,
            delay_us: 1000,
        }
    }
}

impl FaultConfig {
    /// Whether the rates are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("drop", self.drop),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
            ("delay", self.delay),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("faults.{name} = {v} must be between 0 and 1"));
            }
        }
        if self.delay_us > MAX_DELAY_US {
            return Err(format!(
                "faults.delay_us = {} must be at most {MAX_DELAY_US} (10 s)",
                self.delay_us
            ));
        }
        Ok(())
    }
}

/// Counts of what was inflicted.
#[derive(Debug, Clone, Copy, Default)]
struct Inflicted {
    dropped: u64,
    duplicated: u64,
    reordered: u64,
    delayed: u64,
}

/// A frame held back until `due`, or (reordered) until a later frame of its direction went.
#[derive(Debug)]
struct Held {
    frame: Vec<u8>,
    due: Instant,
    after_next: bool,
}

/// How long a reordered frame waits for a successor before it goes alone.
const REORDER_WAIT: Duration = Duration::from_millis(1);

/// One direction's held frames.
#[derive(Debug, Default)]
struct Lane {
    held: VecDeque<Held>,
}

impl Lane {
    /// Takes out the frames that may go now (`passed`: a later frame just went).
    fn release(&mut self, now: Instant, passed: bool, out: &mut Vec<Vec<u8>>) {
        let mut keep = VecDeque::with_capacity(self.held.len());
        while let Some(h) = self.held.pop_front() {
            if h.due <= now || (passed && h.after_next) {
                out.push(h.frame);
            } else {
                keep.push_back(h);
            }
        }
        self.held = keep;
    }

    fn hold(&mut self, frame: Vec<u8>, due: Instant, after_next: bool) {
        self.held.push_back(Held {
            frame,
            due,
            after_next,
        });
    }
}

/// What happens to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Pass,
    Drop,
    Duplicate,
    Reorder,
    Delay,
}

/// The layer.
#[derive(Debug)]
pub struct Faulty {
    inner: Box<dyn Netif>,
    cfg: FaultConfig,
    state: u64,
    rx: Lane,
    tx: Lane,
    done: Inflicted,
}

impl Faulty {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Netif>, cfg: FaultConfig) -> Self {
        Self {
            inner,
            cfg,
            state: cfg.seed.max(1),
            rx: Lane::default(),
            tx: Lane::default(),
            done: Inflicted::default(),
        }
    }

    /// xorshift64*: a uniform number in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn fate(&mut self) -> Fate {
        let r = self.uniform();
        let c = &self.cfg;
        let mut edge = c.drop;
        if r < edge {
            self.done.dropped += 1;
            return Fate::Drop;
        }
        edge += c.duplicate;
        if r < edge {
            self.done.duplicated += 1;
            return Fate::Duplicate;
        }
        edge += c.reorder;
        if r < edge {
            self.done.reordered += 1;
            return Fate::Reorder;
        }
        edge += c.delay;
        if r < edge {
            self.done.delayed += 1;
            return Fate::Delay;
        }
        Fate::Pass
    }

    /// Sends the held TX frames that may go now.
    fn release_tx(&mut self, now: Instant, passed: bool) {
        let mut out = Vec::new();
        self.tx.release(now, passed, &mut out);
        for f in out {
            let _ = self.inner.send(&f);
        }
    }
}

impl Netif for Faulty {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> usize {
        let now = Instant::now();
        let mut out = Vec::new();
        self.rx.release(now, false, &mut out);
        // The backend lends its frames only during the call: copy them, then decide.
        let mut fresh: Vec<Vec<u8>> = Vec::new();
        let n = self.inner.recv(max, &mut |frames| {
            fresh.extend(frames.iter().map(|fr| fr.to_vec()));
        });
        for frame in fresh {
            match self.fate() {
                Fate::Pass => {
                    out.push(frame);
                    self.rx.release(now, true, &mut out);
                }
                Fate::Drop => {}
                Fate::Duplicate => {
                    out.push(frame.clone());
                    out.push(frame);
                    self.rx.release(now, true, &mut out);
                }
                Fate::Reorder => self.rx.hold(frame, now + REORDER_WAIT, true),
                Fate::Delay => {
                    let due = now + Duration::from_micros(self.cfg.delay_us);
                    self.rx.hold(frame, due, false);
                }
            }
        }
        if !out.is_empty() {
            let refs: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
            f(&refs);
        }
        n
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), NetifError> {
        let now = Instant::now();
        match self.fate() {
            Fate::Pass => {
                self.inner.send(frame)?;
                self.release_tx(now, true);
            }
            Fate::Drop => {}
            Fate::Duplicate => {
                self.inner.send(frame)?;
                let _ = self.inner.send(frame);
                self.release_tx(now, true);
            }
            Fate::Reorder => self.tx.hold(frame.to_vec(), now + REORDER_WAIT, true),
            Fate::Delay => {
                let due = now + Duration::from_micros(self.cfg.delay_us);
                self.tx.hold(frame.to_vec(), due, false);
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        self.release_tx(Instant::now(), false);
        self.inner.flush();
    }

    fn mtu(&self) -> u32 {
        self.inner.mtu()
    }

    fn mac(&self) -> [u8; 6] {
        self.inner.mac()
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.wake_fd()
    }

    fn failed(&self) -> Option<&str> {
        self.inner.failed()
    }

    fn housekeeping(&mut self) {
        self.inner.housekeeping();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.inner.counters();
        v.extend([
            ("faults_dropped", self.done.dropped),
            ("faults_duplicated", self.done.duplicated),
            ("faults_reordered", self.done.reordered),
            ("faults_delayed", self.done.delayed),
        ]);
        v
    }

    fn steering(&self) -> Option<Box<dyn crate::netns::Steering>> {
        self.inner.steering()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netif::pair;

    fn frames(n: u8) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i; 60]).collect()
    }

    /// Sends `n` numbered frames through a faulty end of a pair and returns what the other
    /// end received, in order.
    fn through(cfg: FaultConfig, n: u8) -> (Vec<u8>, Vec<(&'static str, u64)>) {
        let (a, mut b) = pair::pair([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).expect("pair");
        let mut a = Faulty::new(Box::new(a), cfg);
        for f in frames(n) {
            a.send(&f).expect("send");
            a.flush();
        }
        std::thread::sleep(Duration::from_millis(3));
        a.flush();
        let mut got = Vec::new();
        std::thread::sleep(Duration::from_millis(1));
        b.recv(usize::MAX, &mut |fs| got.extend(fs.iter().map(|f| f[0])));
        (got, a.counters())
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        let bad = |f: FaultConfig| f.validate().is_err();
        assert!(bad(FaultConfig {
            drop: 1.5,
            ..FaultConfig::default()
        }));
        assert!(bad(FaultConfig {
            reorder: -0.1,
            ..FaultConfig::default()
        }));
        assert!(bad(FaultConfig {
            delay_us: u64::MAX,
            ..FaultConfig::default()
        }));
        assert!(!bad(FaultConfig::default()));
    }

    #[test]
    fn a_clean_layer_changes_nothing() {
        let (got, _) = through(FaultConfig::default(), 100);
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
    }

    #[test]
    fn faults_happen_at_their_rates_and_replay_with_the_seed() {
        let cfg = FaultConfig {
            seed: 7,
            drop: 0.1,
            duplicate: 0.1,
            reorder: 0.1,
            delay: 0.0,
            delay_us: 0,
        };
        let (got, counters) = through(cfg, 200);
        let count = |k: &str| counters.iter().find(|(n, _)| *n == k).map_or(0, |c| c.1);
        let (d, u, r) = (
            count("faults_dropped"),
            count("faults_duplicated"),
            count("faults_reordered"),
        );
        for c in [d, u, r] {
            assert!((5..=40).contains(&c), "about 10% of 200: {counters:?}");
        }
        // Every frame arrives once, twice (duplicated) or never (dropped).
        assert_eq!(got.len() as u64, 200 - d + u);
        assert!(
            got.windows(2).any(|w| w[0] > w[1]),
            "some frames were reordered"
        );
        let (again, _) = through(cfg, 200);
        assert_eq!(got, again, "the same seed gives the same faults");
    }

    #[test]
    fn received_frames_are_impaired_too() {
        let (mut a, b) = pair::pair([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).expect("pair");
        let mut b = Faulty::new(
            Box::new(b),
            FaultConfig {
                drop: 0.5,
                ..FaultConfig::default()
            },
        );
        for f in frames(100) {
            a.send(&f).expect("send");
        }
        let mut got = 0;
        b.recv(usize::MAX, &mut |fs| got += fs.len());
        assert!((20..=80).contains(&got), "about half of 100: {got}");
    }
}
