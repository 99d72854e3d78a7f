//! The generation table: every instance the broker spawned and not yet reaped,
//! and the state machine each one follows,
//! `starting → ready → draining → exited` (a starting instance may also be
//! stopped or exit). Pure: no processes, no clocks of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

pub type InstanceId = u64;
pub type Generation = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Starting,
    Ready,
    Draining,
    Exited,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Draining => "draining",
            InstanceState::Exited => "exited",
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: InstanceId,
    pub generation: Generation,
    pub pid: u32,
    pub state: InstanceState,
    pub started: SystemTime,
    pub started_at: Instant,
    pub ready: Option<SystemTime>,
    pub ready_at: Option<Instant>,
}

/// A transition that was not allowed, e.g. `Ready` from a draining instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTransition {
    pub id: InstanceId,
    pub from: InstanceState,
    pub to: InstanceState,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "instance {} is {}, it cannot become {}",
            self.id, self.from, self.to
        )
    }
}

/// What the table knew of an instance when it exited.
#[derive(Debug, Clone)]
pub struct Departure {
    pub instance: Instance,
    /// It was the current instance: the app has no ready instance left.
    pub was_current: bool,
    /// How long it had been ready, if it ever was.
    pub ready_for: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct Table {
    instances: BTreeMap<InstanceId, Instance>,
    next_id: InstanceId,
    last_generation: Generation,
}

impl Table {
    pub fn next_generation(&mut self) -> Generation {
        self.last_generation += 1;
        self.last_generation
    }

    /// Reserves the numbers of an instance about to be spawned: its generation
    /// and its id. It joins the table with [`Table::spawned`] once it runs.
    pub fn reserve(&mut self) -> (Generation, InstanceId) {
        self.next_id += 1;
        (self.next_generation(), self.next_id)
    }

    /// Records a reserved instance that was spawned.
    pub fn spawned(
        &mut self,
        id: InstanceId,
        generation: Generation,
        pid: u32,
        now: Instant,
        wall: SystemTime,
    ) {
        self.instances.insert(
            id,
            Instance {
                id,
                generation,
                pid,
                state: InstanceState::Starting,
                started: wall,
                started_at: now,
                ready: None,
                ready_at: None,
            },
        );
    }

    /// The table an image carried: its instances and counters.
    pub fn from_parts(
        instances: Vec<Instance>,
        next_id: InstanceId,
        last_generation: Generation,
    ) -> Table {
        let next_id = instances
            .iter()
            .map(|i| i.id)
            .fold(next_id, InstanceId::max);
        let last_generation = instances
            .iter()
            .map(|i| i.generation)
            .fold(last_generation, Generation::max);
        Table {
            instances: instances.into_iter().map(|i| (i.id, i)).collect(),
            next_id,
            last_generation,
        }
    }

    /// The last instance id and generation handed out.
    pub fn counters(&self) -> (InstanceId, Generation) {
        (self.next_id, self.last_generation)
    }

