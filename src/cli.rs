//! The `ally` command line, as clap definitions (also the source of the man
//! page and shell completions).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::dbus::bus::BusChoice;

#[derive(Debug, Parser)]
#[command(
    name = "ally",
    version,
    about = "Socket broker for zero-downtime reloads and upgrades of network services",
    long_about = "Ally runs an application, hands it its listening sockets over D-Bus, and \
                  reloads it by starting the new version beside the old one on the same \
                  kernel sockets: the old version is asked to stop only once the new one \
                  is ready, so no connection is refused or lost."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker for APP in the foreground (what ally@APP.service runs).
    Run(RunArgs),
    /// Read APP's config again, start a new generation with it and wait until it is
    /// ready; fails if the config no longer reads or the generation is not ready.
    /// On a terminal it shows each phase as it happens, then the result line.
    Reload(ReloadArgs),
    /// Show APP's generations, instances and listeners (every broker without APP).
    Status(StatusArgs),
    /// List the brokers that can be reached.
    List(ListArgs),
    /// Run the broker's binary again in place (after an upgrade): same pid, the
    /// instances serve on, listeners, history and shared state are carried.
    Reexec(ReexecArgs),
    /// What ally@APP.service runs after the broker ended (ExecStopPost=): after a
    /// stop, kills what is left of the unit; after a crash, leaves the instances
    /// serving for the restarted broker.
    StopPost(StopPostArgs),
    /// Show APP's last reloads and crash restarts, oldest first, and a pending restart.
    History(HistoryArgs),
    /// Print APP's metrics in the OpenMetrics text format.
    Metrics(TargetArgs),
    /// Inspect and change APP's shared cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Inspect and change APP's shared counters.
    #[command(subcommand)]
    Atomic(AtomicCommand),
    /// Inspect and repair APP's shared locks.
    #[command(subcommand)]
    Lock(LockCommand),
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print a value (raw bytes to stdout); exit status 1 when absent.
    Get {
        app: String,
        namespace: String,
        key: String,
        /// Print {"found": .., "value": ..} (the value as a UTF-8 string, else as bytes).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Store a value.
    Set {
        app: String,
        namespace: String,
        key: String,
        value: String,
        /// Expire after this long, e.g. 30s [default: never].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete a key; exit status 1 when it was absent.
    Del {
        app: String,
        namespace: String,
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List the keys of a namespace.
    Keys {
        app: String,
        namespace: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Count the keys of a namespace.
    Count {
        app: String,
        namespace: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete every key of a namespace; prints how many.
    Flush {
        app: String,
        namespace: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AtomicCommand {
    /// Print a counter's value.
    Get {
        app: String,
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Set a counter.
    Set {
        app: String,
        name: String,
        #[arg(allow_negative_numbers = true)]
        value: i64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Add to a counter (wrapping); prints the new value.
    Add {
        app: String,
        name: String,
        #[arg(allow_negative_numbers = true)]
        delta: i64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Every counter with its value.
    List {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Holders and waiters of a lock (of every lock without NAME).
    Status {
        app: String,
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Repair: drop every holder of a lock (the next waiters get it).
    Release {
        app: String,
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Application name: names the config file, the runtime directory and the bus name org.ally.APP.
    pub app: String,
    /// Configuration file [default: /etc/ally/APP.toml, or built-in defaults when a COMMAND is given].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the private socket [default: $RUNTIME_DIRECTORY, /run/ally/APP for root, $XDG_RUNTIME_DIR/ally/APP].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Which message bus to register org.ally.APP on.
    #[arg(long, value_enum, default_value_t = BusChoice::Auto)]
    pub bus: BusChoice,
    /// Also listen on NET:ADDR (e.g. tcp::8000, unix:/run/web.sock), after the config's [[listen]] entries.
    #[arg(long, value_name = "NET:ADDR")]
    pub listen: Vec<String>,
    /// How instances get the listening sockets: over D-Bus (Listen), or as fds 3, 4, … (LISTEN_FDS).
    #[arg(long, value_name = "MODE", value_parser = ["dbus", "listen-fds"])]
    pub sockets: Option<String>,
    /// What makes an instance ready: its Ready call, READY=1 on its NOTIFY_SOCKET, --ready-delay, or --ready-probe.
    #[arg(long, value_name = "HOW", value_parser = ["dbus", "notify", "delay", "probe"])]
    pub ready: Option<String>,
    /// With --ready delay: how long an instance must run without exiting, e.g. 2s.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ready_delay: Option<std::time::Duration>,
    /// With --ready probe: a shell command that exits 0 once the app serves, run every 100 ms.
    #[arg(long, value_name = "SHELL-COMMAND")]
    pub ready_probe: Option<String>,
    /// The application's command; replaces `command` of the configuration.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Application name.
    pub app: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ReexecArgs {
    /// Application name.
    pub app: String,
    /// How long to wait for the re-executed broker to answer.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Print nothing but errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct StopPostArgs {
    /// Application name (the unit's instance name, %i).
    pub app: String,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Application name.
    pub app: String,
    /// Print nothing but errors.
    #[arg(long, short = 'q', conflicts_with = "json")]
    pub quiet: bool,
    /// Print each phase as a JSON object, one a line, then the result's (whether or not
    /// stdout is a terminal).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Application name; every reachable broker when omitted.
    pub app: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Application name.
    pub app: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of one name per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ConnectArgs {
    /// Directory of the broker's private socket, if it was started with --runtime-dir.
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}
