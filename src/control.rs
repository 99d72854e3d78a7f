//! The admin commands (`reload`, `status`, `list`): find a broker and talk to it.
//!
//! A broker is reached on its private socket when this user can connect to it
//! (it needs no bus daemon and is how root and the broker's user act), else on
//! the system bus, else on the session bus, under `org.ally.<app>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ally_core::proxy::{self, BrokerProxy, Status};
use ally_core::report::AppReport;
use zbus::Connection;

use crate::cli::{ConnectArgs, ListArgs, ReloadArgs, StatusArgs};
use crate::runtime_dir;

/// A connection to one broker.
pub struct Target {
    proxy: BrokerProxy<'static>,
    /// How it was reached, for messages.
    pub via: String,
}

impl Target {
    pub async fn connect(app: &str, args: &ConnectArgs) -> Result<Target, String> {
        let dir = runtime_dir::resolve(app, args.runtime_dir.as_deref(), false);
        let socket = runtime_dir::socket_path(&dir);
        let mut tried = vec![];
        if socket.exists() {
            let address = runtime_dir::dbus_address(&socket);
            match proxy::connect(&address, Some(app)).await {
                Ok(proxy) => {
                    return Ok(Target {
                        proxy,
                        via: socket.display().to_string(),
                    });
                }
                Err(e) => match refusal(&e) {
                    Some(why) => {
                        return Err(format!(
                            "the broker for {app} at {} refused the connection: {why}",
                            socket.display()
                        ));
                    }
                    None => tried.push(format!(
                        "{}: cannot connect to the broker at {address}: {e}",
                        socket.display()
                    )),
                },
            }
        } else {
            tried.push(format!("no socket at {}", socket.display()));
        }
        let name = proxy::bus_name(app);
        for (which, conn) in [
            ("system", Connection::system().await),
            ("session", Connection::session().await),
        ] {
            let Ok(conn) = conn else { continue };
            if name_has_owner(&conn, &name).await {
                let proxy = proxy::proxy_on(&conn, Some(app))
                    .await
                    .map_err(|e| format!("cannot create the broker proxy: {e}"))?;
                return Ok(Target {
                    proxy,
                    via: format!("{which} bus"),
                });
            }
            tried.push(format!("{name} is not on the {which} bus"));
        }
        Err(format!("no broker for {app} found ({})", tried.join("; ")))
    }

    pub fn proxy(&self) -> &BrokerProxy<'static> {
        &self.proxy
    }

    pub fn connection(&self) -> &Connection {
        self.proxy.inner().connection()
    }

    pub async fn reload(&self) -> Result<u64, String> {
        self.proxy.reload().await.map_err(describe_error)
    }

    pub async fn status(&self) -> Result<Status, String> {
        let dict = self.proxy.status().await.map_err(describe_error)?;
        Status::from_dict(dict).map_err(|e| e.to_string())
    }
}

/// Why a broker that answered turned the connection away, as it said; or, when it
/// could not even take it, a likely reason.
fn refusal(e: &zbus::Error) -> Option<String> {
    match e {
        zbus::Error::Handshake(message) => Some(
            message
                .strip_prefix("Received error from server: ")
                .map(|m| m.strip_prefix("ERROR ").unwrap_or(m))
                .unwrap_or(message)
                .to_string(),
        ),
        zbus::Error::InputOutput(io) if io.kind() == std::io::ErrorKind::WouldBlock => Some(
            format!("it takes no more connections now (at its connection limit?): {io}"),
        ),
        _ => None,
    }
}

async fn name_has_owner(conn: &Connection, name: &str) -> bool {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(name) else {
        return false;
    };
    dbus.name_has_owner(name).await.unwrap_or(false)
}

/// `org.ally.Error.ReloadFailed: msg` reads as just the message.
pub fn describe_error(e: zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(message), _) => {
            if name.starts_with("org.ally.Error.") {
                message
            } else {
                format!("{name}: {message}")
            }
        }
        other => other.to_string(),
    }
}

pub async fn reload(args: ReloadArgs) -> Result<i32, String> {
    crate::reload_command::reload(args).await
}

/// The one line `ally reload` prints when it is done, as it always has.
pub fn reload_result(app: &str, result: &Result<u64, String>) -> Result<String, String> {
    match result {
        Ok(generation) => Ok(format!("{app}: reloaded to generation {generation}")),
        Err(reason) => Err(format!("reload of {app} failed: {}", printable(reason))),
    }
}

