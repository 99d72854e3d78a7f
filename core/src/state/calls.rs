//! The table of state calls: every method of `org.ally.Cache1`, `org.ally.Atomic1` and
//! `org.ally.Locker1`, once. An entry names the method, gives its arguments (the
//! tuple that is the D-Bus body, decoded by the server and encoded by the client) and
//! its reply, who may make it, and what it does to a [`SharedStore`].
//!
//! Everything that carries a state call goes through here: the broker's zbus
//! interfaces and its state socket, the client over D-Bus or the state socket, and the
//! client's simulate mode, which applies the very same entry to a store in the process.
//! Adding a method is one entry below plus its `<method>` in `dbus/org.ally.*.xml`:
//! the broker's interfaces (`src/dbus/state1.rs`) dispatch by name through
//! [`find`] and serve those files as their introspection. [`disagreements`]
//! compares an interface's XML with the table; the tests below run it on
//! `dbus/*.xml`, so a test fails until the two agree.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zbus::Message;
use zbus::wire::{Signature, Type};

use super::{Hold, Mode, Owner, SharedStore, StateError};

pub const CACHE: &str = "org.ally.Cache1";
pub const ATOMIC: &str = "org.ally.Atomic1";
pub const LOCKER: &str = "org.ally.Locker1";

/// `Lock`/`RLock` timeout that waits for ever (0 tries once).
pub const WAIT_FOREVER: u64 = u64::MAX;

/// Owner ids from here up are connections, not instances: a caller that is not an
/// instance owns the locks it takes through one connection, as this plus the
/// connection's number.
pub const CONNECTION_OWNER: Owner = 1 << 63;

/// Whether the state socket serves `interface` (locks stay on the private socket,
/// where a connection's end releases what it holds).
pub fn on_state_socket(interface: &str) -> bool {
    interface == CACHE || interface == ATOMIC
}

/// Who may make a call (see DESIGN.md, "Who may call what").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requires {
    /// Anyone the transport admits: instances, admins, and on a bus any caller.
    Reader,
    /// Instances and admins.
    Writer,
    /// Admins that are not instances: repair.
    Operator,
}

/// The lock owner a call acts for, and the connection it came through (whose end
/// releases what was taken through it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub owner: Owner,
    pub conn: u64,
}

/// One D-Bus method of the shared state.
pub trait Call: 'static {
    const INTERFACE: &'static str;
    const MEMBER: &'static str;
    const REQUIRES: Requires;
    /// The names of the arguments, as the XML gives them.
    const ARG_NAMES: &'static [&'static str];
    /// The body of the call: a tuple of the arguments.
    type Args<'a>: Serialize + Deserialize<'a> + Type + fmt::Debug + Send + Sync;
    type Reply: Serialize + DeserializeOwned + Type + Send;
}

/// A call answered at once from the store.
pub trait Apply: Call {
    fn apply(store: &SharedStore, args: Self::Args<'_>) -> Result<Self::Reply, StateError>;
}

/// A call made for the caller's lock owner, which may wait: requires
/// [`Requires::Writer`].
pub trait ApplyHeld: Call {
    fn apply_held<'a>(
        store: &'a SharedStore,
        holder: Holder,
        args: Self::Args<'a>,
    ) -> Held<'a, Self::Reply>;

    /// The lock the call is about: its first argument.
    fn lock_name<'a>(args: &Self::Args<'a>) -> &'a str;
}

/// The outcome of an [`ApplyHeld`] call, once it has waited.
pub type Held<'a, R> = Pin<Box<dyn Future<Output = Result<R, StateError>> + Send + 'a>>;

/// Why a call got no reply from the table.
#[derive(Debug)]
pub enum Refused {
    /// The body is not the method's arguments.
    Args(zbus::Error),
    State(StateError),
    /// The reply could not be encoded.
    Reply(zbus::Error),
    /// A held call failed: the lock it was about, and why.
    Held {
        lock: String,
        error: StateError,
    },
}

