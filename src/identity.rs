//! Who the instances run as: the config's `user` and `group`, looked up in the
//! user and group databases once, when `ally run` starts.
//!
//! The lookups (NSS: file reads, maybe daemons) happen here, in the broker,
//! before anything is spawned, and never between fork and exec (see
//! `instance::spawn`) nor under the broker's lock.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User, getegid, geteuid, getgrouplist, getgroups};

use crate::bind_as::Credentials;
use crate::config::{Config, ConfigError, Located, Principal};

/// The instances' credentials, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// The user's name in the user database, if it has one.
    pub name: Option<String>,
    /// The supplementary groups the instances hold: the user's own when the
    /// broker may set them, else the broker's, which the instances inherit.
    pub groups: Vec<u32>,
    /// Whether the instances switch to these ids (the config names a user or a
    /// group); otherwise they keep the broker's.
    pub switch: bool,
    /// Whether the switch sets the supplementary groups too: only root may.
    pub set_groups: bool,
}

impl RunAs {
    /// Resolves the config's `user` and `group`; without them, the broker's own
    /// ids. Errors name the file, the place and the key, like the config's.
    pub fn resolve(config: &Config) -> Result<RunAs, String> {
        let cx = Cx { config };
        let root = geteuid().is_root();
        let group = config.group.as_ref().map(|g| cx.group(g)).transpose()?;
        let broker_groups = || {
            getgroups()
                .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
                .map_err(|e| format!("cannot tell the broker's groups: {}", e.desc()))
        };
        let Some(user) = &config.user else {
            let uid = geteuid().as_raw();
            return Ok(RunAs {
                uid,
                gid: group.unwrap_or_else(|| getegid().as_raw()),
                name: name_of(uid),
                groups: match group {
                    Some(gid) if root => vec![gid],
                    _ => broker_groups()?,
                },
                switch: group.is_some(),
                set_groups: root,
            });
        };
        let (uid, name, primary) = cx.user(user)?;
        let Some(gid) = group.or(primary) else {
            return Err(cx.invalid(
                user,
                "user",
                format!(
                    "uid {uid} has no entry in the user database, so it has no primary group: set `group` too"
                ),
            ));
        };
        let groups = match &name {
            _ if !root => broker_groups()?,
            None => vec![gid],
            Some(name) => {
                let c_name = CString::new(name.as_str())
                    .map_err(|_| format!("the user name {name:?} has a NUL byte"))?;
                getgrouplist(&c_name, Gid::from_raw(gid))
                    .map_err(|e| {
                        cx.invalid(
                            user,
                            "user",
                            format!("cannot list the groups of {name:?}: {}", e.desc()),
                        )
                    })?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect()
            }
        };
        Ok(RunAs {
            uid,
            gid,
            name,
            groups,
            switch: true,
            set_groups: root,
        })
    }

    /// Whose rights a bind on the instances' behalf uses.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// "nobody (uid 65534)", for messages.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }
}

fn name_of(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

struct Cx<'a> {
    config: &'a Config,
}

impl Cx<'_> {
    fn invalid<T>(&self, at: &Located<T>, key: &str, message: String) -> String {
        ConfigError::Invalid {
            path: self.config.file.clone().unwrap_or_default(),
            location: at.location,
            key: key.to_string(),
            message,
        }
        .to_string()
    }

    /// uid, its name if the user database knows it, and its primary group.
    fn user(
        &self,
        user: &Located<Principal>,
    ) -> Result<(u32, Option<String>, Option<u32>), String> {
        let lookup_error = |e: nix::Error| {
            self.invalid(
                user,
                "user",
                format!("cannot look up the user database: {}", e.desc()),
            )
        };
        let found = match &user.value {
            Principal::Id(uid) => {
                match User::from_uid(Uid::from_raw(*uid)).map_err(lookup_error)? {
                    Some(found) => found,
                    None => return Ok((*uid, None, None)),
                }
            }
            Principal::Name(name) => {
                User::from_name(name)
                    .map_err(lookup_error)?
                    .ok_or_else(|| {
                        self.invalid(
                        user,
                        "user",
                        format!(
                            "unknown user {name:?}: expected an existing user name or a numeric uid"
                        ),
                    )
                    })?
            }
        };
        Ok((
            found.uid.as_raw(),
            Some(found.name),
            Some(found.gid.as_raw()),
        ))
    }

    fn group(&self, group: &Located<Principal>) -> Result<u32, String> {
        let name = match &group.value {
            Principal::Id(gid) => return Ok(*gid),
            Principal::Name(name) => name,
        };
        let found = Group::from_name(name)
            .map_err(|e| {
                self.invalid(
                    group,
                    "group",
                    format!("cannot look up the group database: {}", e.desc()),
                )
            })?
            .ok_or_else(|| {
                self.invalid(
                    group,
                    "group",
                    format!(
                        "unknown group {name:?}: expected an existing group name or a numeric gid"
                    ),
                )
            })?;
        Ok(found.gid.as_raw())
    }
}

#[cfg(test)]
pub(crate) mod tests;