/// The status as a person reads it.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "{} — {}, generation {}",
        status.app, status.state, status.generation
    ));
    line(format!("    broker pid: {}", status.pid));
    line(format!("       reloads: {}", status.reloads));
    if !status.last_reload.is_empty() {
        line(format!(
            "   last reload: {}",
            printable(&status.last_reload)
        ));
    }
    let now = SystemTime::now();
    if status.config_revision > 0 {
        let file = if status.config_file.is_empty() {
            "none (built-in defaults)"
        } else {
            &status.config_file
        };
        line(format!(
            "        config: {file}, revision {}",
            revision(status.config_revision, &status.config_digest)
        ));
    }
    if !status.watch.is_empty() {
        line(format!("         watch: {}", status.watch.join(", ")));
    }
    if !status.watch_last.is_empty() {
        line(format!("    last watch: {}", printable(&status.watch_last)));
    }
    if status.log_lines_dropped > 0 {
        line(format!(
            "  output lines: {} dropped (journald too slow or stopped)",
            status.log_lines_dropped
        ));
    }
    if status.restart_attempt > 0 {
        line(format!(
            "       restart: attempt {}, {}",
            status.restart_attempt,
            until(now, status.restart_usec)
        ));
    }
    line(String::new());
    let mut rows = vec![[
        "INSTANCE".to_string(),
        "GEN".into(),
        "PID".into(),
        "STATE".into(),
        "UPTIME".into(),
        "READY FOR".into(),
        "CONFIG".into(),
        "VERSION".into(),
        "TASKS".into(),
        "STATUS".into(),
    ]];
    for i in &status.instances {
        let config = status
            .instance_configs
            .iter()
            .find(|c| c.id == i.id)
            .map_or_else(|| "-".into(), |c| revision(c.revision, &c.digest));
        let app = status
            .instance_app_reports
            .iter()
            .find(|r| r.id == i.id)
            .map(|r| &r.report);
        let said = [reported(status, i.id), app_description(app)]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        rows.push([
            i.id.to_string(),
            i.generation.to_string(),
            i.pid.to_string(),
            instance_state(&i.state, app),
            since(now, i.started_usec),
            since(now, i.ready_usec),
            config,
            app_version(app),
            app.and_then(|r| r.tasks)
                .map_or_else(|| "-".into(), |n| n.to_string()),
            said,
        ]);
    }
    for row in table(&rows) {
        line(row);
    }
    line(String::new());
    let mut rows = vec![["NETWORK".to_string(), "ADDRESS".into(), "REFS".into()]];
    for l in &status.listeners {
        rows.push([
            l.network.clone(),
            l.address.clone(),
            l.references.to_string(),
        ]);
    }
    for row in table(&rows) {
        line(row);
    }
    out
}

/// What instance `id` said on its notification socket, in a few words.
fn reported(status: &Status, id: u64) -> String {
    let Some(r) = status.instance_reports.iter().find(|r| r.id == id) else {
        return String::new();
    };
    let mut parts = Vec::new();
    if !r.status.is_empty() {
        parts.push(r.status.chars().take(60).collect::<String>());
    }
    if r.stopping {
        parts.push("(stopping)".into());
    }
    if r.errno >= 0 {
        parts.push(format!("(errno {})", r.errno));
    }
    if r.main_pid != 0 {
        parts.push(format!("(main pid {})", r.main_pid));
    }
    parts.join(" ")
}

/// "draining (3 tasks left)": a draining instance's state with the tasks it
/// reported it still has.
fn instance_state(state: &str, report: Option<&AppReport>) -> String {
    match report.and_then(|r| r.tasks) {
        Some(1) if state == "draining" => "draining (1 task left)".into(),
        Some(n) if state == "draining" => format!("draining ({n} tasks left)"),
        _ => state.to_string(),
    }
}

/// "1.4.2 (3f1c0a9be2d4)": the version an instance reported, and the start of its commit.
fn app_version(report: Option<&AppReport>) -> String {
    let Some(r) = report else {
        return "-".into();
    };
    let version = r.version.as_deref().filter(|v| !v.is_empty());
    let commit = r
        .commit
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| c.chars().take(12).collect::<String>());
    match (version, commit) {
        (Some(v), Some(c)) => format!("{} ({c})", clip(v, 24)),
        (Some(v), None) => clip(v, 24),
        (None, Some(c)) => c,
        (None, None) => "-".into(),
    }
}

fn app_description(report: Option<&AppReport>) -> String {
    report
        .and_then(|r| r.description.as_deref())
        .map(|d| clip(d, 60))
        .unwrap_or_default()
}

/// A message of the broker's as a terminal may show it: what it quotes of an app
/// or a check (their output, their `STATUS=`) may hold control characters (a
/// terminal's escapes), shown as "�".
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// At most `max` characters of the first line of what an instance reported,
/// "…" marking a cut; control characters (a terminal's escapes) shown as "�".
fn clip(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    let shown = |c: char| if c.is_control() { '\u{fffd}' } else { c };
    if line.chars().count() <= max && line.len() == text.len() {
        return line.chars().map(shown).collect();
    }
    let mut clipped: String = line
        .chars()
        .take(max.saturating_sub(1))
        .map(shown)
        .collect();
    clipped.push('…');
    clipped
}

/// "2 (3f1c0a9be2d4)": a config revision and the start of its digest.
fn revision(number: u64, digest: &str) -> String {
    if digest.is_empty() {
        number.to_string()
    } else {
        let short: String = digest.chars().take(12).collect();
        format!("{number} ({short})")
    }
}