impl From<StateError> for Refused {
    fn from(e: StateError) -> Self {
        Refused::State(e)
    }
}

/// How a table entry is answered from a message.
#[derive(Clone, Copy)]
pub enum Answer {
    /// At once: decodes the arguments, applies the call, encodes the reply. The
    /// caller checks [`Entry::requires`] first.
    Now(fn(&SharedStore, &Message) -> Result<Message, Refused>),
    /// Only where the caller's [`Holder`] is known (the private socket), and may
    /// wait: decodes, applies for the holder, encodes.
    Held(for<'a> fn(&'a SharedStore, Holder, &'a Message) -> HeldAnswer<'a>),
}

/// The reply to a held call, once it has waited.
pub type HeldAnswer<'a> = Pin<Box<dyn Future<Output = Result<Message, Refused>> + Send + 'a>>;

/// One entry of [`TABLE`], for dispatch by name.
pub struct Entry {
    pub interface: &'static str,
    pub member: &'static str,
    pub requires: Requires,
    pub arg_names: &'static [&'static str],
    /// The arguments as one struct, e.g. `(ssayt)`.
    pub args: &'static Signature,
    pub reply: &'static Signature,
    pub answer: Answer,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.interface, self.member)
    }
}

/// The entry for `interface.member`.
pub fn find(interface: &str, member: &str) -> Option<&'static Entry> {
    TABLE
        .iter()
        .find(|e| e.member == member && e.interface == interface)
}

fn answer_now<C: Apply>(store: &SharedStore, call: &Message) -> Result<Message, Refused> {
    let body = call.body();
    let args = body.deserialize::<C::Args<'_>>().map_err(Refused::Args)?;
    let reply = C::apply(store, args)?;
    Message::method_return(&call.header())
        .build(&reply)
        .map_err(Refused::Reply)
}

fn answer_held<'a, C: ApplyHeld>(
    store: &'a SharedStore,
    holder: Holder,
    call: &'a Message,
) -> HeldAnswer<'a> {
    Box::pin(async move {
        let body = call.body();
        let args = body.deserialize::<C::Args<'_>>().map_err(Refused::Args)?;
        let lock = C::lock_name(&args);
        let reply = C::apply_held(store, holder, args)
            .await
            .map_err(|error| Refused::Held {
                lock: lock.to_string(),
                error,
            })?;
        Message::method_return(&call.header())
            .build(&reply)
            .map_err(Refused::Reply)
    })
}

/// A `timeout_ms` argument as a wait: [`WAIT_FOREVER`] is none.
pub fn wait_for(timeout_ms: u64) -> Option<Duration> {
    (timeout_ms != WAIT_FOREVER).then(|| Duration::from_millis(timeout_ms))
}

/// One holder or waiter of a lock, D-Bus type `(tst)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct QueueEntry {
    /// The instance id, or [`CONNECTION_OWNER`] + a connection number for a caller
    /// that is not an instance.
    pub owner: u64,
    /// `read` or `write`.
    pub mode: String,
    /// Milliseconds since it was granted (holder) or asked for (waiter).
    pub for_ms: u64,
}

fn entries(holds: Vec<Hold>, now: Instant) -> Vec<QueueEntry> {
    holds
        .into_iter()
        .map(|h| QueueEntry {
            owner: h.owner,
            mode: h.mode.as_str().to_string(),
            for_ms: now.saturating_duration_since(h.since).as_millis() as u64,
        })
        .collect()
}

