//! `ally cache`, `ally atomic`, `ally lock`: the application's shared state from the
//! command line, as an admin (see `crate::state` for what an admin's locks are).

use std::io::Write;

use ally_core::proxy::StateProxies;
use ally_core::state::calls::{CONNECTION_OWNER, QueueEntry, atomic, cache, locker};
use serde_json::json;

use crate::cli::{AtomicCommand, CacheCommand, ConnectArgs, LockCommand};
use crate::control::{Target, describe_error};

async fn proxies(app: &str, connect: &ConnectArgs) -> Result<StateProxies, String> {
    let target = Target::connect(app, connect).await?;
    StateProxies::on(target.connection(), Some(app))
        .await
        .map_err(|e| format!("cannot create the state proxies: {e}"))
}

fn ms(ttl: Option<std::time::Duration>) -> u64 {
    ttl.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

fn json_value(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => json!(s),
        Err(_) => json!(bytes),
    }
}

pub async fn cache(cmd: CacheCommand) -> Result<i32, String> {
    match cmd {
        CacheCommand::Get {
            app,
            namespace,
            key,
            json,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            let (found, value) = p
                .call::<cache::Get>((&namespace, &key))
                .await
                .map_err(describe_error)?;
            if json {
                let value = if found {
                    json_value(&value)
                } else {
                    json!(null)
                };
                println!("{}", json!({"found": found, "value": value}));
            } else if found {
                std::io::stdout()
                    .write_all(&value)
                    .map_err(|e| e.to_string())?;
            }
            if found {
                Ok(0)
            } else {
                Err(format!("{namespace}/{key}: no such key"))
            }
        }
        CacheCommand::Set {
            app,
            namespace,
            key,
            value,
            ttl,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            p.call::<cache::Set>((&namespace, &key, value.as_bytes(), ms(ttl)))
                .await
                .map_err(describe_error)?;
            Ok(0)
        }
        CacheCommand::Del {
            app,
            namespace,
            key,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            if p.call::<cache::Delete>((&namespace, &key))
                .await
                .map_err(describe_error)?
            {
                Ok(0)
            } else {
                Err(format!("{namespace}/{key}: no such key"))
            }
        }
        CacheCommand::Keys {
            app,
            namespace,
            json,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            let keys = p
                .call::<cache::Keys>((&namespace,))
                .await
                .map_err(describe_error)?;
            if json {
                println!("{}", json!(keys));
            } else {
                for k in keys {
                    println!("{k}");
                }
            }
            Ok(0)
        }
        CacheCommand::Count {
            app,
            namespace,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            println!(
                "{}",
                p.call::<cache::Count>((&namespace,))
                    .await
                    .map_err(describe_error)?
            );
            Ok(0)
        }
        CacheCommand::Flush {
            app,
            namespace,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            println!(
                "{}",
                p.call::<cache::Flush>((&namespace,))
                    .await
                    .map_err(describe_error)?
            );
            Ok(0)
        }
    }
}

pub async fn atomic(cmd: AtomicCommand) -> Result<i32, String> {
    match cmd {
        AtomicCommand::Get { app, name, connect } => {
            let p = proxies(&app, &connect).await?;
            println!(
                "{}",
                p.call::<atomic::Load>((&name,))
                    .await
                    .map_err(describe_error)?
            );
        }
        AtomicCommand::Set {
            app,
            name,
            value,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            p.call::<atomic::Store>((&name, value))
                .await
                .map_err(describe_error)?;
        }
        AtomicCommand::Add {
            app,
            name,
            delta,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            println!(
                "{}",
                p.call::<atomic::Add>((&name, delta))
                    .await
                    .map_err(describe_error)?
            );
        }
        AtomicCommand::List { app, json, connect } => {
            let p = proxies(&app, &connect).await?;
            let all = p.call::<atomic::List>(()).await.map_err(describe_error)?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> =
                    all.into_iter().map(|(k, v)| (k, json!(v))).collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (name, value) in all {
                    println!("{name}\t{value}");
                }
            }
        }
    }
    Ok(0)
}

fn owner(id: u64) -> String {
    if id >= CONNECTION_OWNER {
        format!("connection {}", id - CONNECTION_OWNER)
    } else {
        format!("instance {id}")
    }
}

fn render(name: &str, holders: &[QueueEntry], waiters: &[QueueEntry]) -> String {
    let mut out = format!("{name}:");
    if holders.is_empty() && waiters.is_empty() {
        out.push_str(" free");
    }
    for (what, list) in [("held", holders), ("waits", waiters)] {
        for e in list {
            out.push_str(&format!(
                "\n  {what:<5} {:<6} by {} for {} ms",
                e.mode,
                owner(e.owner),
                e.for_ms
            ));
        }
    }
    out
}

pub async fn lock(cmd: LockCommand) -> Result<i32, String> {
    match cmd {
        LockCommand::Status {
            app,
            name,
            json,
            connect,
        } => {
            let p = proxies(&app, &connect).await?;
            let names = match name {
                Some(n) => vec![n],
                None => p.call::<locker::Names>(()).await.map_err(describe_error)?,
            };
            let mut all = Vec::new();
            for n in names {
                let (holders, waiters) = p
                    .call::<locker::Queues>((&n,))
                    .await
                    .map_err(describe_error)?;
                all.push((n, holders, waiters));
            }
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(n, h, w)| json!({"name": n, "holders": h, "waiters": w}))
                    .collect();
                println!("{}", json!(v));
            } else {
                for (n, h, w) in &all {
                    println!("{}", render(n, h, w));
                }
            }
        }
        LockCommand::Release { app, name, connect } => {
            let p = proxies(&app, &connect).await?;
            let n = p
                .call::<locker::ForceUnlock>((&name,))
                .await
                .map_err(describe_error)?;
            println!("{name}: released {n} holder(s)");
        }
    }
    Ok(0)
}
