//! `ally run`: load the configuration, open the private socket and the bus, and
//! run the broker until it is stopped.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use crate::broker::snapshot;
use crate::broker::{Broker, Source};
use crate::cli::RunArgs;
use crate::config::{self, Config};
use crate::dbus::gate::Gate;
use crate::dbus::{bus, server, state_socket};
use crate::identity::RunAs;
use crate::reexec::{self, image, image::BrokerImage};
use crate::runtime_dir;
use crate::state::State;

pub async fn run(args: RunArgs) -> Result<i32, String> {
    init_logging();
    config::validate_app_name(&args.app)?;
    let runtime_dir = runtime_dir::resolve(&args.app, args.runtime_dir.as_deref(), true);
    // A re-executed broker, or one restarted after a crash, carries on with the
    // config the broker before it ran; an edit of the file since is read at the
    // next reload.
    let mut snapshot = None;
    let (image, (config, source)) = match carried_image(&args)? {
        Some((image, loaded)) => (Some(image), loaded),
        None => {
            snapshot = left_snapshot(&runtime_dir);
            let loaded = match &snapshot {
                Some(left) => match config_of_image(&args, left) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::warn!(
                            "the config the broker that died ran does not load ({e}): reading the file"
                        );
                        load_config(&args)?
                    }
                },
                None => load_config(&args)?,
            };
            (None, loaded)
        }
    };
    let socket = runtime_dir::socket_path(&runtime_dir);
    let address = runtime_dir::dbus_address(&socket);
    let run_as = RunAs::resolve(&config)?;
    let owner = config.user.is_some().then_some((run_as.uid, run_as.gid));
    let state_busy_poll = config.state_busy_poll;
    let metrics_address = config.metrics_address;
    let gate = Gate::for_this_process(config.connections);
    let state_socket = runtime_dir::state_socket_path(&runtime_dir);
    let state_address = runtime_dir::dbus_address(&state_socket);
    let (broker, listener, state_listener) = match image {
        None => {
            runtime_dir::prepare(&runtime_dir, owner.is_some()).map_err(|e| e.to_string())?;
            let state = match &snapshot {
                Some(image) => {
                    match ally_core::state::SharedStore::from_image(
                        config.limits,
                        image.state.clone(),
                    ) {
                        Ok(restored) => {
                            if !restored.dropped.is_empty() {
                                tracing::warn!("{}", restored.dropped);
                            }
                            State::with_store(restored.store)
                        }
                        Err(e) => {
                            tracing::warn!(
                                "the snapshot's shared state cannot be restored ({e}): starting empty"
                            );
                            State::new(&config.limits)
                        }
                    }
                }
                None => State::new(&config.limits),
            };
            let parse = config_parser(&config, &source);
            let broker = Broker::new(
                &args.app,
                config,
                source,
                run_as,
                address,
                state_address,
                state,
            )
            .map_err(|e| e.to_string())?;
            if let Some(image) = snapshot {
                tracing::warn!(
                    "the previous broker of {} died: adopting what it left",
                    args.app
                );
                for line in broker.adopt_snapshot(image, &parse) {
                    tracing::info!("{line}");
                }
            }
            let listener = match own_socket(&broker, "ally-bus", &socket) {
                Some(l) => tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())?,
                None => {
                    let l = server::bind(&socket, owner).map_err(|e| e.to_string())?;
                    crate::systemd::store_named("ally-bus", l.as_fd());
                    l
                }
            };
            let state_listener = match own_socket(&broker, "ally-state", &state_socket) {
                Some(l) => l,
                None => {
                    let l = server::bind(&state_socket, owner)
                        .map_err(|e| e.to_string())?
                        .into_std()
                        .map_err(|e| e.to_string())?;
                    crate::systemd::store_named("ally-state", l.as_fd());
                    l
                }
            };
            broker.drop_unclaimed_fds();
            (broker, listener, state_listener)
        }
        Some(image) => restore(&args, image, config, source, run_as, address, state_address)?,
    };
    broker.set_own_sockets(listener.as_raw_fd(), state_listener.as_raw_fd());
    let _socket_file = server::SocketFile::new(&socket);
    let _state_socket_file = server::SocketFile::new(&state_socket);
    broker.serve_socket_files(
        runtime_dir.clone(),
        vec![socket.clone(), state_socket.clone()],
    );
    tokio::spawn(server::serve(listener, broker.clone(), gate.clone()));
    state_socket::spawn(state_listener, broker.clone(), state_busy_poll, gate)
        .map_err(|e| format!("cannot serve the state socket: {e}"))?;
    if let Some(addr) = metrics_address {
        let listener = crate::metrics_http::bind(addr)?;
        crate::metrics_http::spawn(listener, broker.clone())?;
        tracing::info!("serving GET /metrics on http://{addr}/metrics (metrics_address)");
    }
    if crate::systemd::has_fd_store() {
        tokio::spawn(broker.clone().keep_snapshots(runtime_dir.clone()));
        tokio::spawn(broker.clone().stop_strays());
    }
    bus::register(args.bus, broker.clone()).await?;
    tracing::info!("broker for {} listening on {}", args.app, socket.display());
    broker.run().await
}

