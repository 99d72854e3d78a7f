//! Which listening addresses the operator declared, and what an instance's own
//! user may bind: the broker binds a declared address with its own rights and
//! anything else only as the instance could (see `crate::bind_as`).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use ally_core::net::{Endpoint, ListenAddr, Network};

use crate::config::ListenEntry;

/// One `allow_listen` entry: `NETWORK:ADDRESS`, or `NETWORK:/dir/` for every
/// filesystem socket below a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Address(ListenAddr),
    UnixDir { network: Network, dir: PathBuf },
}

impl Allowed {
    /// Parses `network:address`, e.g. `tcp::443`, `tcp:127.0.0.1:81`, `unix:/run/web/`.
    pub fn parse(entry: &str) -> Result<Allowed, String> {
        let (network, address) = entry.split_once(':').ok_or_else(|| {
            format!(
                "{entry:?} has no network: expected NETWORK:ADDRESS like \"tcp::443\", \"tcp:127.0.0.1:81\" or \"unix:/run/web/\""
            )
        })?;
        let parsed: Network = network.parse().map_err(|e| format!("{e}"))?;
        if parsed.is_unix() && address.starts_with('/') && address.ends_with('/') {
            let dir = Path::new(address);
            if address.contains('\0') {
                return Err(format!("{entry:?}: the path contains a NUL byte"));
            }
            if dir.components().any(|c| c == Component::ParentDir) {
                return Err(format!(
                    "{entry:?}: the directory must not contain `..` components"
                ));
            }
            if dir.components().all(|c| c == Component::RootDir) {
                return Err(format!(
                    "{entry:?} allows every path: name the directory the sockets go in"
                ));
            }
            return Ok(Allowed::UnixDir {
                network: parsed,
                dir: dir.components().collect(),
            });
        }
        ListenAddr::parse(network, address)
            .map(Allowed::Address)
            .map_err(|e| e.to_string())
    }

    pub fn permits(&self, addr: &ListenAddr) -> bool {
        match self {
            Allowed::Address(allowed) => allowed == addr,
            Allowed::UnixDir { network, dir } => {
                let Endpoint::Path(path) = &addr.endpoint else {
                    return false;
                };
                addr.network == *network
                    && path != dir
                    && path.starts_with(dir)
                    && !path.components().any(|c| c == Component::ParentDir)
            }
        }
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Address(addr) => write!(f, "{addr}"),
            Allowed::UnixDir { network, dir } => write!(f, "{network} {}/", dir.display()),
        }
    }
}

/// Whether the operator declared `addr`: listed in `[[listen]]`, or allowed
/// by `allow_listen`.
pub fn declared(listen: &[ListenEntry], allow: &[Allowed], addr: &ListenAddr) -> bool {
    listen.iter().any(|entry| entry.addr == *addr) || allow.iter().any(|a| a.permits(addr))
}

/// The port of `addr` if binding it needs privilege: an internet port below
/// `unprivileged_from` (`net.ipv4.ip_unprivileged_port_start`, which IPv6
/// shares), other than 0.
pub fn privileged_port(addr: &ListenAddr, unprivileged_from: u16) -> Option<u16> {
    match addr.endpoint {
        Endpoint::Inet(sa) if sa.port() != 0 && sa.port() < unprivileged_from => Some(sa.port()),
        _ => None,
    }
}

