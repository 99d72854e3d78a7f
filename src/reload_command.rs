//! `ally reload APP`: asks for a reload and, on a terminal or with `--json`,
//! shows its phases as the broker's signals tell them (see `follow`), over
//! the private socket or the bus alike. Not on a terminal it prints the result
//! line only, as it always has: scripts and `systemctl reload` rely on it.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::{MatchRule, Message, MessageStream, OwnedVariant};

use crate::cli::ReloadArgs;
use crate::control::{Target, reload_result};
use crate::follow::{Follow, Input};
use crate::progress::{JsonEvent, Progress};

/// How long a reload's `done` may lag behind `Reload`'s answer before it is
/// given up on: both are sent at once, on one connection.
const DONE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The result line only.
    Result,
    Quiet,
    Lines,
    Json,
}

pub async fn reload(args: ReloadArgs) -> Result<i32, String> {
    let output = if args.json {
        Output::Json
    } else if args.quiet {
        Output::Quiet
    } else if std::io::stdout().is_terminal() {
        Output::Lines
    } else {
        Output::Result
    };
    let target = Target::connect(&args.app, &args.connect).await?;
    let result = match output {
        Output::Result | Output::Quiet => target.reload().await,
        Output::Lines | Output::Json => follow(&target, output).await?,
    };
    let line = reload_result(&args.app, &result);
    match output {
        Output::Json => {
            let (success, message) = match &line {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            let mut fields = serde_json::Map::new();
            fields.insert("success".into(), success.into());
            fields.insert("message".into(), message.as_str().into());
            let object = JsonEvent {
                phase: "result",
                generation: result.as_ref().map_or(0, |g| *g),
                fields,
                time: now().as_secs_f64(),
            };
            println!("{object}");
        }
        Output::Result | Output::Lines => {
            if let Ok(line) = &line {
                println!("{line}");
            }
        }
        Output::Quiet => {}
    }
    line.map(|_| 0)
}

/// Calls `Reload` with the signals subscribed to first, and prints the phases
/// of its generation until it is done and no older instance that reports its
/// tasks still drains. Returns `Reload`'s answer.
async fn follow(target: &Target, output: Output) -> Result<Result<u64, String>, String> {
    let mut signals = subscribe(target).await?;
    let reload = target.reload();
    tokio::pin!(reload);
    let mut follow = Follow::default();
    let mut result = None;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    while !follow.finished() {
        let input = tokio::select! {
            answer = &mut reload, if result.is_none() => {
                result = Some(answer.clone());
                grace.as_mut().reset(tokio::time::Instant::now() + DONE_GRACE);
                Input::Replied(answer)
            }
            message = signals.next() => match message {
                Some(Ok(message)) => match read_signal(&message) {
                    Some(input) => input,
                    None => continue,
                },
                Some(Err(_)) => continue,
                None if result.is_some() => break,
                None => return Err("the broker closed the connection during the reload".into()),
            },
            () = &mut grace, if !follow.settled() => break,
        };
        for (generation, progress) in follow.feed(input) {
            show(output, generation, &progress);
        }
    }
    match result {
        Some(result) => Ok(result),
        None => Ok(reload.await),
    }
}

fn show(output: Output, generation: u64, progress: &Progress) {
    match output {
        Output::Lines => {
            if let Some(line) = progress.line(generation) {
                println!("{line}");
            }
        }
        Output::Json => println!("{}", progress.json(generation, now())),
        Output::Result | Output::Quiet => {}
    }
}

/// The broker's signals, from now on: on a bus only its own (other brokers
/// serve the same interface); on the private socket, where signals carry no
/// sender, all of them.
async fn subscribe(target: &Target) -> Result<MessageStream, String> {
    let conn = target.connection();
    let mut rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface(ally_core::proxy::INTERFACE)
        .path(ally_core::proxy::PATH);
    if conn.unique_name().is_some() {
        let name = target.proxy().inner().destination().to_owned();
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| format!("cannot reach the bus: {e}"))?;
        let owner = dbus
            .get_name_owner(name.clone())
            .await
            .map_err(|e| format!("{name} has no owner on the bus: {e}"))?;
        rule = rule.sender(owner.to_string());
    }
    let rule = rule.build().map_err(|e| e.to_string())?;
    MessageStream::for_match_rule(rule, conn, None)
        .await
        .map_err(|e| format!("cannot subscribe to the broker's signals: {e}"))
}

/// What a signal says about a reload, if anything.
fn read_signal(message: &Message) -> Option<Input> {
    let header = message.header();
    let body = message.body();
    match header.member()?.as_str() {
        "ReloadProgress" => {
            let (generation, phase, detail): (u64, String, HashMap<String, OwnedVariant>) =
                body.deserialize().ok()?;
            let progress = Progress::from_detail(&phase, &detail).ok()?;
            Some(Input::Progress {
                generation,
                progress,
            })
        }
        "InstanceReported" => {
            let (instance, _generation, report): (u64, u64, HashMap<String, OwnedVariant>) =
                body.deserialize().ok()?;
            let tasks = u32::try_from(report.get("tasks")?.try_clone().ok()?).ok()?;
            Some(Input::Tasks { instance, tasks })
        }
        "InstanceStateChanged" => {
            let (instance, state): (u64, String) = body.deserialize().ok()?;
            (state == "exited").then_some(Input::Exited { instance })
        }
        _ => None,
    }
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
