//! When the nexus polls and when it sleeps: interrupt mitigation for a user-space datapath.
//!
//! A wake-up across cores costs about as much CPU as a kernel socket spends on a packet
//! (`reference/baselines.md`), so the nexus must neither burn a core spinning between sparse
//! packets nor take a wake-up for every small batch. The pacer decides, after every pass over
//! the channels, from two measurements:
//!
//! * the **gap** between busy periods (an EWMA): the nexus keeps polling after the last packet
//!   for `spin` only if packets usually come back within `spin`; otherwise spinning is wasted
//!   and it sleeps at once;
//! * the **batch** found by one pass in the last busy period: traffic that arrives in batches
//!   of at least `coalesce_batch` is already latency-tolerant, so the nexus sleeps on a
//!   `coalesce` timer that frames from the interface do not cut short, and serves whatever
//!   accumulated when it wakes (NAPI-style moderation). Whether apps ring it during that
//!   sleep depends on what *they* sent: apps that streamed (batches of `coalesce_batch` or
//!   more) need not; apps that sent little while receiving a lot (TCP acknowledgements,
//!   requests) do, because their few packets are what their peers wait for. Smaller batches
//!   arm everything, so a single packet wakes the nexus at once.
//!
//! After a busy period in which apps only answered what they received, the nexus spins for
//! the shorter `answer_spin`: their next packets wait on work that needs the core it would
//! spin on.
//!
//! A plain function of (state, packets moved and sent, now), tested without I/O.

use std::time::{Duration, Instant};

/// What the event loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Pass over the channels again at once.
    Poll,
    /// Sleep in epoll, until the timer or a control event, or:
    Sleep {
        /// Longest sleep.
        timeout: Duration,
        /// an app's send (the channels' need-wakeup flags are set first);
        arm: bool,
        /// a frame from the interface.
        netif: bool,
    },
}

/// What apps sent in one pass: packets taken from their rings, and the frames those became
/// on the wire (a large TCP packet cut into segments is many frames).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Packets.
    pub packets: usize,
    /// Wire frames.
    pub frames: usize,
}

impl Sent {
    /// `n` packets of one frame each (no segmentation, or no interface).
    pub fn packets(n: usize) -> Self {
        Self {
            packets: n,
            frames: n,
        }
    }
}

/// How long an armed sleep lasts before housekeeping.
pub const IDLE_SLEEP: Duration = Duration::from_secs(1);

/// The sleep of an idle nexus: anything wakes it.
const IDLE: Next = Next::Sleep {
    timeout: IDLE_SLEEP,
    arm: true,
    netif: true,
};

/// The pacer's state.
#[derive(Debug, Clone)]
pub struct Pacer {
    spin: Duration,
    /// The spin after a busy period in which apps answered.
    answer_spin: Duration,
    coalesce: Duration,
    coalesce_batch: usize,
    last_work: Instant,
    idle: bool,
    /// The last sleep was a coalescing timer, not a doorbell-armed one.
    coalesced: bool,
    gap: Duration,
    period_peak: usize,
    /// Packets moved in the busy period, and of them, sent by apps (and the wire frames
    /// those became).
    period_moved: usize,
    period_sent: usize,
    period_sent_frames: usize,
    heavy: usize,
}

impl Pacer {
    /// A pacer that spins up to `spin`, and coalesces batches of `coalesce_batch` packets or
    /// more for up to `coalesce` (zero disables coalescing).
    /// A pass that moves `heavy` packets or more right after a coalescing sleep means the load
    /// outruns the timer: the pacer goes back to polling.
    pub fn new(
        spin: Duration,
        coalesce: Duration,
        coalesce_batch: usize,
        heavy: usize,
        now: Instant,
    ) -> Self {
        Self {
            spin,
            answer_spin: spin,
            coalesce,
            coalesce_batch,
            last_work: now,
            idle: true,
            coalesced: false,
            gap: Duration::ZERO,
            period_peak: 0,
            period_moved: 0,
            period_sent: 0,
            period_sent_frames: 0,
            heavy: heavy.max(1),
        }
    }

    /// After a busy period in which apps answered what they received (see
    /// [`Pacer::after_pass`]), spin at most `d`.
    pub fn with_answer_spin(mut self, d: Duration) -> Self {
        self.answer_spin = d.min(self.spin);
        self
    }

    /// The EWMA of the gap between busy periods.
    pub fn gap(&self) -> Duration {
        self.gap
    }

