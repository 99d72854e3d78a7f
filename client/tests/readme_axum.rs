//! The axum app of the README's "Integrating an application", copied into a fresh
//! crate as a user would, builds and loses no request over 20 reloads under `ab`,
//! `ab -k` and `wrk`.
//!
//! Two things differ from a user's copy, both outside the copied text: the
//! `ally-client` dependency points at this tree instead of crates.io, and the port
//! (8080 in the README) is a free one, so the test runs beside anything on 8080.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ally_testkit::loadgen::{Tool, assert_reloads_lose_nothing};
use ally_testkit::{free_port, target_dir};

const SECTION: &str = "## Integrating an application";

/// The first fenced block of `kind` (`toml`, `rust`) in the README's integration
/// section.
fn readme_block(kind: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split_once(SECTION)
        .unwrap_or_else(|| panic!("README has no {SECTION:?}"))
        .1;
    let section = section.split("\n## ").next().unwrap();
    let mut lines = section.lines();
    lines
        .by_ref()
        .find(|l| l.starts_with("```") && l[3..].split(',').next() == Some(kind))
        .unwrap_or_else(|| panic!("no ```{kind} block in {SECTION:?}"));
    let block: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    block.join("\n") + "\n"
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Builds the README's app once; returns its binary and the port it serves.
fn readme_app() -> &'static (PathBuf, u16) {
    static APP: OnceLock<(PathBuf, u16)> = OnceLock::new();
    APP.get_or_init(|| {
        let dependencies = readme_block("toml");
        let published = "ally-client = { version = \"0.1\",";
        assert!(
            dependencies.contains(published),
            "the README's dependencies no longer say {published:?}:\n{dependencies}"
        );
        let local = format!(
            "ally-client = {{ path = {:?},",
            repo().join("client").display().to_string()
        );
        let main = readme_block("rust");
        assert!(main.contains("127.0.0.1:8080"), "{main}");
        let port = free_port();
        let main = main.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));

        let dir = tempfile::tempdir().unwrap();
        let krate = dir.path().join("myapp");
        std::fs::create_dir_all(krate.join("src")).unwrap();
        std::fs::write(
            krate.join("Cargo.toml"),
            format!(
                "[package]\nname = \"myapp\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n{}\n[workspace]\n",
                dependencies.replace(published, &local)
            ),
        )
        .unwrap();
        std::fs::write(krate.join("src/main.rs"), main).unwrap();
        // The versions this tree was built and tested with; the rest of axum's
        // default features come from the registry, as for a user.
        std::fs::copy(repo().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
        let target = target_dir().join("readme-app");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet"])
            .current_dir(&krate)
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .unwrap();
        assert!(status.success(), "the README's axum app does not build");
        let binary = target.join("debug/myapp");
        // The crate directory goes; the binary stays in the target directory.
        drop(dir);
        (binary, port)
    })
}

fn reloads_lose_nothing(tool: Tool) {
    let (binary, port) = readme_app();
    let command = [binary.display().to_string()];
    assert_reloads_lose_nothing("the README's axum app", &command, *port, tool, 20);
}

#[test]
fn readme_axum_new_connection_per_request() {
    reloads_lose_nothing(Tool::Ab);
}

#[test]
fn readme_axum_keep_alive_http10() {
    reloads_lose_nothing(Tool::AbKeepAlive);
}

#[test]
fn readme_axum_keep_alive_http11() {
    reloads_lose_nothing(Tool::Wrk);
}
