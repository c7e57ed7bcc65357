//! Deterministic pseudo-random decisions for fault injection.
//!
//! A decision is the SHA-256 of the seed, the decision's name, the key of the request (its body
//! for a real-time call, the input file's checksum for a batch job) and how many times that key
//! was seen before. Arrival order between different requests plays no part, so concurrent clients
//! get the same faults for the same requests in every run with the same seed. SHA-256 is used
//! because its output, unlike that of std's hashers, is the same on every Rust version.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Counts how often each request key was seen, and hands out a [`Roll`] per occurrence.
#[derive(Debug)]
pub(super) struct Dice {
    seed: u64,
    seen: Mutex<HashMap<[u8; 32], u64>>,
}

impl Dice {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more occurrence of `key` and returns the draws for it.
    pub fn roll(&self, key: &[u8]) -> Roll {
        let key: [u8; 32] = Sha256::digest(key).into();
        let mut seen = self.seen.lock().expect("dice lock poisoned");
        let count = seen.entry(key).or_default();
        let occurrence = *count;
        *count += 1;
        Roll {
            seed: self.seed,
            key,
            occurrence,
        }
    }
}

/// The draws of one occurrence of one request key.
#[derive(Debug, Clone)]
pub(super) struct Roll {
    seed: u64,
    key: [u8; 32],
    occurrence: u64,
}

impl Roll {
    /// Returns how many times this request key was seen before this occurrence.
    pub fn occurrence(&self) -> u64 {
        self.occurrence
    }

    /// Returns 64 pseudo-random bits for the decision `decision` about `item` (such as one line's
    /// `custom_id`, or empty for a decision about the whole request).
    pub fn bits(&self, decision: &str, item: &[u8]) -> u64 {
        let mut hasher = Sha256::new();
        hasher.update(self.seed.to_le_bytes());
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        hasher.update((decision.len() as u64).to_le_bytes());
        hasher.update(decision.as_bytes());
        hasher.update((item.len() as u64).to_le_bytes());
        hasher.update(item);
        hasher.update(self.key);
        hasher.update(self.occurrence.to_le_bytes());
        let digest = hasher.finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("a digest has 32 bytes"))
    }

    /// Returns a number in [0, 1).
    pub fn uniform(&self, decision: &str, item: &[u8]) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.bits(decision, item) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Returns true with probability `rate`; never for a rate of 0, always for a rate of 1.
    pub fn chance(&self, decision: &str, rate: f64) -> bool {
        rate > 0.0 && self.uniform(decision, b"") < rate
    }

    /// Returns a number from `min` to `max`, both included.
    pub fn between(&self, decision: &str, min: u64, max: u64) -> u64 {
        if max <= min {
            return min;
        }
        let span = max - min + 1;
        min + self.bits(decision, b"") % span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_key_give_same_draws() {
        let first = Dice::new(7);
        let second = Dice::new(7);
        let a = first.roll(b"request");
        let b = second.roll(b"request");
        assert_eq!(a.bits("drop", b""), b.bits("drop", b""));
        assert_ne!(a.bits("drop", b""), a.bits("server_error", b""));
    }

    #[test]
    fn repeats_and_seeds_change_draws() {
        let dice = Dice::new(7);
        let first = dice.roll(b"request").bits("drop", b"");
        let repeat = dice.roll(b"request").bits("drop", b"");
        assert_ne!(first, repeat);
        let other_seed = Dice::new(8).roll(b"request").bits("drop", b"");
        assert_ne!(first, other_seed);
    }

    #[test]
    fn other_keys_do_not_shift_the_count() {
        let dice = Dice::new(1);
        let alone = Dice::new(1).roll(b"b").bits("x", b"");
        dice.roll(b"a");
        assert_eq!(dice.roll(b"b").bits("x", b""), alone);
    }

    #[test]
    fn chance_honours_the_extremes_and_the_rate() {
        let dice = Dice::new(3);
        let hits = (0..10_000)
            .filter(|_| dice.roll(b"k").chance("rate", 0.3))
            .count();
        assert!((2_700..3_300).contains(&hits), "{hits} hits");
        let roll = dice.roll(b"k");
        assert!(!roll.chance("rate", 0.0));
        assert!(roll.chance("rate", 1.0));
    }

    #[test]
    fn between_stays_in_range() {
        let dice = Dice::new(5);
        for _ in 0..1_000 {
            let value = dice.roll(b"k").between("latency", 10, 20);
            assert!((10..=20).contains(&value), "{value}");
        }
        assert_eq!(dice.roll(b"k").between("latency", 4, 4), 4);
    }
}
