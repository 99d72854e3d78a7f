//! Polling with a deadline: what a test does instead of sleeping and hoping.

use std::time::{Duration, Instant};

/// How often [`wait_until`] and [`wait_for`] look.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// Calls `check` every `every` until it gives a value; `None` once `timeout`
/// has passed without one.
pub fn poll<T>(
    every: Duration,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Waits until `check` holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    wait_for(what, timeout, || check().then_some(()))
}

/// Waits until `check` gives a value and returns it; panics naming `what` after
/// `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(INTERVAL, timeout, check)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_and_gives_up_at_the_deadline() {
        let mut calls = 0;
        let got = poll(Duration::ZERO, Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, Some(3));
        let started = Instant::now();
        let none: Option<()> = poll(Duration::from_millis(1), Duration::from_millis(30), || None);
        assert_eq!(none, None);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn wait_until_names_what_it_waited_for() {
        wait_until("the impossible", Duration::from_millis(30), || false);
    }
}
