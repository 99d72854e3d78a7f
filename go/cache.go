package ally

import (
	"time"
)

const cacheInterface = "org.ally.Cache1."

// Cache is one namespace of the app's shared cache: byte strings under keys, kept by
// the broker so they survive reloads and crashes (in simulate mode, by the process).
// An expired key is never returned, listed or counted. Safe for concurrent use.
type Cache struct {
	namespace string
}

// NewCache is the namespace of the app's shared cache. Every instance that names the
// same namespace sees the same keys.
func NewCache(namespace string) *Cache { return &Cache{namespace: namespace} }

// Namespace is the cache's namespace.
func (c *Cache) Namespace() string { return c.namespace }

// Set stores value under key, replacing any value and TTL; a ttl of 0 never expires
// (less than a millisecond is one).
func (c *Cache) Set(key string, value []byte, ttl time.Duration) error {
	if !Managed() {
		return simulated("Set", simulatedState.Set(c.namespace, key, value, ttlOf(ttl)))
	}
	return stateCall(cacheInterface+"Set", nil, c.namespace, key, nonNil(value), ttlMs(ttl))
}

// Get returns the key's value and true, or nil and false when it is absent.
func (c *Cache) Get(key string) ([]byte, bool, error) {
	if !Managed() {
		v, ok, err := simulatedState.Get(c.namespace, key)
		if !ok {
			v = nil
		}
		return v, ok, simulated("Get", err)
	}
	var found bool
	var value []byte
	if err := stateCall(cacheInterface+"Get", []interface{}{&found, &value}, c.namespace, key); err != nil {
		return nil, false, err
	}
	if !found {
		value = nil
	}
	return value, found, nil
}

// Delete removes the key and tells whether it was there.
func (c *Cache) Delete(key string) (bool, error) {
	if !Managed() {
		ok, err := simulatedState.Delete(c.namespace, key)
		return ok, simulated("Delete", err)
	}
	var deleted bool
	err := stateCall(cacheInterface+"Delete", []interface{}{&deleted}, c.namespace, key)
	return deleted, err
}

// Exists tells whether the key is there.
func (c *Cache) Exists(key string) (bool, error) {
	if !Managed() {
		ok, err := simulatedState.Exists(c.namespace, key)
		return ok, simulated("Exists", err)
	}
	var exists bool
	err := stateCall(cacheInterface+"Exists", []interface{}{&exists}, c.namespace, key)
	return exists, err
}

// Keys lists the namespace's live keys, sorted.
func (c *Cache) Keys() ([]string, error) {
	if !Managed() {
		keys, err := simulatedState.Keys(c.namespace)
		return keys, simulated("Keys", err)
	}
	var keys []string
	if err := stateCall(cacheInterface+"Keys", []interface{}{&keys}, c.namespace); err != nil {
		return nil, err
	}
	if keys == nil {
		keys = []string{}
	}
	return keys, nil
}

// Count is the number of live keys in the namespace.
func (c *Cache) Count() (uint64, error) {
	if !Managed() {
		n, err := simulatedState.Count(c.namespace)
		return n, simulated("Count", err)
	}
	var n uint64
	err := stateCall(cacheInterface+"Count", []interface{}{&n}, c.namespace)
	return n, err
}

// Flush deletes every key of the namespace and returns how many there were.
func (c *Cache) Flush() (uint64, error) {
	if !Managed() {
		n, err := simulatedState.Flush(c.namespace)
		return n, simulated("Flush", err)
	}
	var n uint64
	err := stateCall(cacheInterface+"Flush", []interface{}{&n}, c.namespace)
	return n, err
}

// SetIfAbsent stores value only if the key is absent (or expired) and tells whether it
// did. Of two racing callers exactly one wins.
func (c *Cache) SetIfAbsent(key string, value []byte, ttl time.Duration) (bool, error) {
	if !Managed() {
		ok, err := simulatedState.SetIfAbsent(c.namespace, key, value, ttlOf(ttl))
		return ok, simulated("SetIfAbsent", err)
	}
	var stored bool
	err := stateCall(cacheInterface+"SetIfAbsent", []interface{}{&stored}, c.namespace, key, nonNil(value), ttlMs(ttl))
	return stored, err
}

// CompareAndSwap replaces the value (and the TTL) with new only if the key exists with
// exactly old, and tells whether it did. An absent key never matches: create it with
// SetIfAbsent.
func (c *Cache) CompareAndSwap(key string, old, new []byte, ttl time.Duration) (bool, error) {
	if !Managed() {
		ok, err := simulatedState.CompareAndSwap(c.namespace, key, old, new, ttlOf(ttl))
		return ok, simulated("CompareAndSwap", err)
	}
	var swapped bool
	err := stateCall(cacheInterface+"CompareAndSwap", []interface{}{&swapped}, c.namespace, key, nonNil(old), nonNil(new), ttlMs(ttl))
	return swapped, err
}

// nonNil: godbus encodes a nil []byte fine, but an explicit empty slice keeps the
// signature "ay" whatever the caller passed.
func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}
