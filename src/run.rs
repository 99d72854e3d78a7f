//! `ally run`: load the configuration, open the private socket and the bus, and
//! run the broker until it is stopped.

use std::path::PathBuf;

use crate::broker::{Broker, Source};
use crate::cli::RunArgs;
use crate::config::{self, Config};
use crate::dbus::gate::Gate;
use crate::dbus::{bus, server, state_socket};
use crate::identity::RunAs;
use crate::runtime_dir;

pub async fn run(args: RunArgs) -> Result<i32, String> {
    init_logging();
    config::validate_app_name(&args.app)?;
    let (config, source) = load_config(&args)?;
    let runtime_dir = runtime_dir::resolve(&args.app, args.runtime_dir.as_deref(), true);
    let socket = runtime_dir::socket_path(&runtime_dir);
    let address = runtime_dir::dbus_address(&socket);
    let run_as = RunAs::resolve(&config)?;
    let owner = config.user.is_some().then_some((run_as.uid, run_as.gid));
    let state_busy_poll = config.state_busy_poll;
    let metrics_address = config.metrics_address;
    let gate = Gate::for_this_process(config.connections);
    let state_socket = runtime_dir::state_socket_path(&runtime_dir);
    let state_address = runtime_dir::dbus_address(&state_socket);
    let broker = Broker::new(&args.app, config, source, run_as, address, state_address)
        .map_err(|e| e.to_string())?;
    runtime_dir::prepare(&runtime_dir, owner.is_some()).map_err(|e| e.to_string())?;
    let listener = server::bind(&socket, owner).map_err(|e| e.to_string())?;
    let _socket_file = server::SocketFile::new(&socket);
    let state_listener = server::bind(&state_socket, owner).map_err(|e| e.to_string())?;
    let _state_socket_file = server::SocketFile::new(&state_socket);
    broker.serve_socket_files(
        runtime_dir.clone(),
        vec![socket.clone(), state_socket.clone()],
    );
    tokio::spawn(server::serve(listener, broker.clone(), gate.clone()));
    state_socket::spawn(
        state_listener.into_std().map_err(|e| e.to_string())?,
        broker.clone(),
        state_busy_poll,
        gate,
    )
    .map_err(|e| format!("cannot serve the state socket: {e}"))?;
    if let Some(addr) = metrics_address {
        let listener = crate::metrics_http::bind(addr)?;
        crate::metrics_http::spawn(listener, broker.clone())?;
        tracing::info!("serving GET /metrics on http://{addr}/metrics (metrics_address)");
    }
    bus::register(args.bus, broker.clone()).await?;
    tracing::info!("broker for {} listening on {}", args.app, socket.display());
    broker.run().await
}

/// The config, and where it came from for the reloads that read it again.
fn load_config(args: &RunArgs) -> Result<(Config, Source), String> {
    let overrides = overrides(args)?;
    let (config, mut source) = load_file(args)?;
    let config = overrides.apply(config)?;
    source.overrides = overrides;
    Ok((config, source))
}

/// `--listen`, `--sockets`, `--ready` and its `--ready-delay` / `--ready-probe`.
fn overrides(args: &RunArgs) -> Result<config::Overrides, String> {
    use config::{ListenEntry, Readiness};
    let mut overrides = config::Overrides::default();
    for spec in &args.listen {
        let (network, address) = spec.split_once(':').ok_or_else(|| {
            format!("--listen {spec:?}: expected NET:ADDR, like tcp::8000 or unix:/run/app.sock")
        })?;
        let addr = ally_core::net::ListenAddr::parse(network, address)
            .map_err(|e| format!("--listen {spec:?}: {e}"))?;
        overrides.listen.push(ListenEntry {
            addr,
            options: Default::default(),
            name: None,
        });
    }
    overrides.sockets = args.sockets.as_deref().map(str::parse).transpose()?;
    let delay_or_probe = |flag: &str, given: bool, mode: &str| {
        if given && args.ready.as_deref() != Some(mode) {
            Err(format!("{flag} is read only with --ready {mode}"))
        } else {
            Ok(())
        }
    };
    delay_or_probe("--ready-delay", args.ready_delay.is_some(), "delay")?;
    delay_or_probe("--ready-probe", args.ready_probe.is_some(), "probe")?;
    overrides.ready = match args.ready.as_deref() {
        None => None,
        Some("dbus") => Some(Readiness::Dbus),
        Some("notify") => Some(Readiness::Notify),
        Some("delay") => Some(Readiness::Delay(
            args.ready_delay
                .filter(|d| !d.is_zero())
                .ok_or("--ready delay needs --ready-delay DURATION, e.g. --ready-delay 2s")?,
        )),
        Some("probe") => Some(Readiness::Probe(vec![
            "/bin/sh".into(),
            "-c".into(),
            args.ready_probe
                .clone()
                .ok_or("--ready probe needs --ready-probe COMMAND, e.g. --ready-probe 'curl -fsS http://127.0.0.1:8000/'")?,
        ])),
        Some(other) => return Err(format!("--ready {other:?}: expected dbus, notify, delay or probe")),
    };
    Ok(overrides)
}

fn load_file(args: &RunArgs) -> Result<(Config, Source), String> {
    let command = (!args.command.is_empty()).then(|| args.command.clone());
    let path: Option<PathBuf> = match &args.config {
        Some(path) => Some(path.clone()),
        None => Some(Config::default_path(&args.app)).filter(|p| p.exists()),
    };
    match (path, command) {
        (Some(path), command_override) => {
            let text = Config::read(&path).map_err(|e| e.to_string())?;
            let config =
                Config::parse(&text, &path, command_override.clone()).map_err(|e| e.to_string())?;
            let source = Source {
                text: Some(text),
                command_override,
                overrides: Default::default(),
            };
            Ok((config, source))
        }
        (None, Some(command)) => Ok((Config::defaults(command), Source::default())),
        (None, None) => Err(format!(
            "no configuration for {app}: {} does not exist; give --config FILE, or the command after `--` (ally run {app} -- /path/to/app)",
            Config::default_path(&args.app).display(),
            app = args.app
        )),
    }
}

/// Structured records to the journal when stderr is the journal (systemd sets
/// `JOURNAL_STREAM`), else readable lines on stderr.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || EnvFilter::try_from_env("ALLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        let journal = journal.with_syslog_identifier("ally".to_string());
        let _ = tracing_subscriber::registry()
            .with(filter())
            .with(journal)
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