/// `Name<'a>(arg: Type, ...) -> Reply, Requires, now |store| body;` for a call
/// answered at once, `held |store, holder| future;` for one made for a lock owner.
macro_rules! calls {
    ($(
        $(#[$module_doc:meta])*
        mod $module:ident = $interface:ident {
            $(
                $(#[$doc:meta])*
                $name:ident<$lt:lifetime>($($arg:ident: $ty:ty),*) -> $reply:ty, $requires:ident,
                $kind:ident |$store:ident $(, $holder:ident)?| $body:expr;
            )*
        }
    )*) => {
        $(
            $(#[$module_doc])*
            pub mod $module {
                use super::*;
                $(
                    $(#[$doc])*
                    #[derive(Debug, Clone, Copy)]
                    pub struct $name;

                    impl Call for $name {
                        const INTERFACE: &'static str = $interface;
                        const MEMBER: &'static str = stringify!($name);
                        const REQUIRES: Requires = Requires::$requires;
                        const ARG_NAMES: &'static [&'static str] = &[$(stringify!($arg)),*];
                        type Args<$lt> = ($($ty,)*);
                        type Reply = $reply;
                    }

                    calls!(@apply $kind $name $lt ($($arg),*) |$store $(, $holder)?| $body);
                )*
            }
        )*

        /// Every state call.
        pub static TABLE: &[Entry] = &[$($(
            Entry {
                interface: $interface,
                member: stringify!($name),
                requires: Requires::$requires,
                arg_names: <$module::$name as Call>::ARG_NAMES,
                args: <<$module::$name as Call>::Args<'static> as Type>::SIGNATURE,
                reply: <<$module::$name as Call>::Reply as Type>::SIGNATURE,
                answer: calls!(@answer $kind $module::$name),
            },
        )*)*];
    };
    (@apply now $name:ident $lt:lifetime ($($arg:ident),*) |$store:ident| $body:expr) => {
        impl Apply for $name {
            fn apply<$lt>(
                $store: &SharedStore,
                ($($arg,)*): Self::Args<$lt>,
            ) -> Result<Self::Reply, StateError> {
                $body
            }
        }
    };
    (@apply held $name:ident $lt:lifetime ($($arg:ident),*) |$store:ident, $holder:ident| $body:expr) => {
        impl ApplyHeld for $name {
            fn apply_held<$lt>(
                $store: &$lt SharedStore,
                $holder: Holder,
                ($($arg,)*): Self::Args<$lt>,
            ) -> Held<$lt, Self::Reply> {
                Box::pin($body)
            }

            fn lock_name<$lt>(args: &Self::Args<$lt>) -> &$lt str {
                args.0
            }
        }
    };
    (@answer now $($path:ident)::+) => { Answer::Now(answer_now::<$($path)::+>) };
    (@answer held $($path:ident)::+) => { Answer::Held(answer_held::<$($path)::+>) };
}

calls! {
    /// `org.ally.Cache1`: a namespaced byte-string cache; `ttl_ms` 0 never expires.
    mod cache = CACHE {
        Set<'a>(namespace: &'a str, key: &'a str, value: &'a [u8], ttl_ms: u64) -> (), Writer,
            now |store| store.with(|s, now| s.cache.set(namespace, key, value.to_vec(), ttl_ms, now));
        /// `(found, value)`.
        Get<'a>(namespace: &'a str, key: &'a str) -> (bool, Vec<u8>), Reader,
            now |store| {
                let value = store.with(|s, now| s.cache.get(namespace, key, now))?;
                Ok((value.is_some(), value.unwrap_or_default()))
            };
        Delete<'a>(namespace: &'a str, key: &'a str) -> bool, Writer,
            now |store| store.with(|s, now| s.cache.delete(namespace, key, now));
        Exists<'a>(namespace: &'a str, key: &'a str) -> bool, Reader,
            now |store| store.with(|s, now| s.cache.exists(namespace, key, now));
        Keys<'a>(namespace: &'a str) -> Vec<String>, Reader,
            now |store| store.with(|s, now| s.cache.keys(namespace, now));
        Count<'a>(namespace: &'a str) -> u64, Reader,
            now |store| store.with(|s, now| s.cache.count(namespace, now));
        Flush<'a>(namespace: &'a str) -> u64, Writer,
            now |store| store.with(|s, now| s.cache.flush(namespace, now));
        SetIfAbsent<'a>(namespace: &'a str, key: &'a str, value: &'a [u8], ttl_ms: u64) -> bool, Writer,
            now |store| store.with(|s, now| s.cache.set_if_absent(namespace, key, value.to_vec(), ttl_ms, now));
        CompareAndSwap<'a>(namespace: &'a str, key: &'a str, old: &'a [u8], new: &'a [u8], ttl_ms: u64) -> bool, Writer,
            now |store| store.with(|s, now| s.cache.compare_and_swap(namespace, key, old, new.to_vec(), ttl_ms, now));
    }

    /// `org.ally.Atomic1`: named i64 counters, starting at 0, wrapping.
    mod atomic = ATOMIC {
        /// The new value.
        Add<'a>(name: &'a str, delta: i64) -> i64, Writer,
            now |store| store.with(|s, _| s.atomics.add(name, delta));
        Load<'a>(name: &'a str) -> i64, Reader,
            now |store| store.with(|s, _| s.atomics.load(name));
        Store<'a>(name: &'a str, value: i64) -> (), Writer,
            now |store| store.with(|s, _| s.atomics.store(name, value));
        /// The old value.
        Swap<'a>(name: &'a str, value: i64) -> i64, Writer,
            now |store| store.with(|s, _| s.atomics.swap(name, value));
        CompareAndSwap<'a>(name: &'a str, old: i64, new: i64) -> bool, Writer,
            now |store| store.with(|s, _| s.atomics.compare_and_swap(name, old, new));
        List<'a>() -> Vec<(String, i64)>, Reader,
            now |store| Ok(store.with(|s, _| s.atomics.list()));
    }

    /// `org.ally.Locker1`: named fair read/write locks.
    mod locker = LOCKER {
        /// The write lock: whether it was acquired within `timeout_ms`.
        Lock<'a>(name: &'a str, timeout_ms: u64) -> bool, Writer,
            held |store, holder| store.lock(name, holder.owner, holder.conn, Mode::Write, wait_for(timeout_ms));
        RLock<'a>(name: &'a str, timeout_ms: u64) -> bool, Writer,
            held |store, holder| store.lock(name, holder.owner, holder.conn, Mode::Read, wait_for(timeout_ms));
        Unlock<'a>(name: &'a str) -> (), Writer,
            held |store, holder| std::future::ready(store.unlock(name, holder.owner, Mode::Write));
        RUnlock<'a>(name: &'a str) -> (), Writer,
            held |store, holder| std::future::ready(store.unlock(name, holder.owner, Mode::Read));
        /// `(holders, waiters)`.
        Queues<'a>(name: &'a str) -> (Vec<QueueEntry>, Vec<QueueEntry>), Reader,
            now |store| {
                let (holders, waiters) = store.with(|s, _| s.locker.queues(name))?;
                let now = Instant::now();
                Ok((entries(holders, now), entries(waiters, now)))
            };
        Names<'a>() -> Vec<String>, Reader,
            now |store| Ok(store.with(|s, _| s.locker.names()));
        /// Drops every holder; how many there were.
        ForceUnlock<'a>(name: &'a str) -> u32, Operator,
            now |store| store.force_release(name);
    }
}

