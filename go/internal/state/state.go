// Package state is simulate mode's broker state: the cache, counters and read/write
// locks of ally_core::state, with the same semantics and limits, in the process.
package state

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"sync"
	"time"
)

// Error is a refusal, named as the broker names it on D-Bus.
type Error struct {
	Name    string // e.g. "org.ally.Error.InvalidArgument"
	Message string
}

func (e *Error) Error() string { return e.Message }

func invalid(format string, args ...interface{}) error {
	return &Error{"org.ally.Error.InvalidArgument", fmt.Sprintf(format, args...)}
}

func limit(format string, args ...interface{}) error {
	return &Error{"org.ally.Error.LimitExceeded", fmt.Sprintf(format, args...)}
}

func notOwner(format string, args ...interface{}) error {
	return &Error{"org.ally.Error.NotOwner", fmt.Sprintf(format, args...)}
}

// Limits are the broker's [limits] with their defaults.
type Limits struct {
	MaxKeyBytes, MaxValueBytes, MaxKeysPerNamespace, MaxTotalBytes uint64
	MaxLockWaitersPerOwner, MaxLockWaitersPerLock                  uint64
}

// DefaultLimits are the broker's defaults.
var DefaultLimits = Limits{
	MaxKeyBytes: 1024, MaxValueBytes: 1 << 20, MaxKeysPerNamespace: 100000,
	MaxTotalBytes: 64 << 20, MaxLockWaitersPerOwner: 128, MaxLockWaitersPerLock: 1024,
}

func (l Limits) checkName(what, name string) error {
	if name == "" {
		return invalid("the %s must not be empty", what)
	}
	if uint64(len(name)) > l.MaxKeyBytes {
		return limit("the %s is %d bytes, more than max_key_bytes (%d)", what, len(name), l.MaxKeyBytes)
	}
	return nil
}

func (l Limits) checkValue(v []byte) error {
	if uint64(len(v)) > l.MaxValueBytes {
		return limit("the value is %d bytes, more than max_value_bytes (%d)", len(v), l.MaxValueBytes)
	}
	return nil
}

// Store is one simulated broker's state. Safe for concurrent use.
type Store struct {
	limits Limits
	now    func() time.Time

	mu       sync.Mutex
	spaces   map[string]map[string]entry
	total    uint64
	counters map[string]int64
	locks    map[string]*lock
	waits    map[uint64]uint64 // owner -> requests waiting
}

type entry struct {
	value   []byte
	expires time.Time // zero: never
}

// New is an empty store.
func New(limits Limits) *Store {
	return &Store{
		limits: limits, now: time.Now,
		spaces: map[string]map[string]entry{}, counters: map[string]int64{},
		locks: map[string]*lock{}, waits: map[uint64]uint64{},
	}
}

// ---- cache ----

func entryBytes(ns, key string, value []byte) uint64 {
	return uint64(len(ns) + len(key) + len(value))
}

// live returns the key's entry, dropping it first if it expired.
func (s *Store) live(ns, key string, now time.Time) (entry, bool) {
	e, ok := s.spaces[ns][key]
	if ok && !e.expires.IsZero() && !now.Before(e.expires) {
		s.remove(ns, key)
		return entry{}, false
	}
	return e, ok
}

func (s *Store) expireSpace(ns string, now time.Time) {
	for key := range s.spaces[ns] {
		s.live(ns, key, now)
	}
}

func (s *Store) remove(ns, key string) bool {
	space := s.spaces[ns]
	e, ok := space[key]
	if !ok {
		return false
	}
	delete(space, key)
	if len(space) == 0 {
		delete(s.spaces, ns)
	}
	s.total -= entryBytes(ns, key, e.value)
	return true
}

func (s *Store) checkKey(ns, key string) error {
	if err := s.limits.checkName("namespace", ns); err != nil {
		return err
	}
	return s.limits.checkName("key", key)
}

func (s *Store) checkStore(ns, key string, value []byte, now time.Time) error {
	if err := s.checkKey(ns, key); err != nil {
		return err
	}
	if err := s.limits.checkValue(value); err != nil {
		return err
	}
	old, exists := s.live(ns, key, now)
	var freed uint64
	if exists {
		freed = entryBytes(ns, key, old.value)
	} else {
		s.expireSpace(ns, now)
		if n := uint64(len(s.spaces[ns])); n >= s.limits.MaxKeysPerNamespace {
			return limit("namespace %q already has %d keys (max_keys_per_namespace)", ns, n)
		}
	}
	if total := s.total - freed + entryBytes(ns, key, value); total > s.limits.MaxTotalBytes {
		return limit("the cache would hold %d bytes, more than max_total_bytes (%d)", total, s.limits.MaxTotalBytes)
	}
	return nil
}

func (s *Store) store(ns, key string, value []byte, ttl time.Duration, now time.Time) {
	s.remove(ns, key)
	e := entry{value: append([]byte(nil), value...)}
	if ttl > 0 {
		e.expires = now.Add(ttl)
	}
	if s.spaces[ns] == nil {
		s.spaces[ns] = map[string]entry{}
	}
	s.spaces[ns][key] = e
	s.total += entryBytes(ns, key, value)
}