    pub fn get(&self, id: InstanceId) -> Option<&Instance> {
        self.instances.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    /// The newest ready instance: the one serving as the app.
    pub fn current(&self) -> Option<&Instance> {
        self.instances
            .values()
            .filter(|i| i.state == InstanceState::Ready)
            .max_by_key(|i| (i.generation, i.id))
    }

    pub fn count(&self, state: InstanceState) -> usize {
        self.instances.values().filter(|i| i.state == state).count()
    }

    /// Marks an instance ready. Returns false when it already was.
    pub fn mark_ready(
        &mut self,
        id: InstanceId,
        now: Instant,
        wall: SystemTime,
    ) -> Result<bool, InvalidTransition> {
        let instance = self.instance_mut(id, InstanceState::Ready)?;
        match instance.state {
            InstanceState::Starting => {
                instance.state = InstanceState::Ready;
                instance.ready = Some(wall);
                instance.ready_at = Some(now);
                Ok(true)
            }
            InstanceState::Ready => Ok(false),
            from => Err(InvalidTransition {
                id,
                from,
                to: InstanceState::Ready,
            }),
        }
    }

    /// Marks an instance draining (it is being asked to stop). Returns false when
    /// it already was, or has exited.
    pub fn begin_drain(&mut self, id: InstanceId) -> bool {
        match self.instances.get_mut(&id) {
            Some(i) if matches!(i.state, InstanceState::Starting | InstanceState::Ready) => {
                i.state = InstanceState::Draining;
                true
            }
            _ => false,
        }
    }

    /// Marks each instance draining; returns those that were not already, with pids.
    pub fn begin_drain_all(&mut self, ids: Vec<InstanceId>) -> Vec<(InstanceId, u32)> {
        let mut drained = Vec::new();
        for id in ids {
            if self.begin_drain(id) {
                drained.push((id, self.instances[&id].pid));
            }
        }
        drained
    }

    /// Instances other than `keep` that still run and are not yet draining.
    pub fn others_running(&self, keep: InstanceId) -> Vec<InstanceId> {
        self.instances
            .values()
            .filter(|i| {
                i.id != keep && matches!(i.state, InstanceState::Starting | InstanceState::Ready)
            })
            .map(|i| i.id)
            .collect()
    }

    /// Every instance not yet draining or exited.
    pub fn running(&self) -> Vec<InstanceId> {
        self.instances
            .values()
            .filter(|i| matches!(i.state, InstanceState::Starting | InstanceState::Ready))
            .map(|i| i.id)
            .collect()
    }

    /// Removes an instance whose process was reaped.
    pub fn exited(&mut self, id: InstanceId, now: Instant) -> Option<Departure> {
        let current = self.current().map(|i| i.id);
        let mut instance = self.instances.remove(&id)?;
        let was_current = current == Some(id);
        instance.state = InstanceState::Exited;
        let ready_for = instance
            .ready_at
            .map(|at| now.saturating_duration_since(at));
        Some(Departure {
            instance,
            was_current,
            ready_for,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    fn instance_mut(
        &mut self,
        id: InstanceId,
        to: InstanceState,
    ) -> Result<&mut Instance, InvalidTransition> {
        self.instances.get_mut(&id).ok_or(InvalidTransition {
            id,
            from: InstanceState::Exited,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(table: &mut Table, pid: u32) -> InstanceId {
        let (generation, id) = table.reserve();
        table.spawned(id, generation, pid, Instant::now(), SystemTime::now());
        id
    }

    #[test]
    fn the_newest_ready_instance_is_current() {
        let mut t = Table::default();
        let a = spawn(&mut t, 100);
        assert!(t.current().is_none());
        assert_eq!(t.mark_ready(a, Instant::now(), SystemTime::now()), Ok(true));
        let b = spawn(&mut t, 101);
        assert_eq!(
            t.current().unwrap().id,
            a,
            "a starting instance is not current"
        );
        t.mark_ready(b, Instant::now(), SystemTime::now()).unwrap();
        assert_eq!(t.current().unwrap().id, b);
        assert_eq!(t.current().unwrap().generation, 2);
        assert_eq!(t.others_running(b), vec![a]);
        assert!(t.begin_drain(a));
        assert!(!t.begin_drain(a));
        assert_eq!(t.count(InstanceState::Draining), 1);
        assert!(t.others_running(b).is_empty());
    }

    #[test]
    fn ready_is_idempotent_and_refused_once_draining() {
        let mut t = Table::default();
        let a = spawn(&mut t, 100);
        t.mark_ready(a, Instant::now(), SystemTime::now()).unwrap();
        assert_eq!(
            t.mark_ready(a, Instant::now(), SystemTime::now()),
            Ok(false)
        );
        t.begin_drain(a);
        let err = t
            .mark_ready(a, Instant::now(), SystemTime::now())
            .unwrap_err();
        assert_eq!(err.from, InstanceState::Draining);
        assert_eq!(
            err.to_string(),
            "instance 1 is draining, it cannot become ready"
        );
    }

    #[test]
    fn departure_of_the_current_instance_is_reported() {
        let mut t = Table::default();
        let a = spawn(&mut t, 100);
        let t0 = Instant::now();
        t.mark_ready(a, t0, SystemTime::now()).unwrap();
        let b = spawn(&mut t, 101);
        let gone = t.exited(b, t0).unwrap();
        assert!(!gone.was_current);
        assert_eq!(gone.ready_for, None);
        let gone = t.exited(a, t0 + Duration::from_secs(3)).unwrap();
        assert!(gone.was_current);
        assert_eq!(gone.ready_for, Some(Duration::from_secs(3)));
        assert!(t.is_empty());
        assert!(t.exited(a, t0).is_none());
    }

    #[test]
    fn generations_only_grow() {
        let mut t = Table::default();
        assert_eq!(t.next_generation(), 1);
        assert_eq!(t.next_generation(), 2);
        let (generation, id) = t.reserve();
        assert_eq!((generation, id), (3, 1));
        t.spawned(id, generation, 1, Instant::now(), SystemTime::now());
        t.exited(id, Instant::now());
        assert_eq!(t.next_generation(), 4);
    }
}
