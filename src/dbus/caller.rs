//! Telling callers apart by their credentials.
//!
//! A process of an instance, or a descendant of one, acts as that instance. Root
//! and the broker's own user, when not an instance, are admins. Anyone else may
//! only read, and only on a bus (whose policy decides who gets that far).

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

/// Decides a caller's role from its uid and its process ancestry (itself first).
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

/// `pid` and its ancestors, read from /proc, stopping below the broker (whose
/// other children are not instances) and at init.
pub fn ancestry(pid: u32) -> Vec<u32> {
    let broker = std::process::id();
    let mut chain = Vec::new();
    let mut next = pid;
    while next > 1 && next != broker && chain.len() < 64 {
        chain.push(next);
        match parent_of(next) {
            Some(parent) => next = parent,
            None => break,
        }
    }
    chain
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
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

    #[test]
    fn ancestry_of_this_process_includes_its_parent() {
        let chain = ancestry(std::process::id());
        // The broker's own pid stops the walk, so for this test process the
        // chain is empty; a child of ours has us as the stop.
        assert!(chain.is_empty());
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let chain = ancestry(child.id());
        assert_eq!(chain, vec![child.id()]);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn parent_is_read_past_odd_command_names() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(nix::unistd::getppid().as_raw() as u32)
        );
    }
}
