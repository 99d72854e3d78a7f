//! The config document as written: the keys it may hold and the TOML type of
//! each, checked by serde. What the values mean is checked in
//! [`super::typed`].
//!
//! A value of the wrong type is refused with "expected X, found Y", X saying
//! what the key wants in the operator's words; the key and the place are added
//! from the error's span (see [`super::locate`]).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::{Spanned, Value};

pub const COMMAND_EXAMPLE: &str =
    r#"the program to run, e.g. command = ["/usr/bin/myapp", "--flag"]"#;
pub const DURATION_EXAMPLE: &str = r#"a duration like "30s" or "1m 30s""#;
pub const MODE_EXPECTED: &str = r#"octal permission bits like 0o660 or "0660""#;
pub const SIZE_EXPECTED: &str =
    r#"a positive size in bytes like 1048576 or "1MiB" (units B, KiB, MiB, GiB, KB, MB, GB)"#;
pub const NETWORKS: &str = "one of tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket";
pub const ADDRESS_EXAMPLE: &str = r#"an address like ":8080" or "/run/app.sock""#;

pub type Command = Array<Text<AString>, CommandArray>;
pub type Environment = Table<BTreeMap<String, Spanned<Text<EnvValue>>>, EnvTable>;
pub type Listen = Array<ListenItem, ListenArray>;
pub type ListenItem = Table<RawListen, ListenTable>;
pub type AllowListen = Array<Text<AllowEntry>, AllowEntry>;

/// The whole file, `/etc/ally/<app>.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub command: Option<Spanned<Command>>,
    pub working_directory: Option<Spanned<Text<AbsolutePath>>>,
    pub user: Option<Spanned<IntOrText<UserId>>>,
    pub group: Option<Spanned<IntOrText<GroupId>>>,
    pub environment: Option<Spanned<Environment>>,
    pub stop_signal: Option<Spanned<Text<SignalName>>>,
    pub ready_timeout: Option<Spanned<DurationText>>,
    pub stop_timeout: Option<Spanned<DurationText>>,
    pub restart: Option<Spanned<Text<RestartName>>>,
    pub restart_delay: Option<Spanned<DurationText>>,
    pub max_draining: Option<Spanned<Integer>>,
    pub listener_linger: Option<Spanned<DurationText>>,
    pub listen: Option<Spanned<Listen>>,
    pub allow_listen: Option<Spanned<AllowListen>>,
    pub limits: Option<Spanned<Table<RawLimits, LimitsTable>>>,
    pub state_busy_poll: Option<Spanned<DurationText>>,
    pub start_priority: Option<Spanned<Text<PriorityName>>>,
    pub drain_idle: Option<Spanned<DurationText>>,
    pub sockets: Option<Spanned<Text<SocketsName>>>,
    pub ready: Option<Spanned<Text<ReadyName>>>,
    pub ready_delay: Option<Spanned<DurationText>>,
    pub ready_probe: Option<Spanned<Command>>,
    pub watchdog: Option<Spanned<DurationText>>,
    pub check: Option<Spanned<Command>>,
    pub check_timeout: Option<Spanned<DurationText>>,
    pub watch: Option<Spanned<WatchValue>>,
    pub history: Option<Spanned<Integer>>,
    pub metrics_address: Option<Spanned<Text<MetricsAddress>>>,
    pub stdout: Option<Spanned<Text<OutputName>>>,
    pub stderr: Option<Spanned<Text<OutputName>>>,
}

/// A `[[listen]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub network: Option<Spanned<Text<NetworkName>>>,
    pub address: Option<Spanned<Text<AddressText>>>,
    pub backlog: Option<Spanned<Integer>>,
    pub reuse_port: Option<Spanned<Bool>>,
    pub mode: Option<Spanned<IntOrText<Mode>>>,
    pub name: Option<Spanned<Text<FdName>>>,
}

/// `[limits]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_key_bytes: Option<Spanned<IntOrText<Size>>>,
    pub max_value_bytes: Option<Spanned<IntOrText<Size>>>,
    pub max_keys_per_namespace: Option<Spanned<Integer>>,
    pub max_total_bytes: Option<Spanned<IntOrText<Size>>>,
    pub max_lock_waiters_per_connection: Option<Spanned<Integer>>,
    pub max_lock_waiters_per_lock: Option<Spanned<Integer>>,
    pub max_connections: Option<Spanned<Integer>>,
    pub max_connections_per_uid: Option<Spanned<Integer>>,
    pub handshake_timeout: Option<Spanned<DurationText>>,
    pub max_message_bytes: Option<Spanned<IntOrText<Size>>>,
}

/// What a key wants, in the words of "expected ...".
pub trait Expected {
    const TEXT: &'static str;
}

macro_rules! expected {
    ($($name:ident => $text:expr;)*) => {$(
        #[derive(Debug)]
        pub struct $name;
        impl Expected for $name {
            const TEXT: &'static str = $text;
        }
    )*};
}

