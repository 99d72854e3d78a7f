//! What this instance tells the broker about itself ([`Ally::report`]), and the
//! task counter that keeps `tasks` up to date for a drain ([`Ally::task`]).
//!
//! Task counts change with every request, so they are not sent one by one: a
//! background task sends the latest count, one call at a time and at most one
//! per [`MIN_INTERVAL`], so a busy server never floods the broker and the
//! broker always ends up with the last value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use tokio::sync::watch;
use zbus::Variant;

use crate::Ally;
use crate::link::{Link, Session};
use crate::reconnect::Method;

/// What an instance reports: `version`, `commit`, `tasks`, `description`; a
/// key left `None` keeps what was reported before. Build with
/// `Report::new().version("1.4.2").commit(env!("GIT_COMMIT"))`.
pub use ally_core::report::AppReport as Report;

/// The least time between two task counts sent to the broker.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// This instance's report, and its task counter.
#[derive(Debug)]
pub(crate) struct Reporter {
    reported: Mutex<Report>,
    tasks: watch::Sender<u32>,
    sender: Once,
    runtime: Option<tokio::runtime::Handle>,
}

impl Reporter {
    pub(crate) fn new() -> Reporter {
        Reporter {
            reported: Mutex::new(Report::default()),
            tasks: watch::channel(0).0,
            sender: Once::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    pub(crate) fn reported(&self) -> Report {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps `report`'s keys, and the task count it names, without sending.
    pub(crate) fn record(&self, report: &Report) {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .merge(report.clone());
        if let Some(n) = report.tasks {
            self.tasks.send_if_modified(|t| {
                *t = n;
                false
            });
        }
    }

    pub(crate) fn tasks(&self) -> u32 {
        *self.tasks.borrow()
    }

    /// Changes the task count; the background sender reports it.
    pub(crate) fn change_tasks(&self, broker: Option<&Arc<Link>>, f: impl FnOnce(&mut u32)) {
        let mut changed = false;
        self.tasks.send_if_modified(|n| {
            let before = *n;
            f(n);
            changed = *n != before;
            changed
        });
        if changed {
            let n = self.tasks();
            self.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .tasks = Some(n);
            if let (Some(broker), Some(runtime)) = (broker, &self.runtime) {
                self.sender.call_once(|| {
                    runtime.spawn(send_tasks(broker.clone(), self.tasks.subscribe()));
                });
            }
        }
    }
}

/// Sends the latest task count whenever it changed, one call at a time, until
/// the client is dropped.
async fn send_tasks(broker: Arc<Link>, mut tasks: watch::Receiver<u32>) {
    let mut sent = None;
    loop {
        let n = *tasks.borrow_and_update();
        if sent != Some(n) {
            // A refused call (the instance is exiting) has nothing to retry.
            let _ = broker
                .call(Method::broker("Report"), |s: Arc<Session>| async move {
                    s.broker
                        .report(HashMap::from([("tasks", Variant::from(n))]))
                        .await
                })
                .await;
            sent = Some(n);
            tokio::time::sleep(MIN_INTERVAL).await;
            continue;
        }
        if tasks.changed().await.is_err() {
            return;
        }
    }
}

/// One task in progress: counted from [`Ally::task`] until dropped.
#[derive(Debug)]
#[must_use = "the task is counted until the guard is dropped"]
pub struct Task {
    ally: Ally,
}

impl Task {
    pub(crate) fn start(ally: &Ally) -> Task {
        ally.reporter()
            .change_tasks(ally.link(), |n| *n = n.saturating_add(1));
        Task { ally: ally.clone() }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let ally = &self.ally;
        ally.reporter()
            .change_tasks(ally.link(), |n| *n = n.saturating_sub(1));
    }
}

/// The `a{sv}` of `Report`.
pub(crate) fn dict(report: &Report) -> HashMap<&'static str, Variant<'_>> {
    let mut dict = HashMap::new();
    if let Some(v) = &report.version {
        dict.insert("version", Variant::from(v.as_str()));
    }
    if let Some(v) = &report.commit {
        dict.insert("commit", Variant::from(v.as_str()));
    }
    if let Some(n) = report.tasks {
        dict.insert("tasks", Variant::from(n));
    }
    if let Some(v) = &report.description {
        dict.insert("description", Variant::from(v.as_str()));
    }
    dict
}
