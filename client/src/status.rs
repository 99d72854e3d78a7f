//! The broker's status, as [`Ally::status`](crate::Ally::status) returns it.

/// What `Status()` reports: the app, its generations and its sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    pub app: String,
    /// `starting`, `running`, `reloading`, `stopping`, …
    pub state: String,
    /// The serving generation; 0 before the first is ready.
    pub generation: u64,
    /// The broker's pid (in simulate mode, this process's).
    pub pid: u32,
    pub instances: Vec<InstanceStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// Successful reloads.
    pub reloads: u64,
    /// Empty, or the last reload's result message.
    pub last_reload: String,
}

/// One instance (process) of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceStatus {
    pub id: u64,
    pub generation: u64,
    pub pid: u32,
    /// `starting`, `ready`, `draining` or `exited`.
    pub state: String,
    /// Microseconds since the Unix epoch.
    pub started_usec: u64,
    /// Microseconds since the Unix epoch; 0 if never ready.
    pub ready_usec: u64,
}

/// One listening socket the broker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStatus {
    pub network: String,
    /// The bound address (the real port for a port-0 request).
    pub address: String,
    /// How many instances hold it.
    pub references: u32,
}

impl From<ally_core::proxy::Status> for Status {
    fn from(s: ally_core::proxy::Status) -> Status {
        Status {
            app: s.app,
            state: s.state,
            generation: s.generation,
            pid: s.pid,
            instances: s
                .instances
                .into_iter()
                .map(|i| InstanceStatus {
                    id: i.id,
                    generation: i.generation,
                    pid: i.pid,
                    state: i.state,
                    started_usec: i.started_usec,
                    ready_usec: i.ready_usec,
                })
                .collect(),
            listeners: s
                .listeners
                .into_iter()
                .map(|l| ListenerStatus {
                    network: l.network,
                    address: l.address,
                    references: l.references,
                })
                .collect(),
            reloads: s.reloads,
            last_reload: s.last_reload,
        }
    }
}
