//! The `frameworks` benchmark's harness, run small so that it cannot rot: one
//! app (the README-pattern axum app, built with this crate's tests), every load,
//! two reloads each. Failures are not asserted here, the figures are the
//! benchmark's; that every load ran, counted answers and saw every reload is.

use std::path::Path;
use std::time::Duration;

use ally_bench::frameworks::{self, FRAMEWORKS, Generator, Settings};

#[test]
fn every_load_counts_answers_across_the_reloads() {
    let framework = FRAMEWORKS
        .iter()
        .find(|f| f.binary.name() == "naive_axum")
        .expect("the README pattern is among the frameworks");
    let settings = Settings {
        reloads: 2,
        connections: 2,
        gap: Duration::from_millis(100),
        ally: ally_testkit::build_ally(),
    };
    let exe = Path::new(env!("CARGO_BIN_EXE_naive_axum"));
    let rows = frameworks::run(framework, exe, &Generator::ALL, &settings);
    assert_eq!(rows.len(), Generator::ALL.len());
    for (row, generator) in rows.iter().zip(Generator::ALL) {
        assert_eq!(row.generator, generator.to_string());
        assert_eq!(row.framework, framework.label);
        assert_eq!(row.reloads, 2, "{row:?}");
        assert!(row.requests > 0, "no answers counted: {row:?}");
        assert_eq!(
            row.retried.is_some(),
            matches!(generator, Generator::Ours(_)),
            "{row:?}"
        );
        assert!(row.per_second() > 0.0, "{row:?}");
    }
    let table = frameworks::table(&rows);
    assert_eq!(table.lines().count(), 2 + rows.len(), "{table}");
}
