//! When to poll a socket for a reply or the next call before going to sleep on it.
//!
//! A thread that sleeps in `epoll_wait` or `read` and is woken by the other end costs
//! a context switch, and on a VM whose vCPU halted, a wake-up of that vCPU: together
//! more than a state call itself. A caller that calls again at once is served far
//! sooner by a thread that polls for a few microseconds instead. Polling is only worth
//! it while waits are short, so it follows the last wait: a steady caller keeps both
//! ends polling. "Short" is within [`SHORT_WAITS`] budgets, not one: a wait that was
//! slept through includes the wake-ups that polling saves, which on a busy VM take
//! tens of microseconds at each end. After a long wait it polls only one wait in [`PROBE_EVERY`], to find
//! out whether waits are short again (a sleeping end makes the other's waits long, so
//! without probes both could stay asleep for good). An occasional caller so costs at
//! most one budget when a burst ends and one in every [`PROBE_EVERY`] waits after.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// The environment variable that turns the blocking client's polling on, with its
/// budget as the config writes durations (`50us`, at most `1ms`). Unset, `0s` or not a
/// duration: off, as the broker's `state_busy_poll` is by default.
pub const CLIENT_BUDGET_ENV: &str = "ALLY_STATE_BUSY_POLL";

/// Polling longer than this burns a CPU for no gain: a sleeping thread wakes within
/// tens of microseconds.
pub const MAX_BUDGET: Duration = Duration::from_millis(1);

/// A budget as [`CLIENT_BUDGET_ENV`] gives it: `<integer><ns|us|ms|s>`, capped at
/// [`MAX_BUDGET`]; `None` if it is not one.
pub fn parse_budget(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = text[..split].parse().ok()?;
    let budget = match &text[split..] {
        "ns" => Duration::from_nanos(n),
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return None,
    };
    Some(budget.min(MAX_BUDGET))
}

/// A wait shorter than this many budgets is short.
pub const SHORT_WAITS: u32 = 4;

/// After a long wait, one wait in this many is polled anyway.
pub const PROBE_EVERY: u32 = 8;

/// How long to poll before sleeping, learnt from the waits seen so far.
#[derive(Debug)]
pub struct BusyPoll {
    budget: Duration,
    last_wait_short: AtomicBool,
    waits_since_long: AtomicU32,
}

impl BusyPoll {
    /// Polls for up to `budget` (zero: never) while the last wait was within it.
    pub fn new(budget: Duration) -> BusyPoll {
        BusyPoll {
            budget,
            last_wait_short: AtomicBool::new(true),
            waits_since_long: AtomicU32::new(0),
        }
    }

    /// How long to poll before sleeping, this time.
    pub fn budget(&self) -> Duration {
        if self.last_wait_short.load(Ordering::Relaxed) {
            return self.budget;
        }
        let waits = self.waits_since_long.fetch_add(1, Ordering::Relaxed);
        if waits % PROBE_EVERY == PROBE_EVERY - 1 {
            self.budget
        } else {
            Duration::ZERO
        }
    }

    /// Records how long the last wait was, polled or slept.
    pub fn waited(&self, wait: Duration) {
        let short = wait < self.budget * SHORT_WAITS;
        if !short && self.last_wait_short.load(Ordering::Relaxed) {
            self.waits_since_long.store(0, Ordering::Relaxed);
        }
        self.last_wait_short.store(short, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn polls_while_waits_are_short_and_sleeps_after_a_long_one() {
        let poll = BusyPoll::new(50 * US);
        assert_eq!(poll.budget(), 50 * US, "a new connection polls first");
        poll.waited(3 * US);
        assert_eq!(poll.budget(), 50 * US);
        poll.waited(199 * US);
        assert_eq!(poll.budget(), 50 * US, "within four budgets");
        poll.waited(200 * US);
        assert_eq!(
            poll.budget(),
            Duration::ZERO,
            "a wait of four budgets or more"
        );
        poll.waited(2 * Duration::from_millis(1));
        assert_eq!(poll.budget(), Duration::ZERO);
        poll.waited(120 * US);
        assert_eq!(
            poll.budget(),
            50 * US,
            "a short wait, even slept, turns it on"
        );
    }

    #[test]
    fn after_a_long_wait_one_wait_in_eight_is_polled() {
        let poll = BusyPoll::new(50 * US);
        for round in 0..3 {
            poll.waited(Duration::from_millis(1));
            let budgets: Vec<Duration> = (0..2 * PROBE_EVERY)
                .map(|_| {
                    let budget = poll.budget();
                    poll.waited(Duration::from_millis(1));
                    budget
                })
                .collect();
            let polled = budgets.iter().filter(|b| !b.is_zero()).count();
            assert_eq!(polled, 2, "round {round}: {budgets:?}");
            assert_eq!(budgets[PROBE_EVERY as usize - 1], 50 * US);
            poll.waited(US);
            assert_eq!(poll.budget(), 50 * US, "a probe that finds a short wait");
        }
    }

    #[test]
    fn a_budget_is_read_as_the_config_writes_it() {
        assert_eq!(parse_budget("50us"), Some(50 * US));
        assert_eq!(parse_budget("0s"), Some(Duration::ZERO));
        assert_eq!(parse_budget("5ms"), Some(MAX_BUDGET), "capped");
        for bad in ["", "50", "us", "fast", "-1us", "1.5us"] {
            assert_eq!(parse_budget(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_zero_budget_never_polls() {
        let poll = BusyPoll::new(Duration::ZERO);
        assert_eq!(poll.budget(), Duration::ZERO);
        poll.waited(Duration::ZERO);
        assert_eq!(poll.budget(), Duration::ZERO);
    }
}
