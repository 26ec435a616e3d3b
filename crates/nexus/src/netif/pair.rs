//! Two in-memory interfaces joined back to back: what one sends, the other receives. For
//! in-process tests of the whole flowswitch path without a kernel interface.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use netchannel_shm::doorbell::Doorbell;

use super::{Netif, NetifError};

/// Most frames queued in one direction.
const DEPTH: usize = 4096;
/// Largest frame (Ethernet, 1500-byte MTU).
pub const MAX_FRAME: usize = 1514;

#[derive(Debug)]
struct Queue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// The sender rings through `ring`; the receiver sleeps on (and drains) `wait`.
    ring: Doorbell,
    wait: Doorbell,
}

/// One end of a pair.
#[derive(Debug)]
pub struct PairEnd {
    mac: [u8; 6],
    inbox: Arc<Queue>,
    outbox: Arc<Queue>,
}

/// Makes a pair of interfaces with the given MAC addresses.
pub fn pair(mac_a: [u8; 6], mac_b: [u8; 6]) -> std::io::Result<(PairEnd, PairEnd)> {
    let q = || -> std::io::Result<Arc<Queue>> {
        let err = |e: netchannel_shm::Error| std::io::Error::other(e.to_string());
        let (ring, wait) = Doorbell::pair().map_err(err)?;
        Ok(Arc::new(Queue {
            frames: Mutex::new(VecDeque::new()),
            ring,
            wait: Doorbell::adopt(wait).map_err(err)?,
        }))
    };
    let (ab, ba) = (q()?, q()?);
    Ok((
        PairEnd {
            mac: mac_a,
            inbox: ba.clone(),
            outbox: ab.clone(),
        },
        PairEnd {
            mac: mac_b,
            inbox: ab,
            outbox: ba,
        },
    ))
}

impl Netif for PairEnd {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> usize {
        let batch: Vec<Vec<u8>> = {
            let Ok(mut q) = self.inbox.frames.lock() else {
                return 0;
            };
            let n = q.len().min(max);
            q.drain(..n).collect()
        };
        self.inbox.wait.drain();
        if !batch.is_empty() {
            let slices: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            f(&slices);
        }
        batch.len()
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), NetifError> {
        if frame.len() > MAX_FRAME {
            return Err(NetifError::TooLarge(frame.len()));
        }
        let mut q = self.outbox.frames.lock().map_err(|_| NetifError::Down)?;
        if q.len() >= DEPTH {
            return Err(NetifError::Full);
        }
        q.push_back(frame.to_vec());
        drop(q);
        self.outbox.ring.ring();
        Ok(())
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.inbox.wait.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_order_and_oversize_is_refused() {
        let (mut a, mut b) = pair([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).unwrap();
        a.send(b"one").unwrap();
        a.send(b"two").unwrap();
        assert!(matches!(
            a.send(&[0u8; MAX_FRAME + 1]),
            Err(NetifError::TooLarge(_))
        ));
        let mut got = Vec::new();
        assert_eq!(
            b.recv(10, &mut |fs| got.extend(fs.iter().map(|f| f.to_vec()))),
            2
        );
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(a.recv(10, &mut |_: &[&[u8]]| {}), 0);
    }
}
