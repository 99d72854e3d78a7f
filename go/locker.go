package ally

import (
	"context"
	"fmt"
	"time"

	"github.com/ally-rs/ally/go/internal/state"
	"github.com/godbus/dbus/v5"
)

const lockerInterface = "org.ally.Locker1."

// Locker is one of the app's shared read/write locks, kept by the broker and served in
// strict arrival order: a writer waiting behind readers is never overtaken by readers
// that come later. A lock belongs to the instance that took it and is released when
// that instance exits, even by SIGKILL; the next waiters are then granted. Locks are
// not reentrant. In simulate mode the process is the one owner.
//
// Lock calls always go through the private connection to the broker, whose lifetime
// lock ownership follows. Safe for concurrent use.
type Locker struct {
	name string
}

// NewLocker is the app's shared lock name.
func NewLocker(name string) *Locker { return &Locker{name: name} }

// Name is the lock's name.
func (l *Locker) Name() string { return l.name }

// Forever, as a timeout, waits without end.
const Forever time.Duration = -1

// Lock takes the lock for writing, waiting as long as it takes.
func (l *Locker) Lock() error { return l.acquire(context.Background(), true, Forever) }

// RLock takes the lock for reading, waiting as long as it takes.
func (l *Locker) RLock() error { return l.acquire(context.Background(), false, Forever) }

// LockTimeout takes the lock for writing, waiting at most timeout (0 tries once,
// Forever waits without end); ErrTimeout when it could not be had in time.
func (l *Locker) LockTimeout(timeout time.Duration) error {
	return l.acquire(context.Background(), true, timeout)
}

// RLockTimeout is LockTimeout for reading.
func (l *Locker) RLockTimeout(timeout time.Duration) error {
	return l.acquire(context.Background(), false, timeout)
}

// LockContext takes the lock for writing, waiting until ctx ends (then it returns
// ctx's error). A grant that comes after ctx ended is given back.
func (l *Locker) LockContext(ctx context.Context) error { return l.acquire(ctx, true, Forever) }

// RLockContext is LockContext for reading.
func (l *Locker) RLockContext(ctx context.Context) error { return l.acquire(ctx, false, Forever) }

// TryLock takes the lock for writing if it is free now, and tells whether it did.
func (l *Locker) TryLock() (bool, error) { return l.try(true) }

// TryRLock takes the lock for reading if it can be had now, and tells whether it did.
func (l *Locker) TryRLock() (bool, error) { return l.try(false) }

// Unlock releases the lock held for writing; ErrNotOwner when this instance does not
// hold it so.
func (l *Locker) Unlock() error { return l.release(true) }

// RUnlock releases one read hold; ErrNotOwner when this instance holds none.
func (l *Locker) RUnlock() error { return l.release(false) }

func (l *Locker) try(write bool) (bool, error) {
	err := l.acquire(context.Background(), write, 0)
	if err == nil {
		return true, nil
	}
	if e, ok := err.(*Error); ok && e.Name == errTimeout {
		return false, nil
	}
	return false, err
}

func verb(write bool) string {
	if write {
		return "Lock"
	}
	return "RLock"
}

func (l *Locker) timeoutError(write bool, timeout time.Duration) error {
	msg := fmt.Sprintf("%s %q: not acquired within %v", verb(write), l.name, timeout)
	if timeout == 0 {
		msg = fmt.Sprintf("%s %q: it is taken", verb(write), l.name)
	} else if timeout < 0 {
		msg = fmt.Sprintf("%s %q: the wait was ended (the connection closed)", verb(write), l.name)
	}
	return &Error{Method: verb(write), Name: errTimeout, Message: msg}
}