/// The snapshot a broker that died left, under systemd: its instances may
/// still run. Read only from a runtime directory that passes
/// [`runtime_dir::prepare`]'s checks.
fn left_snapshot(runtime_dir: &std::path::Path) -> Option<BrokerImage> {
    if !crate::systemd::has_fd_store() || std::fs::symlink_metadata(runtime_dir).is_err() {
        return None;
    }
    // Checks only: the directory exists, and prepare adds no mode bits when
    // it is not to be reachable by others.
    runtime_dir::prepare(runtime_dir, false).ok()?;
    snapshot::read(runtime_dir)
}

/// Reads a config text an image carried as `ally run` read its file: the same
/// path, command line command and overrides.
fn config_parser(
    config: &Config,
    source: &Source,
) -> impl Fn(&str) -> Result<Config, String> + use<> {
    let path = config.file.clone();
    let command_override = source.command_override.clone();
    let overrides = source.overrides.clone();
    move |text: &str| -> Result<Config, String> {
        let path = path.clone().ok_or("no config file")?;
        let config =
            Config::parse(text, &path, command_override.clone()).map_err(|e| e.to_string())?;
        overrides.apply(config)
    }
}

/// The private or state socket the fd store kept, if its file is still there.
fn own_socket(
    broker: &Broker,
    name: &str,
    path: &std::path::Path,
) -> Option<std::os::unix::net::UnixListener> {
    let fd = broker.take_inherited(name)?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    let same_path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p == path))
        .unwrap_or(false);
    if !same_path || std::fs::symlink_metadata(path).is_err() {
        crate::systemd::unstore_named(name);
        return None;
    }
    listener.set_nonblocking(true).ok()?;
    tracing::info!("took {} back from the fd store", path.display());
    Some(listener)
}

/// A config and where it was read from.
type Loaded = (Config, Source);

/// The image of the broker this process replaces, when it was re-executed,
/// with the config it ran on. An image this binary cannot read, or whose config
/// it refuses, goes back to the binary that wrote it.
fn carried_image(args: &RunArgs) -> Result<Option<(BrokerImage, Loaded)>, String> {
    let handed = match reexec::take_handed() {
        None => return Ok(None),
        Some(Ok(handed)) => handed,
        Some(Err(e)) => {
            return Err(format!(
                "cannot read the image of the broker this one re-executed: {e}"
            ));
        }
    };
    let why = match serde_json::from_slice::<BrokerImage>(&handed.image) {
        Ok(image) if image.version == image::VERSION && image.app == args.app => {
            match config_of_image(args, &image) {
                Ok(loaded) => return Ok(Some((image, loaded))),
                Err(e) => format!("its config does not load here: {e}"),
            }
        }
        Ok(image) if image.app != args.app => {
            format!("it is of app {:?}", image.app)
        }
        Ok(image) => format!(
            "it is version {} (this binary reads version {})",
            image.version,
            image::VERSION
        ),
        Err(e) => format!("it does not parse: {e}"),
    };
    tracing::error!("this binary cannot take over from the broker it replaces: {why}");
    // Only once: the old binary, run again, gets no fallback of its own.
    let fallback = handed
        .fallback
        .filter(|_| std::env::var_os(reexec::FALLEN_BACK_ENV).is_none());
    let Some(fallback) = fallback else {
        return Err(format!(
            "cannot take over the re-executed broker's image: {why}"
        ));
    };
    let startup = reexec::startup().ok_or("the broker does not know its arguments")?;
    let memfd = reexec::image_fd(&handed.image).map_err(|e| e.to_string())?;
    tracing::warn!("running the binary that wrote the image again");
    let env = [
        (reexec::IMAGE_ENV, memfd.as_raw_fd().to_string()),
        (reexec::FALLEN_BACK_ENV, why.clone()),
    ];
    let error = reexec::exec_fd(fallback.as_raw_fd(), &startup.args, &env);
    Err(format!(
        "cannot take over the re-executed broker's image ({why}), nor run the old binary again: {error}"
    ))
}