    /// Decides after a pass that moved `moved` packets, `sent` of them sent by apps.
    pub fn after_pass(&mut self, moved: usize, sent: Sent, now: Instant) -> Next {
        if moved > 0 {
            if self.idle {
                if !self.coalesced {
                    // Only doorbell-driven sleeps measure how far apart packets come.
                    let gap = now.saturating_duration_since(self.last_work);
                    self.gap = (self.gap * 7 + gap) / 8;
                } else if moved >= self.heavy {
                    // Work piled up during the timer: this is a flood, poll it.
                    self.gap = Duration::ZERO;
                }
                self.idle = false;
            }
            self.last_work = now;
            self.period_peak = self.period_peak.max(moved);
            self.period_moved = self.period_moved.saturating_add(moved);
            self.period_sent = self.period_sent.saturating_add(sent.packets);
            self.period_sent_frames = self.period_sent_frames.saturating_add(sent.frames);
            return Next::Poll;
        }
        // Apps that answer what they receive (TCP acknowledgements, replies: a few packets
        // out for many in) are in a conversation whose peer waits on them: a timer would add
        // to every round trip (and a BBR sender sizes its window from the shortest one it
        // sees), so they get no timer.
        let received = self.period_moved.saturating_sub(self.period_sent);
        let answering = self.period_sent > 0 && self.period_sent.saturating_mul(4) <= received;
        // Answering in wire frames too: not a stream of large packets that carried many
        // frames each (a bulk sender receiving acknowledgements).
        let only_answering = answering && self.period_sent_frames.saturating_mul(4) <= received;
        let coalescing =
            !self.coalesce.is_zero() && self.period_peak >= self.coalesce_batch && !answering;
        // Spin only while packets come back within the spin; and traffic the timer will
        // coalesce gets at most half a timer of it (spinning through the timer would turn
        // moderation into busy polling). Apps that answer get the shorter answer spin: what
        // they send next comes only after they have taken in what they received, and on a
        // small machine the nexus's spinning takes the core they need for it (measured, A/B
        // of 16 pairs: a bulk TCP transfer to an app +20% and +24% with 50 µs instead of
        // 200, better in 15 and 16 of 16; the app's sending and round trips unchanged).
        let spin = if self.gap > self.spin {
            Duration::ZERO
        } else if coalescing {
            self.spin.min(self.coalesce / 2)
        } else if only_answering {
            self.answer_spin
        } else {
            self.spin
        };
        if now.saturating_duration_since(self.last_work) < spin {
            return Next::Poll;
        }
        self.idle = true;
        self.period_peak = 0;
        self.period_moved = 0;
        let sent = std::mem::take(&mut self.period_sent);
        self.period_sent_frames = 0;
        self.coalesced = coalescing;
        if self.coalesced {
            Next::Sleep {
                timeout: self.coalesce,
                arm: sent == 0,
                netif: false,
            }
        } else {
            IDLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPIN: Duration = Duration::from_micros(50);
    const CO: Duration = Duration::from_micros(100);

    /// Runs the pacer over a schedule of (time in µs, packets) arrivals; returns the decision
    /// taken once each arrival's busy period ends (first non-Poll after it, or Poll if the next
    /// arrival comes first).
    fn drive(p: &mut Pacer, t0: Instant, arrivals: &[(u64, usize)]) -> Vec<Next> {
        let mut out = Vec::new();
        for (i, &(at, n)) in arrivals.iter().enumerate() {
            let start = t0 + Duration::from_micros(at);
            p.after_pass(n, Sent::packets(n), start);
            let until = arrivals.get(i + 1).map_or(at + 1000, |a| a.0);
            let mut t = at + 1;
            let mut decision = Next::Poll;
            while t < until {
                decision = p.after_pass(0, Sent::packets(0), t0 + Duration::from_micros(t));
                if decision != Next::Poll {
                    break;
                }
                t += 1;
            }
            out.push(decision);
        }
        out
    }

    #[test]
    fn close_packets_keep_it_polling_and_sparse_single_packets_arm_it() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SPIN, CO, 8, 64, t0);
        // One packet every 20 µs: always back within the spin window.
        let close: Vec<(u64, usize)> = (0..50).map(|i| (i * 20, 1)).collect();
        let d = drive(&mut p, t0, &close);
        assert!(d[..d.len() - 1].iter().all(|d| *d == Next::Poll), "{d:?}");
        assert_eq!(d.last(), Some(&IDLE), "single packets never coalesce");
        // One packet every 500 µs: the gap outgrows the spin, so it sleeps armed at once.
        let sparse: Vec<(u64, usize)> = (0..50).map(|i| 2000 + i * 500).map(|t| (t, 1)).collect();
        let d = drive(&mut p, t0, &sparse);
        assert_eq!(d.last(), Some(&IDLE));
        assert!(p.gap() > SPIN);
    }