func (l *Locker) acquire(ctx context.Context, write bool, timeout time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !Managed() {
		ok, err := simulatedState.Acquire(ctx, l.name, simulatedOwner, write, timeout)
		if err != nil {
			return simulated(verb(write), err)
		}
		if !ok {
			return l.timeoutError(write, timeout)
		}
		return nil
	}
	in := self()
	conn, err := in.linkConn(ctx, in.bus, verb(write), false)
	if err != nil {
		return err
	}
	ms := uint64(waitForever)
	if timeout >= 0 {
		ms = uint64(timeout / time.Millisecond)
		if timeout > 0 && ms == 0 {
			ms = 1
		}
	}
	if deadline, ok := ctx.Deadline(); ok {
		left := time.Until(deadline)
		if left <= 0 {
			return context.DeadlineExceeded
		}
		if d := uint64(left/time.Millisecond) + 1; d < ms {
			ms = d
		}
	}
	// Not CallWithContext: godbus forgets a call whose context ends, so a grant
	// arriving afterwards would leave the lock held with nobody to release it.
	done := make(chan *dbus.Call, 1)
	call := in.object(conn).Go(lockerInterface+verb(write), 0, done, l.name, ms)
	select {
	case <-call.Done:
		err := l.acquired(conn, call, write, timeout)
		if e, ok := err.(*Error); ok && e.Name == errTimeout && ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	case <-ctx.Done():
		go func() {
			<-call.Done
			var acquired bool
			if call.Err == nil && call.Store(&acquired) == nil && acquired {
				_ = l.release(write)
			}
		}()
		return ctx.Err()
	}
}

func (l *Locker) acquired(conn *dbus.Conn, call *dbus.Call, write bool, timeout time.Duration) error {
	if call.Err != nil {
		// A waiter does not survive the broker's restart, nor is a lock request
		// repeated: it may have been granted.
		return failed(conn, verb(write), call.Err)
	}
	var acquired bool
	if err := call.Store(&acquired); err != nil {
		return &Error{Method: verb(write), Name: errFailed, Message: "unexpected reply: " + err.Error(), Err: err}
	}
	if !acquired {
		return l.timeoutError(write, timeout)
	}
	return nil
}

func (l *Locker) release(write bool) error {
	method := "Unlock"
	if !write {
		method = "RUnlock"
	}
	if !Managed() {
		return simulated(method, simulatedState.Release(l.name, simulatedOwner, write))
	}
	in := self()
	_, err := in.invoke(context.Background(), in.bus, lockerInterface+method, l.name)
	return err
}

// LockHold is one holder or waiter of a lock.
type LockHold struct {
	// Owner is the instance id (in simulate mode, ID()); 2⁶³ + a connection number
	// for a caller that is not an instance.
	Owner uint64
	// Write tells a writer from a reader.
	Write bool
	// For is how long it has held or waited (0 in simulate mode).
	For time.Duration
}

// Queues returns the lock's holders, in the order granted, and its waiters, in the
// order they will be granted: for monitoring and tests.
func (l *Locker) Queues() (holders, waiters []LockHold, err error) {
	if !Managed() {
		hs, ws, err := simulatedState.Queues(l.name)
		if err != nil {
			return nil, nil, simulated("Queues", err)
		}
		conv := func(in []state.Hold) []LockHold {
			out := make([]LockHold, 0, len(in))
			for _, h := range in {
				out = append(out, LockHold{Owner: ID(), Write: h.Write})
			}
			return out
		}
		return conv(hs), conv(ws), nil
	}
	in := self()
	c, err := in.invoke(context.Background(), in.bus, lockerInterface+"Queues", l.name)
	if err != nil {
		return nil, nil, err
	}
	var rawH, rawW []struct {
		Owner uint64
		Mode  string
		ForMs uint64
	}
	if err := c.Store(&rawH, &rawW); err != nil {
		return nil, nil, &Error{Method: "Queues", Name: errFailed, Message: "unexpected reply: " + err.Error(), Err: err}
	}
	conv := func(in []struct {
		Owner uint64
		Mode  string
		ForMs uint64
	}) []LockHold {
		out := make([]LockHold, 0, len(in))
		for _, h := range in {
			out = append(out, LockHold{Owner: h.Owner, Write: h.Mode == "write", For: time.Duration(h.ForMs) * time.Millisecond})
		}
		return out
	}
	return conv(rawH), conv(rawW), nil
}