// Set stores value, replacing any value and TTL; ttl 0 never expires.
func (s *Store) Set(ns, key string, value []byte, ttl time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if err := s.checkStore(ns, key, value, now); err != nil {
		return err
	}
	s.store(ns, key, value, ttl, now)
	return nil
}

// Get returns the value and whether the key is there.
func (s *Store) Get(ns, key string) ([]byte, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkKey(ns, key); err != nil {
		return nil, false, err
	}
	e, ok := s.live(ns, key, s.now())
	if !ok {
		return []byte{}, false, nil
	}
	return append([]byte(nil), e.value...), true, nil
}

// Delete removes the key; whether it existed.
func (s *Store) Delete(ns, key string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkKey(ns, key); err != nil {
		return false, err
	}
	if _, ok := s.live(ns, key, s.now()); !ok {
		return false, nil
	}
	return s.remove(ns, key), nil
}

// Exists tells whether the key is there.
func (s *Store) Exists(ns, key string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkKey(ns, key); err != nil {
		return false, err
	}
	_, ok := s.live(ns, key, s.now())
	return ok, nil
}

// Keys lists the live keys of a namespace, sorted.
func (s *Store) Keys(ns string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("namespace", ns); err != nil {
		return nil, err
	}
	s.expireSpace(ns, s.now())
	keys := []string{}
	for k := range s.spaces[ns] {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys, nil
}

// Count is the number of live keys of a namespace.
func (s *Store) Count(ns string) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("namespace", ns); err != nil {
		return 0, err
	}
	s.expireSpace(ns, s.now())
	return uint64(len(s.spaces[ns])), nil
}

// Flush removes a namespace; how many live keys it had.
func (s *Store) Flush(ns string) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("namespace", ns); err != nil {
		return 0, err
	}
	s.expireSpace(ns, s.now())
	n := uint64(0)
	for k := range s.spaces[ns] {
		s.remove(ns, k)
		n++
	}
	return n, nil
}

// SetIfAbsent stores only if the key is absent (or expired); whether it did.
func (s *Store) SetIfAbsent(ns, key string, value []byte, ttl time.Duration) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if err := s.checkKey(ns, key); err != nil {
		return false, err
	}
	if _, ok := s.live(ns, key, now); ok {
		return false, nil
	}
	if err := s.checkStore(ns, key, value, now); err != nil {
		return false, err
	}
	s.store(ns, key, value, ttl, now)
	return true, nil
}

// CompareAndSwap replaces the value (and TTL) only if the key exists with exactly old;
// an absent key never matches.
func (s *Store) CompareAndSwap(ns, key string, old, new []byte, ttl time.Duration) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if err := s.checkKey(ns, key); err != nil {
		return false, err
	}
	if err := s.limits.checkValue(new); err != nil {
		return false, err
	}
	e, ok := s.live(ns, key, now)
	if !ok || !bytes.Equal(e.value, old) {
		return false, nil
	}
	if err := s.checkStore(ns, key, new, now); err != nil {
		return false, err
	}
	s.store(ns, key, new, ttl, now)
	return true, nil
}

// ---- counters ----

func (s *Store) slot(name string) (string, error) {
	if err := s.limits.checkName("counter name", name); err != nil {
		return "", err
	}
	if _, ok := s.counters[name]; !ok {
		if n := uint64(len(s.counters)); n >= s.limits.MaxKeysPerNamespace {
			return "", limit("there are already %d counters (max_keys_per_namespace)", n)
		}
		s.counters[name] = 0
	}
	return name, nil
}

// Add adds delta, wrapping on overflow, and returns the new value.
func (s *Store) Add(name string, delta int64) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.slot(name); err != nil {
		return 0, err
	}
	s.counters[name] += delta // Go's signed arithmetic wraps
	return s.counters[name], nil
}

// Load returns the counter, 0 if never written; it creates nothing.
func (s *Store) Load(name string) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("counter name", name); err != nil {
		return 0, err
	}
	return s.counters[name], nil
}

// StoreValue sets the counter.
func (s *Store) StoreValue(name string, v int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.slot(name); err != nil {
		return err
	}
	s.counters[name] = v
	return nil
}

// Swap sets the counter and returns the previous value.
func (s *Store) Swap(name string, v int64) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.slot(name); err != nil {
		return 0, err
	}
	old := s.counters[name]
	s.counters[name] = v
	return old, nil
}

// CompareAndSwapCounter stores new if the counter is old; whether it did.
func (s *Store) CompareAndSwapCounter(name string, old, new int64) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("counter name", name); err != nil {
		return false, err
	}
	if s.counters[name] != old {
		return false, nil
	}
	if _, err := s.slot(name); err != nil {
		return false, err
	}
	s.counters[name] = new
	return true, nil
}

// ---- locks ----

type hold struct {
	owner   uint64
	write   bool
	granted chan struct{} // closed when a waiter is granted
}

type lock struct {
	holders []*hold
	queue   []*hold
}

