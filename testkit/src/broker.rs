//! A broker run as its own process, as users run it: `ally run` in a temporary
//! runtime directory, with `--bus none` unless told otherwise.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::poll::wait_until;
use crate::process::{ally_bin, terminate};
use crate::procfs;

/// How to start a [`Broker`]; [`Launch::start`] starts it.
#[derive(Debug, Clone)]
pub struct Launch {
    ally: PathBuf,
    app: String,
    config: Option<String>,
    args: Vec<String>,
    command: Vec<String>,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    log_level: String,
}

impl Launch {
    /// `ally run APP` with the `ally` of this tree, logging at debug level.
    pub fn new(app: &str) -> Launch {
        Launch {
            ally: PathBuf::new(),
            app: app.to_string(),
            config: None,
            args: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            log_level: "debug,zbus=warn".into(),
        }
    }

    /// Another `ally` binary than [`ally_bin`].
    pub fn ally(mut self, path: impl Into<PathBuf>) -> Launch {
        self.ally = path.into();
        self
    }

    /// `--config <a file holding text>`.
    pub fn config(mut self, text: &str) -> Launch {
        self.config = Some(text.to_string());
        self
    }

    /// Extra `ally run` arguments (before the `--` of [`Launch::command`]).
    pub fn args(mut self, args: &[&str]) -> Launch {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// `-- COMMAND...`: the app's command on the built-in defaults.
    pub fn command(mut self, command: &[&str]) -> Launch {
        self.command = command.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Launch {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Leaves `name` out of the broker's environment (and so its instances').
    pub fn env_remove(mut self, name: &str) -> Launch {
        self.env_remove.push(name.into());
        self
    }

    /// `ALLY_LOG`; a benchmark runs at `info` (production's default) or `warn`.
    pub fn log_level(mut self, level: &str) -> Launch {
        self.log_level = level.into();
        self
    }

    /// Starts the broker and waits (up to 10 s) until its private socket
    /// answers; panics with its log if it exits first.
    pub fn start(self) -> Broker {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let runtime_dir = dir.path().join("run");
        let log = dir.path().join("broker.log");
        let log_file = std::fs::File::create(&log).expect("creating the broker log");
        let ally = if self.ally.as_os_str().is_empty() {
            ally_bin()
        } else {
            self.ally
        };
        let mut cmd = Command::new(ally);
        cmd.arg("run").arg(&self.app);
        if let Some(config) = &self.config {
            let path = dir.path().join(format!("{}.toml", self.app));
            std::fs::write(&path, config).expect("writing the config");
            cmd.arg("--config").arg(path);
        }
        cmd.args(&self.args).arg("--runtime-dir").arg(&runtime_dir);
        if !self.args.iter().any(|a| a == "--bus") {
            cmd.args(["--bus", "none"]);
        }
        if !self.command.is_empty() {
            // `--` must stay last for the app's command.
            cmd.arg("--").args(&self.command);
        }
        cmd.env("ALLY_LOG", &self.log_level)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the broker log"))
            .stderr(log_file);
        for name in &self.env_remove {
            cmd.env_remove(name);
        }
        let child = cmd.spawn().expect("spawning ally run");
        let mut broker = Broker {
            app: self.app,
            dir,
            runtime_dir,
            child: Some(child),
            log,
        };
        let socket = broker.socket();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = broker.try_wait() {
                panic!(
                    "ally run exited ({status}) before serving:\n{}",
                    broker.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the broker's private socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        broker
    }
}

/// A running `ally run`; stopped with SIGTERM on drop, its log printed if the
/// thread is panicking.
pub struct Broker {
    pub app: String,
    pub dir: tempfile::TempDir,
    pub runtime_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    /// Runs `ally run APP --config <file with `config`>`.
    pub fn start(app: &str, config: &str) -> Broker {
        Launch::new(app).config(config).start()
    }

    pub fn start_with(app: &str, config: &str, extra: &[&str]) -> Broker {
        Launch::new(app).config(config).args(extra).start()
    }

    /// With extra `ally run` arguments and environment variables.
    pub fn start_env(app: &str, config: &str, extra: &[&str], env: &[(&str, &str)]) -> Broker {
        env.iter()
            .fold(Launch::new(app).config(config).args(extra), |l, (k, v)| {
                l.env(k, v)
            })
            .start()
    }

    /// Runs `ally run APP -- COMMAND...` on the built-in defaults.
    pub fn start_command(app: &str, command: &[&str]) -> Broker {
        Launch::new(app).command(command).start()
    }

    /// The config file `--config` named; a test rewrites it before a reload
    /// (reloads read it again).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.toml", self.app))
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bus")
    }

    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket().display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the broker was stopped").id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs an `ally` admin command against this broker.
    pub fn ally(&self, args: &[&str]) -> Output {
        Command::new(ally_bin())
            .args(args)
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .output()
            .unwrap()
    }

    pub fn reload(&self) -> Output {
        self.ally(&["reload", &self.app])
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.ally(&["status", &self.app, "--json"]);
        assert!(
            out.status.success(),
            "ally status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().unwrap()
    }

    /// Pids of instances in `state`.
    pub fn pids(&self, state: &str) -> Vec<u32> {
        self.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == state)
            .map(|i| i["pid"].as_u64().unwrap() as u32)
            .collect()
    }

    pub fn wait_running(&self, generation: u64) {
        wait_until(
            &format!("generation {generation} running"),
            Duration::from_secs(20),
            || {
                let s = self.status();
                s["state"] == "running" && s["generation"].as_u64() >= Some(generation)
            },
        );
    }

    /// Polls `check` every `every` until it gives a value; panics on timeout or
    /// if the broker exits meanwhile.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        every: Duration,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let got = crate::poll::poll(every, timeout, || {
            if let Some(value) = check() {
                return Some(Ok(value));
            }
            self.try_wait().map(Err)
        });
        match got {
            Some(Ok(value)) => value,
            Some(Err(status)) => panic!("the broker exited ({status}) while waiting for {what}"),
            None => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Sends SIGTERM and waits (up to 60 s) for the broker to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("broker already stopped");
        terminate(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("broker did not stop within 60s:\n{}", self.logs()))
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// VmRSS in KiB and the number of open file descriptors.
    pub fn footprint(&self) -> (u64, usize) {
        let pid = self.pid();
        (procfs::rss_kib(pid), procfs::open_fds(pid))
    }

    /// CPU time the broker's threads have used.
    pub fn cpu_time(&self) -> Duration {
        procfs::process_cpu_time(self.pid())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let status = self.child.take().map(|mut child| {
            // Not `stop`: a second panic while unwinding would abort.
            match terminate(&mut child, Duration::from_secs(60)) {
                Ok(status) => status.to_string(),
                Err(status) => format!("{status}, killed after 60 s"),
            }
        });
        if std::thread::panicking() {
            let status = status.unwrap_or_else(|| "stopped".into());
            eprintln!("--- broker log ({status}) ---\n{}", self.logs());
        }
    }
}