/// The config the image's broker ran on (the text it read at its last start
/// or reload), read as `ally run` reads its file.
fn config_of_image(args: &RunArgs, image: &BrokerImage) -> Result<Loaded, String> {
    let current = image
        .configs
        .get(image.settings)
        .ok_or("it names no config in use")?;
    let loaded = match &current.text {
        Some(text) => {
            let path = args
                .config
                .clone()
                .unwrap_or_else(|| Config::default_path(&args.app));
            config_of_text(args, &path, text.clone())?
        }
        // The broker ran on the built-in defaults and its command line.
        None if !args.command.is_empty() => {
            (Config::defaults(args.command.clone()), Source::default())
        }
        None => return Err("it ran on no config file and no command".into()),
    };
    with_overrides(args, loaded)
}

type Restored = (
    std::sync::Arc<Broker>,
    tokio::net::UnixListener,
    std::os::unix::net::UnixListener,
);

/// The broker `image` describes, with the private and state sockets it carried.
fn restore(
    args: &RunArgs,
    image: BrokerImage,
    config: Config,
    source: Source,
    run_as: RunAs,
    address: String,
    state_address: String,
) -> Result<Restored, String> {
    let take = |fd, what: &str| -> Result<std::os::unix::net::UnixListener, String> {
        let fd = reexec::take_fd(fd).map_err(|e| format!("the {what} (fd {fd}): {e}"))?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("the {what}: {e}"))?;
        Ok(listener)
    };
    let listener =
        tokio::net::UnixListener::from_std(take(image.private_socket, "private socket")?)
            .map_err(|e| e.to_string())?;
    let state_listener = take(image.state_socket, "state socket")?;
    let parse = config_parser(&config, &source);
    let restored = ally_core::state::SharedStore::from_image(config.limits, image.state.clone())
        .map_err(|e| format!("the shared state of the image: {e}"))?;
    let dropped = restored.dropped;
    let state = crate::state::State::with_store(restored.store);
    let reexecs = image.reexecs;
    let taken_by = image.taken_by.clone();
    let broker = Broker::assemble(
        &args.app,
        config,
        source,
        run_as,
        address,
        state_address,
        state,
    )
    .map_err(|e| e.to_string())?;
    let warnings = Broker::restore(broker.clone(), image, parse)?;
    if let Some(why) = std::env::var_os(reexec::FALLEN_BACK_ENV) {
        let message = format!(
            "the new binary could not take over ({}): the old one runs again",
            why.to_string_lossy()
        );
        tracing::error!("{message}");
        broker.reexec_failed(message);
    }
    if !dropped.is_empty() {
        tracing::warn!("{dropped}");
    }
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let status = broker.status();
    tracing::info!(
        "re-executed (#{reexecs}, from ally {taken_by}): carried {} instances and {} listeners",
        status.instances.len(),
        status.listeners.len()
    );
    Ok((broker, listener, state_listener))
}

/// The config, and where it came from for the reloads that read it again.
fn load_config(args: &RunArgs) -> Result<Loaded, String> {
    with_overrides(args, load_file(args)?)
}

/// `ally run`'s options applied on top of a config read.
fn with_overrides(args: &RunArgs, (config, mut source): Loaded) -> Result<Loaded, String> {
    let overrides = overrides(args)?;
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

fn load_file(args: &RunArgs) -> Result<Loaded, String> {
    let command = (!args.command.is_empty()).then(|| args.command.clone());
    let path: Option<PathBuf> = match &args.config {
        Some(path) => Some(path.clone()),
        None => Some(Config::default_path(&args.app)).filter(|p| p.exists()),
    };
    match (path, command) {
        (Some(path), _) => {
            let text = Config::read(&path).map_err(|e| e.to_string())?;
            config_of_text(args, &path, text)
        }
        (None, Some(command)) => Ok((Config::defaults(command), Source::default())),
        (None, None) => Err(format!(
            "no configuration for {app}: {} does not exist; give --config FILE, or the command after `--` (ally run {app} -- /path/to/app)",
            Config::default_path(&args.app).display(),
            app = args.app
        )),
    }
}

/// `text` read as the config file at `path`, the command given after `--`, if
/// any, replacing its `command`.
fn config_of_text(args: &RunArgs, path: &std::path::Path, text: String) -> Result<Loaded, String> {
    let command_override = (!args.command.is_empty()).then(|| args.command.clone());
    let config = Config::parse(&text, path, command_override.clone()).map_err(|e| e.to_string())?;
    let source = Source {
        text: Some(text),
        command_override,
        overrides: Default::default(),
    };
    Ok((config, source))
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