expected! {
    AString => "a string";
    CommandArray => "an array of strings: the program to run, e.g. command = [\"/usr/bin/myapp\", \"--flag\"]";
    AbsolutePath => "an absolute path";
    UserId => "a user name or a numeric id";
    GroupId => "a group name or a numeric id";
    EnvTable => r#"a table of strings, e.g. environment = { LANG = "C.UTF-8" }"#;
    EnvValue => "a string value";
    SignalName => r#"a signal name like "SIGTERM", "TERM" or "SIGUSR2""#;
    RestartName => r#""on-failure", "always" or "never""#;
    PriorityName => r#""normal" or "idle""#;
    OutputName => r#""journal" or "inherit""#;
    SocketsName => r#""dbus" or "listen-fds""#;
    ReadyName => r#""dbus", "notify", "delay" or "probe""#;
    FdName => r#"a name for LISTEN_FDNAMES like "http""#;
    ListenArray => r#"an array of tables: [[listen]] with network = "tcp" and address = ":8080""#;
    ListenTable => r#"a table with network = "tcp" and address = ":8080""#;
    NetworkName => "a network name like \"tcp\" or \"unix\"";
    AddressText => r#"an address like ":8080" or "/run/app.sock""#;
    AllowEntry => r#"an array of "NETWORK:ADDRESS" strings like ["tcp::443", "unix:/run/web/"]"#;
    LimitsTable => "a table ([limits])";
    Mode => MODE_EXPECTED;
    Size => SIZE_EXPECTED;
    MetricsAddress => r#"a TCP address like "127.0.0.1:9102""#;
}

/// A short rendering of a value for "found ..." in messages.
pub fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_string(),
    }
}

fn expected_found(expected: &str, found: &Value) -> String {
    format!("expected {expected}, found {}", describe(found))
}

/// A scalar: read as any TOML value, then matched, so a refusal can say what
/// it found. The refusal is raised inside the visit, where the deserializer
/// still knows the value's place.
fn scalar<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    accept: impl FnOnce(Value) -> Result<T, String>,
) -> Result<T, D::Error> {
    deserializer.deserialize_any(ScalarVisitor(accept))
}

struct ScalarVisitor<F>(F);

impl<F> ScalarVisitor<F> {
    fn accept<T, E: de::Error>(self, value: Value) -> Result<T, E>
    where
        F: FnOnce(Value) -> Result<T, String>,
    {
        (self.0)(value).map_err(E::custom)
    }
}

impl<'de, T, F: FnOnce(Value) -> Result<T, String>> Visitor<'de> for ScalarVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        self.accept(Value::Boolean(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.accept(Value::Integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        match i64::try_from(v) {
            Ok(v) => self.accept(Value::Integer(v)),
            Err(_) => Err(E::custom(format!("integer {v} is too large"))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.accept(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        self.accept(Value::String(v.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.accept(Value::Array(Vec::new()))
    }

    /// A table, or a datetime, which toml hands over as a table of one private key.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let datetime = match map.next_key::<String>() {
            Ok(Some(key)) if key == toml_datetime_field() => {
                map.next_value::<String>().ok().and_then(|s| s.parse().ok())
            }
            _ => None,
        };
        match datetime {
            Some(datetime) => self.accept(Value::Datetime(datetime)),
            None => self.accept(Value::Table(toml::Table::new())),
        }
    }
}

/// The key under which toml passes a datetime through serde.
fn toml_datetime_field() -> &'static str {
    "$__toml_private_datetime"
}

/// A string.
#[derive(Debug)]
pub struct Text<E>(pub String, PhantomData<E>);

impl<'de, E: Expected> Deserialize<'de> for Text<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, |value| match value {
            Value::String(s) => Ok(Text(s, PhantomData)),
            other => Err(expected_found(E::TEXT, &other)),
        })
    }
}

/// An integer or a string, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar {
    Int(i64),
    Text(String),
}

/// An integer, or a string for a name or a number with a unit.
#[derive(Debug)]
pub struct IntOrText<E>(pub Scalar, PhantomData<E>);

impl<'de, E: Expected> Deserialize<'de> for IntOrText<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, |value| match value {
            Value::Integer(n) => Ok(IntOrText(Scalar::Int(n), PhantomData)),
            Value::String(s) => Ok(IntOrText(Scalar::Text(s), PhantomData)),
            other => Err(expected_found(E::TEXT, &other)),
        })
    }
}

/// A count: a positive integer.
#[derive(Debug)]
pub struct Integer(pub u64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, |value| match value {
            Value::Integer(n) if n > 0 => Ok(Integer(n as u64)),
            Value::Integer(n) => Err(format!("expected a positive integer, found {n}")),
            other => Err(expected_found("a positive integer", &other)),
        })
    }
}

/// `true` or `false`.
#[derive(Debug)]
pub struct Bool(pub bool);