/// How the methods of `interface` that an introspection XML describes (a file of
/// `dbus/`, or what a server serves) differ from the table's entries: every method
/// with the same argument names and types and the same reply type, nothing more or
/// less. Empty when they agree.
pub fn disagreements(interface: &str, xml: &str) -> Vec<String> {
    let Some(start) = xml.find(&format!("<interface name=\"{interface}\"")) else {
        return vec![format!("no interface {interface} in the XML")];
    };
    let block = &xml[start..];
    let block = &block[..block.find("</interface>").unwrap_or(block.len())];
    let mut found = Vec::new();
    let mut wrong = Vec::new();
    for method in block.split("<method ").skip(1) {
        let method = &method[..method.find("</method>").unwrap_or(method.len())];
        let name = attribute(method, "name");
        let (mut ins, mut outs) = (Vec::new(), String::new());
        let mut count_out = 0;
        for arg in method.split("<arg ").skip(1) {
            let arg = &arg[..arg.find("/>").unwrap_or(arg.len())];
            if attribute(arg, "direction") == "out" {
                outs.push_str(&attribute(arg, "type"));
                count_out += 1;
            } else {
                ins.push(format!(
                    "{}:{}",
                    attribute(arg, "name"),
                    attribute(arg, "type")
                ));
            }
        }
        let Some(entry) = find(interface, &name) else {
            wrong.push(format!(
                "{interface}.{name} is in the XML, not in the table"
            ));
            continue;
        };
        found.push(entry.member);
        let args = entry.args.to_string();
        let args = args
            .strip_prefix('(')
            .and_then(|a| a.strip_suffix(')'))
            .unwrap_or(&args);
        let types = Signature::try_from(args)
            .map(|s| match s {
                Signature::Structure(fields) => fields.iter().map(|f| f.to_string()).collect(),
                Signature::Unit => Vec::new(),
                one => vec![one.to_string()],
            })
            .unwrap_or_default();
        let table: Vec<String> = entry
            .arg_names
            .iter()
            .zip(&types)
            .map(|(n, t)| format!("{n}:{t}"))
            .collect();
        if ins != table {
            wrong.push(format!(
                "{entry:?}: arguments {} in the XML, {} in the table",
                ins.join(" "),
                table.join(" ")
            ));
        }
        let reply = entry.reply.to_string();
        let reply_agrees = match count_out {
            0 | 1 => reply == outs,
            _ => reply == format!("({outs})"),
        };
        if !reply_agrees {
            wrong.push(format!(
                "{entry:?}: reply {outs} in the XML, {reply} in the table"
            ));
        }
    }
    for entry in TABLE.iter().filter(|e| e.interface == interface) {
        if !found.contains(&entry.member) {
            wrong.push(format!("{entry:?} is in the table, not in the XML"));
        }
    }
    wrong
}

