//! The `unmodified` benchmark's harness, run small so that it cannot rot: every
//! case (gunicorn and puma under `ally reload`, their own reloads, a socket-holding
//! parent's stop/start), one reload each, ours with a new connection per
//! request. Failures are not asserted here, the figures are the benchmark's;
//! that every case ran, counted answers and timed its reload is. A server that
//! is not installed is skipped with a line saying so.

use std::time::Duration;

use ally_bench::load::Mode;
use ally_bench::unmodified::{self, CASES, Settings};

#[test]
fn every_case_counts_answers_and_times_its_reload() {
    let settings = Settings {
        reloads: 1,
        connections: 2,
        gap: Duration::from_millis(100),
        steady: Duration::from_millis(300),
        ally: ally_testkit::build_ally(),
    };
    for case in CASES {
        if let Some(why) = case.server.missing() {
            eprintln!("skipping {}: {why}", case.server.label());
            continue;
        }
        let rows = unmodified::run(case, &[Mode::NewConnection], &settings);
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.mechanism, case.mechanism.label());
        assert!(row.requests > 0, "no answers counted: {row:?}");
        assert_eq!(row.new_answers_ms.len(), 1, "{row:?}");
        assert_eq!(row.old_gone_ms.len(), 1, "{row:?}");
        assert!(row.new_answers_ms[0] > 0.0, "{row:?}");
        let table = unmodified::table(&rows);
        assert_eq!(table.lines().count(), 3, "{table}");
    }
}
