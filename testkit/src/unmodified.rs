//! Third-party servers that know nothing of Ally (gunicorn, puma, uvicorn, a Go
//! program on go-systemd, and a standard-library-only Python app), each serving
//! an app of `tests/fixtures/unmodified/` under `sockets = "listen-fds"`: the
//! config `ally run` gets for each, whether the server is installed, and the
//! Go program built offline from Debian's sources.
//!
//! Every app answers `GET /` with `hello <version> pid=<pid>`, the version read
//! when it starts from the file named by `APP_VERSION_FILE`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's Python, which has gunicorn's and uvicorn's modules (another
/// `python3` on the PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// A server and how it is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// gunicorn's default sync workers: one request per connection.
    Gunicorn,
    /// gunicorn's threaded workers, which keep connections alive.
    GunicornThreads,
    /// puma in cluster mode, READY=1 through Debian's `ruby-sd-notify`.
    Puma,
    /// uvicorn `--fd 3`, which sends no READY=1: `ready = "delay"`.
    Uvicorn,
    /// net/http with go-systemd's `activation.Listeners` and `daemon.SdNotify`,
    /// stopped the usual way: `SetKeepAlivesEnabled(false)`, a wait, `Shutdown`.
    Go,
    /// The same, stopped with `Connection: close` on every answer once stopping
    /// and `Shutdown` after a wait (`--close-on-stop`).
    GoCloseOnStop,
    /// Python's standard library only: `LISTEN_FDS` and `systemd-notify --ready`
    /// run as a child process.
    Stdlib,
}

/// Which build of the app an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Good,
    /// One that can never become ready: its module fails to load, its binary
    /// exits at once, or (the stdlib app) it serves but never says READY=1.
    Broken,
}