/// The value of attribute `name` in the tag that starts `tag`.
fn attribute(tag: &str, name: &str) -> String {
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    let Some(at) = tag.find(&format!("{name}=\"")) else {
        return String::new();
    };
    let rest = &tag[at + name.len() + 2..];
    rest[..rest.find('"').unwrap_or(rest.len())].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Limits;

    #[test]
    fn the_table_and_the_interface_xml_agree() {
        let files = [
            (CACHE, include_str!("../../../dbus/org.ally.Cache1.xml")),
            (ATOMIC, include_str!("../../../dbus/org.ally.Atomic1.xml")),
            (LOCKER, include_str!("../../../dbus/org.ally.Locker1.xml")),
        ];
        for (interface, xml) in files {
            assert_eq!(disagreements(interface, xml), Vec::<String>::new());
        }
        let mut wrong = include_str!("../../../dbus/org.ally.Cache1.xml").to_string();
        wrong = wrong.replacen("name=\"ttl_ms\"", "name=\"ttl\"", 1);
        wrong = wrong.replacen("<method name=\"Keys\">", "<method name=\"Keyz\">", 1);
        assert_eq!(
            disagreements(CACHE, &wrong),
            vec![
                "org.ally.Cache1.Set: arguments namespace:s key:s value:ay ttl:t in the XML, \
                 namespace:s key:s value:ay ttl_ms:t in the table",
                "org.ally.Cache1.Keyz is in the XML, not in the table",
                "org.ally.Cache1.Keys is in the table, not in the XML",
            ]
        );
    }

    #[test]
    fn an_entry_answers_a_message_as_a_client_encoded_it() {
        let store = SharedStore::new(Limits::default());
        let call = |member: &str, message: Message| {
            let Answer::Now(answer) = find(CACHE, member).unwrap().answer else {
                panic!("{member} is answered at once");
            };
            answer(&store, &message)
        };
        let set: <cache::Set as Call>::Args<'_> = ("ns", "k", b"v", 0);
        let message = Message::method_call("/org/ally", "Set")
            .interface(CACHE)
            .build(&set)
            .unwrap();
        call("Set", message).unwrap();
        let message = Message::method_call("/org/ally", "Get")
            .interface(CACHE)
            .build(&("ns", "k"))
            .unwrap();
        let reply = call("Get", message).unwrap();
        let found: <cache::Get as Call>::Reply = reply.body().deserialize().unwrap();
        assert_eq!(found, (true, b"v".to_vec()));
        let wrong = Message::method_call("/org/ally", "Get")
            .interface(CACHE)
            .build(&(1u64,))
            .unwrap();
        assert!(matches!(call("Get", wrong), Err(Refused::Args(_))));
        let empty = Message::method_call("/org/ally", "Get")
            .interface(CACHE)
            .build(&("", "k"))
            .unwrap();
        assert!(matches!(
            call("Get", empty),
            Err(Refused::State(StateError::InvalidArgument(_)))
        ));
    }

    #[tokio::test]
    async fn held_calls_act_for_their_holder() {
        let store = SharedStore::new(Limits::default());
        let one = Holder { owner: 1, conn: 1 };
        let two = Holder { owner: 2, conn: 2 };
        assert!(
            locker::Lock::apply_held(&store, one, ("x", 0))
                .await
                .unwrap()
        );
        assert!(
            !locker::Lock::apply_held(&store, two, ("x", 0))
                .await
                .unwrap()
        );
        assert!(
            locker::Unlock::apply_held(&store, two, ("x",))
                .await
                .is_err()
        );
        let (holders, _) = locker::Queues::apply(&store, ("x",)).unwrap();
        assert_eq!(holders[0].owner, 1);
        locker::Unlock::apply_held(&store, one, ("x",))
            .await
            .unwrap();
        assert!(locker::Names::apply(&store, ()).unwrap().is_empty());
        assert_eq!(wait_for(WAIT_FOREVER), None);
        assert_eq!(wait_for(5), Some(Duration::from_millis(5)));
    }

    #[tokio::test]
    async fn a_held_entry_answers_a_message_and_names_the_lock_it_refuses() {
        let store = SharedStore::new(Limits::default());
        let Answer::Held(answer) = find(LOCKER, "Lock").unwrap().answer else {
            panic!("Lock is held");
        };
        let lock = |args: (&str, u64)| {
            Message::method_call("/org/ally", "Lock")
                .interface(LOCKER)
                .build(&args)
                .unwrap()
        };
        let one = Holder { owner: 1, conn: 1 };
        let reply = answer(&store, one, &lock(("x", 0))).await.unwrap();
        assert!(reply.body().deserialize::<bool>().unwrap());
        let refused = answer(&store, one, &lock(("", 0))).await;
        assert!(matches!(
            refused,
            Err(Refused::Held { lock, error: StateError::InvalidArgument(_) }) if lock.is_empty()
        ));
        let wrong = Message::method_call("/org/ally", "Lock")
            .interface(LOCKER)
            .build(&("x",))
            .unwrap();
        assert!(matches!(
            answer(&store, one, &wrong).await,
            Err(Refused::Args(_))
        ));
    }

    #[test]
    fn only_cache_and_counters_are_on_the_state_socket() {
        for entry in TABLE {
            let held = matches!(entry.answer, Answer::Held(_));
            assert!(
                !(held && on_state_socket(entry.interface)),
                "{entry:?} needs a lock owner"
            );
            if held {
                assert_eq!(entry.requires, Requires::Writer, "{entry:?}");
            }
        }
    }
}