/// The message of a refused `Listen`: what, why, and how the operator allows it.
pub fn refusal(addr: &ListenAddr, why: &str, config_file: Option<&Path>) -> String {
    let file = config_file.map_or_else(
        || "the app's config file (ally run --config FILE)".to_string(),
        |f| f.display().to_string(),
    );
    format!(
        "{addr} refused: {why}. An address the operator did not declare is bound only as the instances' own user could bind it; to allow this one, declare it in [[listen]] or allow_listen in {file}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ally_core::net::ListenOptions;

    fn addr(network: &str, address: &str) -> ListenAddr {
        ListenAddr::parse(network, address).unwrap()
    }

    fn allowed(entries: &[&str]) -> Vec<Allowed> {
        entries.iter().map(|e| Allowed::parse(e).unwrap()).collect()
    }

    #[test]
    fn entries_parse_like_listen_addresses() {
        assert_eq!(
            Allowed::parse("tcp::443").unwrap(),
            Allowed::Address(addr("tcp", ":443"))
        );
        assert_eq!(
            Allowed::parse("tcp:localhost:81").unwrap(),
            Allowed::Address(addr("tcp", "127.0.0.1:81"))
        );
        assert_eq!(
            Allowed::parse("unix:/run//web/./").unwrap(),
            Allowed::UnixDir {
                network: Network::Unix,
                dir: PathBuf::from("/run/web")
            }
        );
        assert_eq!(
            Allowed::parse("unix:/run/web.sock").unwrap(),
            Allowed::Address(addr("unix", "/run/web.sock"))
        );
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let err = |e: &str| Allowed::parse(e).unwrap_err();
        assert!(err("443").contains("has no network"), "{}", err("443"));
        assert!(err("sctp::443").contains("unknown network \"sctp\""));
        assert!(err("tcp:443").contains("missing port"));
        assert!(err("unix:/run/../etc/").contains("`..`"));
        assert!(err("unix:/").contains("allows every path"));
        assert!(
            err("unix:run/").contains("absolute"),
            "{}",
            err("unix:run/")
        );
    }

    #[test]
    fn a_directory_allows_the_paths_below_it_by_component() {
        let allow = allowed(&["unix:/run/web/"]);
        let permits = |network: &str, path: &str| allow[0].permits(&addr(network, path));
        assert!(permits("unix", "/run/web/a.sock"));
        assert!(permits("unix", "/run/web/sub/a.sock"));
        assert!(!permits("unix", "/run/webby/a.sock"), "a string prefix");
        assert!(!permits("unix", "/run/web/../shadow"), "`..` never matches");
        assert!(!permits("unix", "/run/web/sub/../../x"));
        assert!(!permits("unixgram", "/run/web/a.sock"), "another network");
        assert!(!permits("unix", "/run/a.sock"));
        assert!(!allow[0].permits(&addr("unix", "@web")));
    }

    #[test]
    fn declared_means_listed_or_allowed() {
        let listen = vec![ListenEntry {
            addr: addr("tcp", ":80"),
            options: ListenOptions::default(),
            name: None,
        }];
        let allow = allowed(&["tcp:127.0.0.1:81", "unix:/run/web/"]);
        let declared = |n: &str, a: &str| declared(&listen, &allow, &addr(n, a));
        assert!(declared("tcp", ":80"));
        assert!(declared("tcp", "localhost:81"));
        assert!(!declared("tcp4", "127.0.0.1:81"), "tcp4 is another key");
        assert!(!declared("tcp", "127.0.0.1:82"));
        assert!(declared("unix", "/run/web/a.sock"));
        assert!(!declared("unix", "/run/a.sock"));
    }

    #[test]
    fn ports_below_the_start_are_privileged() {
        assert_eq!(privileged_port(&addr("tcp", ":81"), 1024), Some(81));
        assert_eq!(privileged_port(&addr("udp6", "[::1]:53"), 1024), Some(53));
        assert_eq!(privileged_port(&addr("tcp", ":1024"), 1024), None);
        assert_eq!(privileged_port(&addr("tcp", ":0"), 1024), None);
        assert_eq!(privileged_port(&addr("tcp", ":81"), 0), None);
        assert_eq!(privileged_port(&addr("unix", "/run/a.sock"), 1024), None);
    }

    #[test]
    fn a_refusal_names_the_address_the_reason_and_the_fix() {
        let m = refusal(
            &addr("tcp", "127.0.0.1:81"),
            "port 81 is privileged",
            Some(Path::new("/etc/ally/web.toml")),
        );
        assert!(
            m.starts_with("tcp 127.0.0.1:81 refused: port 81 is privileged."),
            "{m}"
        );
        assert!(
            m.ends_with("declare it in [[listen]] or allow_listen in /etc/ally/web.toml"),
            "{m}"
        );
    }
}
