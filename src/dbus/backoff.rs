//! How long to wait between attempts to reach something that went away: a
//! first wait that doubles after each failed attempt, up to a ceiling.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first.min(max),
            max,
            attempts: 0,
        }
    }

    /// Counts a failed attempt and says how long to wait before the next one.
    pub fn failed(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// The attempts made so far, counting the one that succeeds.
    pub fn attempts(&self) -> u32 {
        self.attempts.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_wait_doubles_up_to_the_ceiling_and_stays_there() {
        let mut backoff = Backoff::new(50 * MS, 1000 * MS);
        let waits: Vec<_> = (0..8).map(|_| backoff.failed()).collect();
        assert_eq!(
            waits,
            [50, 100, 200, 400, 800, 1000, 1000, 1000].map(|ms| ms * MS)
        );
        assert_eq!(backoff.attempts(), 9);
    }

    #[test]
    fn a_first_success_is_one_attempt() {
        assert_eq!(Backoff::new(50 * MS, 1000 * MS).attempts(), 1);
    }

    #[test]
    fn a_first_wait_above_the_ceiling_is_the_ceiling() {
        let mut backoff = Backoff::new(5000 * MS, 1000 * MS);
        assert_eq!(backoff.failed(), 1000 * MS);
    }

    #[test]
    fn forever_does_not_overflow() {
        let mut backoff = Backoff::new(Duration::MAX / 2, Duration::MAX);
        for _ in 0..4 {
            assert!(backoff.failed() <= Duration::MAX);
        }
        backoff.attempts = u32::MAX;
        backoff.failed();
        assert_eq!(backoff.attempts(), u32::MAX);
    }
}
