//! The `reexec` benchmark's harness, run small so that it cannot rot: two
//! cache sizes (empty, 2 MiB), two re-execs each way. The figures are the
//! benchmark's; that every re-exec happened (the harness asserts the count),
//! was timed both ways, and that the load was counted is asserted here.

use std::time::Duration;

use ally_bench::reexec::{self, Settings};

#[test]
fn every_cache_size_times_its_reexecs_under_load() {
    let settings = Settings {
        runs: 2,
        cache_mib: vec![0, 2],
        connections: 2,
        gap: Duration::from_millis(20),
        poll: Duration::from_millis(1),
        ally: ally_testkit::build_ally(),
        hello: ally_testkit::example("hello"),
    };
    let cases = reexec::run(&settings);
    assert_eq!(cases.len(), 2);
    for (case, mib) in cases.iter().zip([0, 2]) {
        assert_eq!(case.cache_bytes, mib << 20, "{case:?}");
        for times in [&case.closed_ms, &case.serving_ms, &case.command_ms] {
            assert_eq!(times.len(), 2, "{case:?}");
            assert!(times.iter().all(|&t| t > 0.0), "{case:?}");
        }
        for (closed, serving) in case.closed_ms.iter().zip(&case.serving_ms) {
            assert!(closed <= serving, "{case:?}");
        }
        assert!(case.requests > 0, "no answers counted: {case:?}");
    }
    let table = reexec::table(&cases);
    assert_eq!(table.lines().count(), 3, "{table}");
}
