//! Telling callers apart by their credentials.
//!
//! A process of an instance, or a descendant of one, acts as that instance. Root
//! and the broker's own user, when not an instance, are admins. Anyone else may
//! only read, and only on a bus (whose policy decides who gets that far).
//!
//! Only a private-socket peer can be an instance: its process is pinned when it
//! connects (`super::peer`). A bus reports a pid per call, which by then may
//! belong to another process, so on a bus only the uid counts.

use std::collections::HashMap;

use crate::generations::InstanceId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Instance(InstanceId),
    Admin,
    Reader,
    Denied,
}

/// Where the call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    PrivateSocket,
    Bus,
}

/// Decides a caller's role from its uid and its verified process ancestry (itself
/// first; empty on a bus or for a process that has gone).
pub fn role(
    uid: u32,
    ancestry: &[u32],
    instances: &HashMap<u32, InstanceId>,
    broker_uid: u32,
    transport: Transport,
) -> Role {
    if let Some(id) = ancestry.iter().find_map(|pid| instances.get(pid)) {
        return Role::Instance(*id);
    }
    if uid == 0 || uid == broker_uid {
        return Role::Admin;
    }
    match transport {
        Transport::Bus => Role::Reader,
        Transport::PrivateSocket => Role::Denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_or_its_descendant_acts_as_the_instance() {
        let instances = HashMap::from([(300, 7)]);
        let r = role(1000, &[300], &instances, 0, Transport::PrivateSocket);
        assert_eq!(r, Role::Instance(7));
        let r = role(0, &[900, 300, 1], &instances, 0, Transport::PrivateSocket);
        assert_eq!(
            r,
            Role::Instance(7),
            "root running as an instance is that instance"
        );
    }

    #[test]
    fn root_and_the_brokers_user_are_admins() {
        let none = HashMap::new();
        assert_eq!(
            role(0, &[55], &none, 1000, Transport::PrivateSocket),
            Role::Admin
        );
        assert_eq!(
            role(1000, &[55], &none, 1000, Transport::PrivateSocket),
            Role::Admin
        );
    }

    #[test]
    fn others_are_refused_privately_and_read_only_on_a_bus() {
        let none = HashMap::new();
        assert_eq!(
            role(1001, &[55], &none, 0, Transport::PrivateSocket),
            Role::Denied
        );
        assert_eq!(role(1001, &[55], &none, 0, Transport::Bus), Role::Reader);
    }
}
