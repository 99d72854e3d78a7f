//! The broker's metrics in the OpenMetrics text format (`Metrics()`,
//! `ally metrics`, `metrics_address`), through `prometheus-client`.
//!
//! Counters and the reload-duration histogram are kept as things happen
//! (`record`, `state_call`: atomics, no lock); gauges are read from the broker
//! when the text is made (`render`). Pure of I/O.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::history::Kind;

type Labels = [(&'static str, &'static str); 1];

/// The content type of the text `render` makes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reload durations, in seconds: a reload waits for an instance to be ready.
const RELOAD_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The state interfaces whose calls are counted, on both transports.
pub const STATE_INTERFACES: [&str; 3] = ["org.ally.Cache1", "org.ally.Atomic1", "org.ally.Locker1"];

/// What the broker is now, read when the text is made.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Instances by state name (`starting`, `ready`, `draining`).
    pub instances: Vec<(&'static str, i64)>,
    pub listeners: i64,
    /// Tasks the draining instances last reported (`Report`'s `tasks`).
    pub draining_tasks: Option<i64>,
    /// Lines of instances' output dropped so far (journald too slow, queue full).
    pub log_lines_dropped: Option<u64>,
}

pub struct Metrics {
    /// Held while gauges are set and the text is encoded, so two renders do
    /// not mix their gauges.
    registry: Mutex<Registry>,
    reloads: Family<Labels, Counter>,
    restarts: Family<Labels, Counter>,
    reload_seconds: Histogram,
    state_calls: [Counter; 3],
    instances: Family<Labels, Gauge>,
    listeners: Gauge,
    draining_tasks: Gauge,
    log_lines_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ally");
        let reloads = Family::<Labels, Counter>::default();
        let restarts = Family::<Labels, Counter>::default();
        let reload_seconds = Histogram::new(RELOAD_BUCKETS);
        let calls = Family::<Labels, Counter>::default();
        let state_calls = STATE_INTERFACES.map(|i| calls.get_or_create_owned(&[("interface", i)]));
        let instances = Family::<Labels, Gauge>::default();
        let listeners = Gauge::default();
        let draining_tasks = Gauge::default();
        let log_lines_dropped = Counter::default();
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&[("result", result)]);
            let _ = restarts.get_or_create(&[("result", result)]);
        }
        registry.register(
            "reloads",
            "Reloads (a new generation started beside the serving one), by result",
            reloads.clone(),
        );
        registry.register(
            "reload_duration_seconds",
            "Time from a reload's request being taken to its generation being ready or failing",
            reload_seconds.clone(),
        );
        registry.register(
            "restarts",
            "Crash restarts (a generation started after the serving one exited), by result",
            restarts.clone(),
        );
        registry.register("instances", "Instances by state", instances.clone());
        registry.register(
            "draining_tasks",
            "Tasks the draining instances last reported (Report tasks)",
            draining_tasks.clone(),
        );
        registry.register(
            "listeners",
            "Listening sockets the broker holds",
            listeners.clone(),
        );
        registry.register(
            "state_calls",
            "Calls of the shared-state interfaces, on the private and the state socket",
            calls,
        );
        registry.register(
            "log_lines_dropped",
            "Lines of instances' output dropped because their destination was too slow",
            log_lines_dropped.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            reloads,
            restarts,
            reload_seconds,
            state_calls,
            instances,
            listeners,
            draining_tasks,
            log_lines_dropped,
        }
    }

    /// Counts one launch as `History` records it: a reload or a restart (a
    /// first start is neither).
    pub fn record(&self, kind: Kind, success: bool, duration: Duration) {
        let result = [("result", if success { "success" } else { "failure" })];
        match kind {
            Kind::Reload => {
                self.reloads.get_or_create(&result).inc();
                self.reload_seconds.observe(duration.as_secs_f64());
            }
            Kind::Restart => {
                self.restarts.get_or_create(&result).inc();
            }
            Kind::FirstStart => {}
        }
    }

    /// Counts a call of a state interface; others are not counted.
    pub fn state_call(&self, interface: &str) {
        if let Some(i) = STATE_INTERFACES.iter().position(|&s| s == interface) {
            self.state_calls[i].inc();
        }
    }

    /// The OpenMetrics text, ending with `# EOF`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        self.instances.clear();
        for (state, n) in &gauges.instances {
            self.instances.get_or_create(&[("state", state)]).set(*n);
        }
        self.listeners.set(gauges.listeners);
        self.draining_tasks.set(gauges.draining_tasks.unwrap_or(0));
        if let Some(dropped) = gauges.log_lines_dropped {
            let counted = self.log_lines_dropped.get();
            self.log_lines_dropped
                .inc_by(dropped.saturating_sub(counted));
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn counts_reloads_and_restarts_by_result() {
        let m = Metrics::new();
        m.record(Kind::FirstStart, true, Duration::from_millis(3));
        m.record(Kind::Reload, true, Duration::from_millis(30));
        m.record(Kind::Reload, true, Duration::from_millis(300));
        m.record(Kind::Reload, false, Duration::from_secs(2));
        m.record(Kind::Restart, true, Duration::from_millis(3));
        let text = m.render(&Gauges::default());
        assert_eq!(
            line(&text, "ally_reloads_total{result=\"success\"}"),
            Some("ally_reloads_total{result=\"success\"} 2")
        );
        assert_eq!(
            line(&text, "ally_reloads_total{result=\"failure\"}"),
            Some("ally_reloads_total{result=\"failure\"} 1")
        );
        assert_eq!(
            line(&text, "ally_restarts_total{result=\"success\"}"),
            Some("ally_restarts_total{result=\"success\"} 1")
        );
        assert_eq!(
            line(&text, "ally_reload_duration_seconds_count"),
            Some("ally_reload_duration_seconds_count 3")
        );
        assert_eq!(
            line(&text, "ally_reload_duration_seconds_bucket{le=\"0.05\"}"),
            Some("ally_reload_duration_seconds_bucket{le=\"0.05\"} 1")
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn gauges_are_what_the_broker_says_now() {
        let m = Metrics::new();
        let gauges = Gauges {
            instances: vec![("ready", 1), ("draining", 2)],
            listeners: 3,
            draining_tasks: Some(7),
            log_lines_dropped: Some(40),
        };
        m.render(&gauges);
        let text = m.render(&Gauges {
            instances: vec![("ready", 1)],
            log_lines_dropped: Some(42),
            ..gauges
        });
        assert!(
            text.contains("ally_instances{state=\"ready\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("state=\"draining\""), "{text}");
        assert!(text.contains("ally_listeners 3\n"), "{text}");
        assert!(text.contains("ally_draining_tasks 7\n"), "{text}");
        assert!(text.contains("ally_log_lines_dropped_total 42\n"), "{text}");
    }

    #[test]
    fn counts_state_calls_by_interface() {
        let m = Metrics::new();
        m.state_call("org.ally.Cache1");
        m.state_call("org.ally.Cache1");
        m.state_call("org.ally.Locker1");
        m.state_call("org.ally.Broker1");
        let text = m.render(&Gauges::default());
        assert!(
            text.contains("ally_state_calls_total{interface=\"org.ally.Cache1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("ally_state_calls_total{interface=\"org.ally.Atomic1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("ally_state_calls_total{interface=\"org.ally.Locker1\"} 1\n"),
            "{text}"
        );
    }
}