fn since(now: SystemTime, usec: u64) -> String {
    if usec == 0 {
        return "-".into();
    }
    let then = UNIX_EPOCH + Duration::from_micros(usec);
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// "in 4s" until a pending restart runs.
pub(crate) fn until(now: SystemTime, usec: u64) -> String {
    let then = UNIX_EPOCH + Duration::from_micros(usec);
    match then.duration_since(now) {
        Ok(left) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(left.as_secs().max(1)))
        ),
        Err(_) => "now".into(),
    }
}

pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> Vec<String> {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect()
}

pub async fn status(args: StatusArgs) -> Result<i32, String> {
    let apps = match &args.app {
        Some(app) => vec![app.clone()],
        None => discover().await.into_keys().collect(),
    };
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for app in &apps {
        match Target::connect(app, &args.connect).await {
            Ok(target) => match target.status().await {
                Ok(report) => reports.push(report),
                Err(e) => failures.push(format!("{app}: {e}")),
            },
            Err(e) => failures.push(e),
        }
    }
    if args.json {
        let json = if args.app.is_some() {
            serde_json::to_string_pretty(reports.first().ok_or_else(|| failures.join("; "))?)
        } else {
            serde_json::to_string_pretty(&reports)
        };
        println!("{}", json.map_err(|e| e.to_string())?);
    } else {
        let rendered: Vec<String> = reports.iter().map(render).collect();
        print!("{}", rendered.join("\n"));
        if apps.is_empty() {
            println!("no brokers found");
        }
    }
    if failures.is_empty() {
        Ok(0)
    } else {
        Err(failures.join("; "))
    }
}

/// Every broker that can be reached: private sockets under this user's runtime
/// base, and `org.ally.*` names on the system and session buses.
pub async fn discover() -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let base = runtime_dir::base_dir();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let socket: PathBuf = runtime_dir::socket_path(&entry.path());
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                found.insert(
                    entry.file_name().to_string_lossy().to_string(),
                    socket.display().to_string(),
                );
            }
        }
    }
    for (which, conn) in [
        ("system bus", Connection::system().await),
        ("session bus", Connection::session().await),
    ] {
        let Ok(conn) = conn else { continue };
        let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await else {
            continue;
        };
        for name in dbus.list_names().await.unwrap_or_default() {
            if let Some(app) = name.as_str().strip_prefix("org.ally.") {
                found
                    .entry(app.to_string())
                    .or_insert_with(|| which.to_string());
            }
        }
    }
    found
}

pub async fn list(args: ListArgs) -> Result<i32, String> {
    let found = discover().await;
    if args.json {
        let entries: Vec<_> = found
            .iter()
            .map(|(app, via)| serde_json::json!({ "app": app, "via": via }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).map_err(|e| e.to_string())?
        );
    } else {
        for (app, via) in &found {
            println!("{app}\t{via}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_quoted_escape_never_reaches_the_terminal() {
        let reason = "the check refused the reload: \u{1b}]0;owned\u{7}\u{1b}[2J done".to_string();
        let shown = reload_result("web", &Err(reason)).unwrap_err();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.ends_with("\u{fffd}[2J done"), "{shown:?}");
        assert_eq!(printable("plain text"), "plain text");
    }

    use super::*;

    fn report(version: Option<&str>, commit: Option<&str>, tasks: Option<u32>) -> AppReport {
        AppReport {
            version: version.map(Into::into),
            commit: commit.map(Into::into),
            tasks,
            description: None,
        }
    }

    #[test]
    fn a_draining_instance_shows_its_tasks_left() {
        let three = report(None, None, Some(3));
        assert_eq!(
            instance_state("draining", Some(&three)),
            "draining (3 tasks left)"
        );
        let one = report(None, None, Some(1));
        assert_eq!(
            instance_state("draining", Some(&one)),
            "draining (1 task left)"
        );
        assert_eq!(instance_state("ready", Some(&three)), "ready");
        assert_eq!(instance_state("draining", None), "draining");
        assert_eq!(
            instance_state("draining", Some(&report(Some("1"), None, None))),
            "draining"
        );
    }

    #[test]
    fn versions_show_the_start_of_the_commit() {
        let full = report(Some("1.4.2"), Some("3f1c0a9be2d4c0ffee"), None);
        assert_eq!(app_version(Some(&full)), "1.4.2 (3f1c0a9be2d4)");
        assert_eq!(app_version(Some(&report(None, Some("abc"), None))), "abc");
        assert_eq!(app_version(Some(&report(Some(""), None, Some(2)))), "-");
        assert_eq!(app_version(None), "-");
        let long = "v".repeat(100);
        assert_eq!(
            app_version(Some(&report(Some(&long), None, None)))
                .chars()
                .count(),
            24
        );
    }

    #[test]
    fn reported_text_cannot_drive_the_terminal() {
        assert_eq!(clip("ok\x1b[2Jgone", 60), "ok\u{fffd}[2Jgone");
        assert_eq!(clip("two\nlines", 60), "two…");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abcd", 4), "abcd");
    }
}
