package state

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A wait whose context ends just as the lock is granted gives the grant back: the
// waiter's select sees both at once and picks either, so over many rounds both
// branches run.
func TestCancelRacingGrantLeaksNothing(t *testing.T) {
	s := New(DefaultLimits)
	for round := 0; round < 64; round++ {
		if ok, err := s.Acquire(context.Background(), "l", 1, true, 0); !ok || err != nil {
			t.Fatalf("round %d: the lock is not free: %v %v", round, ok, err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			ok, err := s.Acquire(ctx, "l", 2, true, -1)
			if ok {
				err = s.Release("l", 2, true)
			}
			done <- err
		}()
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, w, _ := s.Queues("l")
			if len(w) == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the waiter never queued")
			}
			time.Sleep(time.Millisecond)
		}
		// Grant and cancel with the store locked, so the waiter wakes to both.
		s.mu.Lock()
		cancel()
		s.removeHolder("l", s.locks["l"].holders[0])
		s.mu.Unlock()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Fatal(err)
		}
		if h, w, _ := s.Queues("l"); len(h) != 0 || len(w) != 0 {
			t.Fatalf("round %d: left holders %v, waiters %v", round, h, w)
		}
	}
}

func TestTTLAndCompareAndSwap(t *testing.T) {
	s := New(DefaultLimits)
	now := time.Unix(1000, 0)
	s.now = func() time.Time { return now }
	if err := s.Set("ns", "k", []byte("v"), 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	now = now.Add(9 * time.Millisecond)
	if ok, _ := s.Exists("ns", "k"); !ok {
		t.Fatal("expired early")
	}
	now = now.Add(time.Millisecond)
	if ok, _ := s.Exists("ns", "k"); ok {
		t.Fatal("alive at its deadline")
	}
	if ok, _ := s.CompareAndSwap("ns", "k", []byte("v"), []byte("w"), 0); ok {
		t.Fatal("CompareAndSwap matched an expired key")
	}
	if s.total != 0 {
		t.Fatalf("%d bytes still counted", s.total)
	}
}

func TestLimits(t *testing.T) {
	s := New(Limits{MaxKeyBytes: 4, MaxValueBytes: 4, MaxKeysPerNamespace: 2, MaxTotalBytes: 100, MaxLockWaitersPerOwner: 1, MaxLockWaitersPerLock: 1})
	var e *Error
	if err := s.Set("ns", "toolong", nil, 0); !errors.As(err, &e) || e.Name != "org.ally.Error.LimitExceeded" {
		t.Fatalf("long key: %v", err)
	}
	if err := s.Set("ns", "k", []byte("12345"), 0); !errors.As(err, &e) || e.Name != "org.ally.Error.LimitExceeded" {
		t.Fatalf("long value: %v", err)
	}
	_ = s.Set("ns", "a", nil, 0)
	_ = s.Set("ns", "b", nil, 0)
	if err := s.Set("ns", "c", nil, 0); err == nil {
		t.Fatal("a third key in a namespace of at most 2")
	}
	if err := s.Set("ns", "a", []byte("x"), 0); err != nil {
		t.Fatalf("replacing a key at the limit: %v", err)
	}
}
