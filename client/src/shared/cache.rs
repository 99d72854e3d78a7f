//! [`Cache`]: one namespace of the app's shared cache.

use std::time::Duration;

use ally_core::state::calls::cache::{
    CompareAndSwap, Count, Delete, Exists, Flush, Get, Keys, Set, SetIfAbsent,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{call, ttl_ms};
use crate::Ally;
use crate::error::{Error, ErrorKind, Result};

/// One namespace of the cache: [`Ally::cache`].
#[derive(Debug, Clone)]
pub struct Cache {
    ally: Ally,
    namespace: String,
}

impl Cache {
    pub(crate) fn new(ally: Ally, namespace: &str) -> Cache {
        Cache {
            ally,
            namespace: namespace.to_string(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Stores `value` under `key`, replacing any value; `ttl` `None` never expires.
    pub async fn set(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let args = (&*self.namespace, key, value.as_ref(), ttl_ms(ttl));
        call::<Set>(&self.ally, args).await
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let (found, value) = call::<Get>(&self.ally, (&self.namespace, key)).await?;
        Ok(found.then_some(value))
    }

    /// [`get`](Self::get) as UTF-8; a value that is not is `InvalidArgument`.
    pub async fn get_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| {
                Error::local(
                    ErrorKind::InvalidArgument,
                    format!("{}/{key} is not UTF-8", self.namespace),
                )
            }),
        }
    }

    /// Stores `value` as JSON.
    pub async fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.set(key, to_json(value)?, ttl).await
    }

    /// Reads a JSON value; one that does not parse as `T` is `InvalidArgument`.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::local(
                    ErrorKind::InvalidArgument,
                    format!("{}/{key} is not the JSON expected: {e}", self.namespace),
                )
            }),
        }
    }

    /// Removes `key`; whether it was there.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        call::<Delete>(&self.ally, (&self.namespace, key)).await
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        call::<Exists>(&self.ally, (&self.namespace, key)).await
    }

    /// The live keys, sorted.
    pub async fn keys(&self) -> Result<Vec<String>> {
        call::<Keys>(&self.ally, (&self.namespace,)).await
    }

    pub async fn count(&self) -> Result<u64> {
        call::<Count>(&self.ally, (&self.namespace,)).await
    }

    /// Removes every key of the namespace; how many there were.
    pub async fn flush(&self) -> Result<u64> {
        call::<Flush>(&self.ally, (&self.namespace,)).await
    }

    /// Stores `value` only if `key` is absent; whether it did.
    pub async fn set_if_absent(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let args = (&*self.namespace, key, value.as_ref(), ttl_ms(ttl));
        call::<SetIfAbsent>(&self.ally, args).await
    }

    /// Replaces the value with `new` (and its TTL with `ttl`) only if it is `old`;
    /// whether it did. An absent key never matches.
    pub async fn compare_and_swap(
        &self,
        key: &str,
        old: impl AsRef<[u8]>,
        new: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let args = (
            &*self.namespace,
            key,
            old.as_ref(),
            new.as_ref(),
            ttl_ms(ttl),
        );
        call::<CompareAndSwap>(&self.ally, args).await
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| {
        Error::local(
            ErrorKind::InvalidArgument,
            format!("cannot encode JSON: {e}"),
        )
    })
}
