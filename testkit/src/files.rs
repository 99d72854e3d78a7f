//! Files a test or a benchmark's helper process writes and the other side reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::poll::wait_until;

/// An executable `#!/bin/sh` script `name` in `dir`.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Writes `text` to `path` in one step, so a reader polling for the file never
/// sees it half written.
pub fn publish(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing a result file");
    std::fs::rename(&tmp, path).expect("publishing a result file");
}

/// The complete JSON lines of a fixture's report; a line still being written
/// is left for the next read.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad report line {l:?}: {e}")))
        .collect()
}

/// Waits until a fixture reported `op` at least `count` times; returns the report.
pub fn wait_for_report(path: &Path, op: &str, count: usize) -> Vec<serde_json::Value> {
    wait_until(
        &format!("{count} {op} reports"),
        Duration::from_secs(10),
        || json_lines(path).iter().filter(|r| r["op"] == op).count() >= count,
    );
    json_lines(path)
}