    #[test]
    fn batched_load_is_served_on_a_timer_without_doorbells() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SPIN, CO, 8, 64, t0);
        let ticks: Vec<(u64, usize)> = (0..50).map(|i| (i * 160, 16)).collect();
        let d = drive(&mut p, t0, &ticks);
        assert_eq!(
            d.last(),
            Some(&Next::Sleep {
                timeout: CO,
                arm: false,
                netif: false
            })
        );
        // When the load stops, the next empty wake-up arms the flags for the idle sleep.
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t0 + Duration::from_millis(100)),
            IDLE
        );
    }

    #[test]
    fn apps_that_answer_heavy_receive_traffic_get_no_timer() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SPIN, CO, 8, 64, t0);
        // 16 frames in, 1 acknowledgement out, every 160 µs: no timer, everything wakes.
        let mut last = Next::Poll;
        for i in 0..50u64 {
            let at = t0 + Duration::from_micros(i * 160);
            p.after_pass(17, Sent::packets(1), at);
            last = p.after_pass(0, Sent::packets(0), at + SPIN + Duration::from_micros(1));
        }
        assert_eq!(last, IDLE);
        // 16 frames in and nothing out: the timer, and an app that sends rings.
        for i in 50..100u64 {
            let at = t0 + Duration::from_micros(i * 160);
            p.after_pass(16, Sent::packets(0), at);
            last = p.after_pass(0, Sent::packets(0), at + SPIN + Duration::from_micros(1));
        }
        assert_eq!(
            last,
            Next::Sleep {
                timeout: CO,
                arm: true,
                netif: false
            }
        );
    }

    #[test]
    fn apps_that_answer_get_the_shorter_spin_and_streams_the_full_one() {
        const ANSWER: Duration = Duration::from_micros(10);
        let t0 = Instant::now();
        let mut p = Pacer::new(SPIN, CO, 8, 64, t0).with_answer_spin(ANSWER);
        // 16 frames in, 1 out: past the answer spin, the nexus sleeps (everything armed).
        p.after_pass(17, Sent::packets(1), t0);
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t0 + ANSWER / 2),
            Next::Poll
        );
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t0 + ANSWER + Duration::from_micros(1)),
            IDLE
        );
        // An app's large packets cut into 11 frames each, a few acknowledgements in: a
        // stream, which keeps the whole spin (and, under 8 per pass, no timer).
        let t = t0 + Duration::from_micros(100);
        p.after_pass(
            3 + 2,
            Sent {
                packets: 2,
                frames: 22,
            },
            t,
        );
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t + ANSWER * 2),
            Next::Poll
        );
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t + SPIN + Duration::from_micros(1)),
            IDLE
        );
        // Request and response, one frame each way: the whole spin.
        let t = t0 + Duration::from_micros(400);
        p.after_pass(2, Sent::packets(1), t);
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t + ANSWER * 2),
            Next::Poll
        );
        // The answer spin never exceeds the spin.
        let q = Pacer::new(SPIN, CO, 8, 64, t0).with_answer_spin(SPIN * 2);
        assert_eq!(q.answer_spin, SPIN);
    }

    #[test]
    fn a_flood_that_outruns_the_timer_goes_back_to_polling() {
        let t0 = Instant::now();
        let mut p = Pacer::new(SPIN, CO, 8, 64, t0);
        // Sparse batches: coalescing, and the gap is large.
        let ticks: Vec<(u64, usize)> = (0..20).map(|i| (i * 500, 16)).collect();
        assert_eq!(
            drive(&mut p, t0, &ticks).last(),
            Some(&Next::Sleep {
                timeout: CO,
                arm: false,
                netif: false
            })
        );
        // Then a flood: the first wake-up finds a full pass, and the pacer polls from then on.
        let t = t0 + Duration::from_micros(20_000);
        assert_eq!(p.after_pass(64, Sent::packets(64), t), Next::Poll);
        assert_eq!(p.gap(), Duration::ZERO);
        assert_eq!(
            p.after_pass(0, Sent::packets(0), t + Duration::from_micros(10)),
            Next::Poll,
            "spins between batches"
        );
    }

    #[test]
    fn zero_spin_and_zero_coalesce_sleep_armed_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::ZERO, Duration::ZERO, 8, 64, t0);
        assert_eq!(p.after_pass(100, Sent::packets(100), t0), Next::Poll);
        assert_eq!(p.after_pass(0, Sent::packets(0), t0), IDLE);
    }
}