impl<'de> Deserialize<'de> for Bool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, |value| match value {
            Value::Boolean(b) => Ok(Bool(b)),
            other => Err(expected_found("true or false", &other)),
        })
    }
}

/// `watch`: `true`, `false`, or an array of paths.
#[derive(Debug)]
pub enum WatchValue {
    Switch(bool),
    Paths(Vec<Spanned<Text<AString>>>),
}

pub const WATCH_EXPECTED: &str =
    r#"true, false or an array of paths, e.g. watch = ["/srv/web/current/bin/web"]"#;

impl<'de> Deserialize<'de> for WatchValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WatchVisitor)
    }
}

struct WatchVisitor;

impl<'de> Visitor<'de> for WatchVisitor {
    type Value = WatchValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(WATCH_EXPECTED)
    }

    fn visit_bool<Er: de::Error>(self, v: bool) -> Result<WatchValue, Er> {
        Ok(WatchValue::Switch(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WatchValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(WatchValue::Paths(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<WatchValue, A::Error> {
        Err(de::Error::custom(format!(
            "expected {WATCH_EXPECTED}, found table"
        )))
    }

    fn visit_i64<Er: de::Error>(self, v: i64) -> Result<WatchValue, Er> {
        Err(Er::custom(expected_found(
            WATCH_EXPECTED,
            &Value::Integer(v),
        )))
    }

    fn visit_u64<Er: de::Error>(self, v: u64) -> Result<WatchValue, Er> {
        Err(Er::custom(format!(
            "expected {WATCH_EXPECTED}, found integer {v}"
        )))
    }

    fn visit_f64<Er: de::Error>(self, v: f64) -> Result<WatchValue, Er> {
        Err(Er::custom(expected_found(WATCH_EXPECTED, &Value::Float(v))))
    }

    fn visit_str<Er: de::Error>(self, v: &str) -> Result<WatchValue, Er> {
        Err(Er::custom(expected_found(
            WATCH_EXPECTED,
            &Value::String(v.to_string()),
        )))
    }
}

/// A duration, written as a string with units.
#[derive(Debug)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, |value| match value {
            Value::String(s) => Ok(DurationText(s)),
            Value::Integer(n) => Err(format!(
                "expected a duration string like \"{n}s\", found integer {n} (durations need a unit)"
            )),
            other => Err(expected_found(
                &format!("{DURATION_EXAMPLE} (a string)"),
                &other,
            )),
        })
    }
}

/// An array, each item with its place in the file.
#[derive(Debug)]
pub struct Array<T, E>(pub Vec<Spanned<T>>, PhantomData<E>);

/// A table, read as `T` (a struct with its own keys, or a map).
#[derive(Debug)]
pub struct Table<T, E>(pub T, PhantomData<E>);

/// The container's expected shape, then what else the document held, for a
/// refusal.
macro_rules! refuse_other_types {
    () => {
        fn visit_bool<Er: de::Error>(self, v: bool) -> Result<Self::Value, Er> {
            Err(Er::custom(expected_found(E::TEXT, &Value::Boolean(v))))
        }
        fn visit_i64<Er: de::Error>(self, v: i64) -> Result<Self::Value, Er> {
            Err(Er::custom(expected_found(E::TEXT, &Value::Integer(v))))
        }
        fn visit_u64<Er: de::Error>(self, v: u64) -> Result<Self::Value, Er> {
            Err(Er::custom(format!(
                "expected {}, found integer {v}",
                E::TEXT
            )))
        }
        fn visit_f64<Er: de::Error>(self, v: f64) -> Result<Self::Value, Er> {
            Err(Er::custom(expected_found(E::TEXT, &Value::Float(v))))
        }
        fn visit_str<Er: de::Error>(self, v: &str) -> Result<Self::Value, Er> {
            Err(Er::custom(expected_found(
                E::TEXT,
                &Value::String(v.to_string()),
            )))
        }
    };
}

struct ArrayVisitor<T, E>(PhantomData<(T, E)>);

impl<'de, T: Deserialize<'de>, E: Expected> Visitor<'de> for ArrayVisitor<T, E> {
    type Value = Array<T, E>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(E::TEXT)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Array(items, PhantomData))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(format!(
            "expected {}, found table",
            E::TEXT
        )))
    }

    refuse_other_types!();
}

impl<'de, T: Deserialize<'de>, E: Expected> Deserialize<'de> for Array<T, E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ArrayVisitor(PhantomData))
    }
}

struct TableVisitor<T, E>(PhantomData<(T, E)>);

impl<'de, T: Deserialize<'de>, E: Expected> Visitor<'de> for TableVisitor<T, E> {
    type Value = Table<T, E>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(E::TEXT)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let inner = T::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Table(inner, PhantomData))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(format!(
            "expected {}, found array",
            E::TEXT
        )))
    }

    refuse_other_types!();
}

impl<'de, T: Deserialize<'de>, E: Expected> Deserialize<'de> for Table<T, E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TableVisitor(PhantomData))
    }
}
