package ally

import (
	"errors"
	"math"
	"time"

	"github.com/ally-rs/ally/go/internal/state"
	"github.com/godbus/dbus/v5"
)

// Simulate mode's state: one store for the process, which is one lock owner, as an
// instance is for the broker.
var simulatedState = state.New(state.DefaultLimits)

const simulatedOwner = 1

// stateConnection is the connection for Cache1 and Atomic1 calls: the state socket
// (ALLY_STATE_ADDRESS) when it can be reached, else the private connection.
func (in *instance) stateConnection() (*dbus.Conn, error) {
	in.stateOnce.Do(func() {
		if in.stateAddr == "" || in.envErr != nil {
			return
		}
		if conn, err := dial(in.stateAddr); err == nil {
			in.stateConn = conn
		}
	})
	if in.stateConn != nil {
		return in.stateConn, nil
	}
	return in.connection()
}

// stateCall makes a Cache1 or Atomic1 call and stores the reply in out.
func stateCall(method string, out []interface{}, args ...interface{}) error {
	in := self()
	conn, err := in.stateConnection()
	if err != nil {
		return err
	}
	c := in.object(conn).Call(method, 0, args...)
	if c.Err != nil {
		return callError(memberOf(method), c.Err)
	}
	if err := c.Store(out...); err != nil {
		return &Error{Method: memberOf(method), Name: errFailed, Message: "unexpected reply: " + err.Error(), Err: err}
	}
	return nil
}

func memberOf(method string) string {
	for i := len(method) - 1; i >= 0; i-- {
		if method[i] == '.' {
			return method[i+1:]
		}
	}
	return method
}

// simulated turns a simulated store's refusal into the *Error the broker's would be.
func simulated(method string, err error) error {
	var se *state.Error
	if errors.As(err, &se) {
		return &Error{Method: method, Name: se.Name, Message: se.Message}
	}
	return err
}

// ttlMs is a TTL on the wire: 0 (or negative) is none; less than a millisecond is one.
func ttlMs(ttl time.Duration) uint64 {
	if ttl <= 0 {
		return 0
	}
	if ttl < time.Millisecond {
		return 1
	}
	return uint64(ttl / time.Millisecond)
}

// ttlOf is the TTL the simulated store applies for ttl, rounded as the wire rounds it.
func ttlOf(ttl time.Duration) time.Duration {
	return time.Duration(ttlMs(ttl)) * time.Millisecond
}

// waitForever is Locker1's timeout_ms for a wait without end.
const waitForever = math.MaxUint64
