package ally

import (
	"context"
	"errors"
	"math"
	"time"

	"github.com/ally-rs/ally/go/internal/state"
)

// Simulate mode's state: one store for the process, which is one lock owner, as an
// instance is for the broker.
var simulatedState = state.New(state.DefaultLimits)

const simulatedOwner = 1

// stateLink is the link for Cache1 and Atomic1 calls: the state socket
// (ALLY_STATE_ADDRESS) when it could be reached on first use, else the private socket.
func (in *instance) stateLink() *link {
	in.stateOnce.Do(func() {
		if in.stateAddr == "" || in.envErr != nil {
			return
		}
		_, err := in.state.get(context.Background())
		in.stateOK = err == nil
	})
	if in.stateOK {
		return in.state
	}
	return in.bus
}

// stateCall makes a Cache1 or Atomic1 call (see invoke) and stores the reply in out.
func stateCall(method string, out []interface{}, args ...interface{}) error {
	in := self()
	c, err := in.invoke(context.Background(), in.stateLink(), method, args...)
	if err != nil {
		return err
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