impl Server {
    pub const ALL: [Server; 7] = [
        Server::Gunicorn,
        Server::GunicornThreads,
        Server::Puma,
        Server::Uvicorn,
        Server::Go,
        Server::GoCloseOnStop,
        Server::Stdlib,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Server::Gunicorn => "gunicorn (sync workers)",
            Server::GunicornThreads => "gunicorn (gthread workers)",
            Server::Puma => "puma (cluster)",
            Server::Uvicorn => "uvicorn --fd 3",
            Server::Go => "Go net/http + go-systemd",
            Server::GoCloseOnStop => "Go net/http + go-systemd, Connection: close at stop",
            Server::Stdlib => "stdlib Python + systemd-notify",
        }
    }

    /// Why the server cannot run here, or `None` if it can.
    pub fn missing(self) -> Option<String> {
        let works = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let need = |ok: bool, what: &str| (!ok).then(|| what.to_string());
        match self {
            Server::Gunicorn | Server::GunicornThreads => need(
                works("gunicorn", &["--version"]),
                "`gunicorn` is not installed (apt install gunicorn)",
            ),
            Server::Puma => need(
                works("puma", &["--version"]),
                "`puma` is not installed (apt install puma)",
            )
            .or_else(|| {
                need(
                    works("ruby", &["-e", "require 'sd_notify'"]),
                    "puma's sd_notify gem is not installed (apt install ruby-sd-notify)",
                )
            }),
            Server::Uvicorn => need(
                works(PYTHON, &["-c", "import uvicorn"]),
                "uvicorn is not installed for /usr/bin/python3 (apt install python3-uvicorn)",
            ),
            Server::Go | Server::GoCloseOnStop => need(
                works("go", &["version"]),
                "`go` is not installed (apt install golang-go)",
            )
            .or_else(|| {
                need(
                    Path::new(GO_SYSTEMD).is_dir(),
                    "go-systemd's sources are not installed (apt install golang-github-coreos-go-systemd-dev)",
                )
            }),
            Server::Stdlib => need(
                works("systemd-notify", &["--help"]) && Path::new(PYTHON).exists(),
                "`systemd-notify` or /usr/bin/python3 is missing (apt install systemd python3)",
            ),
        }
    }

    /// The command line of `build`.
    pub fn command(self, build: Build) -> Vec<String> {
        let fx = fixtures();
        let at = |p: &str| fx.join(p).display().to_string();
        let broken = build == Build::Broken;
        match self {
            Server::Gunicorn | Server::GunicornThreads => {
                let mut c = vec!["gunicorn".into(), "--preload".into()];
                c.extend(["--workers".into(), "2".into()]);
                if self == Server::GunicornThreads {
                    c.extend(["--worker-class", "gthread", "--threads", "4"].map(String::from));
                }
                c.extend(["--chdir".into(), at("gunicorn")]);
                c.push(
                    if broken {
                        "broken_app:application"
                    } else {
                        "wsgi_app:application"
                    }
                    .into(),
                );
                c
            }
            Server::Puma => {
                let mut c: Vec<String> = [
                    "puma",
                    "--bind-to-activated-sockets",
                    "only",
                    "--workers",
                    "2",
                    "--threads",
                    "16:16",
                    "--preload",
                    "--environment",
                    "production",
                ]
                .map(String::from)
                .to_vec();
                c.extend(["--config".into(), at("puma/puma.rb")]);
                c.push(at(if broken {
                    "puma/broken.ru"
                } else {
                    "puma/config.ru"
                }));
                c
            }
            Server::Uvicorn => vec![
                PYTHON.into(),
                "-m".into(),
                "uvicorn".into(),
                "--fd".into(),
                "3".into(),
                "--no-access-log".into(),
                "--app-dir".into(),
                at("uvicorn"),
                if broken {
                    "broken_app:app"
                } else {
                    "asgi_app:app"
                }
                .into(),
            ],
            Server::Go | Server::GoCloseOnStop => {
                let mut c = vec![go_app().display().to_string()];
                if broken {
                    c.push("--crash".into());
                } else if self == Server::GoCloseOnStop {
                    c.push("--close-on-stop".into());
                }
                c
            }
            Server::Stdlib => vec![at("acceptance/app.py")],
        }
    }

    /// The `ready` lines of its config: `notify` where the server sends READY=1
    /// itself, `delay` where it cannot.
    pub fn ready(self) -> &'static str {
        match self {
            Server::Uvicorn => "ready = \"delay\"\nready_delay = \"2s\"\n",
            _ => "ready = \"notify\"\n",
        }
    }

    /// The whole config: the server on 127.0.0.1:`port`, its version read from
    /// `version_file`.
    pub fn config(self, port: u16, version_file: &Path, build: Build) -> String {
        let never_ready = if self == Server::Stdlib && build == Build::Broken {
            ", NEVER_READY = \"1\""
        } else {
            ""
        };
        let ready_timeout = if build == Build::Broken { "5s" } else { "20s" };
        format!(
            "command = {command:?}\nsockets = \"listen-fds\"\n{ready}ready_timeout = \"{ready_timeout}\"\nstop_timeout = \"20s\"\nenvironment = {{ APP_VERSION_FILE = {file:?}{never_ready} }}\n\n[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:{port}\"\nname = \"http\"\n",
            command = self.command(build),
            ready = self.ready(),
            file = version_file.display().to_string(),
        )
    }
}

/// `tests/fixtures/unmodified/` of this tree.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/unmodified")
}

const GO_SYSTEMD: &str = "/usr/share/gocode/src/github.com/coreos/go-systemd";

/// The Go program of `fixtures()/go`, built once per process with Debian's Go
/// and go-systemd sources, offline (GOPATH mode).
pub fn go_app() -> PathBuf {
    crate::go::build_program(
        &fixtures().join("go"),
        "unmodified_go",
        "apt install golang-go golang-github-coreos-go-systemd-dev",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_hands_the_socket_over_listen_fds() {
        let c = Server::Gunicorn.config(8123, Path::new("/v"), Build::Good);
        assert!(c.contains("sockets = \"listen-fds\"\n"), "{c}");
        assert!(c.contains("ready = \"notify\"\n"), "{c}");
        assert!(c.contains("address = \"127.0.0.1:8123\"\n"), "{c}");
        assert!(c.contains("wsgi_app:application"), "{c}");
        assert!(c.contains("APP_VERSION_FILE = \"/v\""), "{c}");
    }

    #[test]
    fn a_broken_build_is_another_module_or_never_ready() {
        let g = Server::Gunicorn.config(1, Path::new("/v"), Build::Broken);
        assert!(g.contains("broken_app:application"), "{g}");
        let s = Server::Stdlib.config(1, Path::new("/v"), Build::Broken);
        assert!(s.contains("NEVER_READY = \"1\""), "{s}");
        let u = Server::Uvicorn.config(1, Path::new("/v"), Build::Good);
        assert!(
            u.contains("ready = \"delay\"\nready_delay = \"2s\"\n"),
            "{u}"
        );
    }
}
