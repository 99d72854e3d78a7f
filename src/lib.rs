//! The Ally broker: supervises one application, owns its listening sockets and
//! reloads it with zero downtime. See `docs/architecture.md` for the map.

pub mod activation;
pub mod admission;
pub mod app_logs;
pub mod bind_as;
pub mod broker;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod dbus;
pub mod follow;
pub mod generations;
pub mod history;
pub mod identity;
pub mod instance;
pub mod listen_policy;
pub mod listeners;
pub mod metrics;
pub mod metrics_http;
pub mod notify;
pub mod observe_cli;
pub mod priority;
pub mod process;
pub mod progress;
pub mod reexec;
pub mod reexec_command;
pub mod release_watch;
pub mod reload_command;
pub mod run;
pub mod runtime_dir;
pub mod state;
pub mod state_cli;
pub mod stop_post;
pub mod systemd;
pub mod throttle;