func (l *lock) compatible(write bool) bool {
	if len(l.holders) == 0 {
		return true
	}
	return !write && !l.holders[0].write
}

// advance grants the queue from its front: a run of readers, or one writer.
func (l *lock) advance() {
	for len(l.queue) > 0 && l.compatible(l.queue[0].write) {
		h := l.queue[0]
		l.queue = l.queue[1:]
		l.holders = append(l.holders, h)
		close(h.granted)
	}
}

func (s *Store) dropIfIdle(name string) {
	if l := s.locks[name]; l != nil && len(l.holders) == 0 && len(l.queue) == 0 {
		delete(s.locks, name)
	}
}

// Acquire takes lock name for owner, writing or reading: at once when nobody waits and
// it is compatible with the holders, else in arrival order. It waits until the timeout
// (0 tries once, negative waits for ever) or ctx ends; false when not had in time. A
// ctx that ends returns its error, and a grant that came meanwhile is given back.
func (s *Store) Acquire(ctx context.Context, name string, owner uint64, write bool, timeout time.Duration) (bool, error) {
	s.mu.Lock()
	if err := s.limits.checkName("lock name", name); err != nil {
		s.mu.Unlock()
		return false, err
	}
	l := s.locks[name]
	if l == nil {
		if n := uint64(len(s.locks)); n >= s.limits.MaxKeysPerNamespace {
			s.mu.Unlock()
			return false, limit("%d locks are already held or waited for (max_keys_per_namespace)", n)
		}
		l = &lock{}
		s.locks[name] = l
	}
	h := &hold{owner: owner, write: write, granted: make(chan struct{})}
	if len(l.queue) == 0 && l.compatible(write) {
		l.holders = append(l.holders, h)
		s.mu.Unlock()
		return true, nil
	}
	if timeout == 0 {
		s.dropIfIdle(name)
		s.mu.Unlock()
		return false, nil
	}
	if n := uint64(len(l.queue)); n >= s.limits.MaxLockWaitersPerLock {
		s.mu.Unlock()
		return false, limit("%d requests already wait for lock %q (max_lock_waiters_per_lock)", n, name)
	}
	if n := s.waits[owner]; n >= s.limits.MaxLockWaitersPerOwner {
		s.mu.Unlock()
		return false, limit("%d lock requests made through this connection already wait (max_lock_waiters_per_connection)", n)
	}
	l.queue = append(l.queue, h)
	s.waits[owner]++
	s.mu.Unlock()

	var expired <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	var ctxErr error
	select {
	case <-h.granted:
	case <-expired:
	case <-ctx.Done():
		ctxErr = ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.waits[owner]--
	if s.waits[owner] == 0 {
		delete(s.waits, owner)
	}
	select {
	case <-h.granted:
		if ctxErr == nil {
			return true, nil
		}
		s.removeHolder(name, h) // granted, but nobody wants it any more
		return false, ctxErr
	default:
	}
	for i, w := range l.queue {
		if w == h {
			l.queue = append(l.queue[:i:i], l.queue[i+1:]...)
			break
		}
	}
	l.advance()
	s.dropIfIdle(name)
	return false, ctxErr
}

func (s *Store) removeHolder(name string, h *hold) {
	l := s.locks[name]
	if l == nil {
		return
	}
	for i, x := range l.holders {
		if x == h {
			l.holders = append(l.holders[:i:i], l.holders[i+1:]...)
			break
		}
	}
	l.advance()
	s.dropIfIdle(name)
}

// Release gives back one hold of owner in the mode: Unlock (write) or RUnlock (read).
func (s *Store) Release(name string, owner uint64, write bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("lock name", name); err != nil {
		return err
	}
	verb := "read-unlock"
	if write {
		verb = "unlock"
	}
	l := s.locks[name]
	if l == nil || len(l.holders) == 0 {
		return notOwner("cannot %s %q: it is not locked", verb, name)
	}
	for _, h := range l.holders {
		if h.owner == owner && h.write == write {
			s.removeHolder(name, h)
			return nil
		}
	}
	for _, h := range l.holders {
		if h.owner == owner {
			if write {
				return notOwner("cannot %s %q: the caller holds it for reading (use RUnlock)", verb, name)
			}
			return notOwner("cannot %s %q: the caller holds it for writing (use Unlock)", verb, name)
		}
	}
	return notOwner("cannot %s %q: the caller does not hold it", verb, name)
}

// Hold is one holder or waiter of a lock.
type Hold struct {
	Owner uint64
	Write bool
}

// Queues returns a lock's holders (in the order granted) and waiters (in the order
// they will be granted).
func (s *Store) Queues(name string) (holders, waiters []Hold, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.limits.checkName("lock name", name); err != nil {
		return nil, nil, err
	}
	holders, waiters = []Hold{}, []Hold{}
	if l := s.locks[name]; l != nil {
		for _, h := range l.holders {
			holders = append(holders, Hold{h.owner, h.write})
		}
		for _, h := range l.queue {
			waiters = append(waiters, Hold{h.owner, h.write})
		}
	}
	return holders, waiters, nil
}
