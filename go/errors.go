package ally

import (
	"context"
	"errors"
	"fmt"

	"github.com/godbus/dbus/v5"
)

// The broker's error names (docs/dbus-api.md, "Errors").
const (
	errInvalidArgument = "org.ally.Error.InvalidArgument"
	errAccessDenied    = "org.ally.Error.AccessDenied"
	errAddressInUse    = "org.ally.Error.AddressInUse"
	errReloadFailed    = "org.ally.Error.ReloadFailed"
	errNotOwner        = "org.ally.Error.NotOwner"
	errLimitExceeded   = "org.ally.Error.LimitExceeded"
	errFailed          = "org.ally.Error.Failed"
	errTimeout         = "org.ally.Error.Timeout"      // local: a lock not had in time
	errNotManaged      = "org.ally.Error.NotManaged"   // local: no broker
	errDisconnected    = "org.ally.Error.Disconnected" // local: the connection broke
)

// Errors to test with errors.Is. Every error the package returns for a refusal is an
// *Error whose Is matches one of these, and whose message is the broker's.
var (
	// ErrInvalidArgument: unknown network, malformed address, unknown option, empty name.
	ErrInvalidArgument = errors.New(errInvalidArgument)
	// ErrAccessDenied: the caller may not call this method, or bind this address.
	ErrAccessDenied = errors.New(errAccessDenied)
	// ErrAddressInUse: another process holds the address.
	ErrAddressInUse = errors.New(errAddressInUse)
	// ErrReloadFailed: the new generation failed; the message says why.
	ErrReloadFailed = errors.New(errReloadFailed)
	// ErrNotOwner: unlocking a lock the caller does not hold (or holds in the other mode).
	ErrNotOwner = errors.New(errNotOwner)
	// ErrLimitExceeded: a configured limit would be passed.
	ErrLimitExceeded = errors.New(errLimitExceeded)
	// ErrFailed: anything else went wrong in the broker, or reaching it.
	ErrFailed = errors.New(errFailed)
	// ErrTimeout: a lock could not be had within its timeout (or at once, for TryLock).
	ErrTimeout = errors.New(errTimeout)
	// ErrNotManaged: the call needs a broker, and this process runs in simulate mode.
	ErrNotManaged = errors.New(errNotManaged)
	// ErrDisconnected: the broker's connection closed (the broker restarted?) during a
	// call that was not repeated because it may have taken effect, or no broker came
	// back within ALLY_RECONNECT_TIMEOUT.
	ErrDisconnected = errors.New(errDisconnected)
)

var sentinels = map[string]error{
	errInvalidArgument: ErrInvalidArgument,
	errAccessDenied:    ErrAccessDenied,
	errAddressInUse:    ErrAddressInUse,
	errReloadFailed:    ErrReloadFailed,
	errNotOwner:        ErrNotOwner,
	errLimitExceeded:   ErrLimitExceeded,
	errFailed:          ErrFailed,
	errTimeout:         ErrTimeout,
	errNotManaged:      ErrNotManaged,
	errDisconnected:    ErrDisconnected,
}

// Error is a refusal by the broker (or by simulate mode, with the same names and
// messages), or a failure to reach it.
type Error struct {
	// Method is the call that failed, e.g. "Listen"; empty when none was made.
	Method string
	// Name is the D-Bus error name, e.g. "org.ally.Error.AccessDenied".
	Name string
	// Message is the broker's message.
	Message string
	// Err is the underlying error (a transport error), if any.
	Err error
}

func (e *Error) Error() string {
	if e.Method != "" {
		return fmt.Sprintf("ally: %s: %s", e.Method, e.Message)
	}
	return "ally: " + e.Message
}

// Is matches the sentinel of the error's name (ErrAccessDenied, ...).
func (e *Error) Is(target error) bool {
	s, ok := sentinels[e.Name]
	return ok && s == target
}

func (e *Error) Unwrap() error { return e.Err }

// callError turns a godbus call error into an *Error keeping the broker's message.
func callError(method string, err error) error {
	var de dbus.Error
	if errors.As(err, &de) {
		msg := de.Name
		if len(de.Body) > 0 {
			if s, ok := de.Body[0].(string); ok {
				msg = s
			}
		}
		name := de.Name
		if _, known := sentinels[name]; !known {
			name = errFailed
			msg = de.Name + ": " + msg
		}
		return &Error{Method: method, Name: name, Message: msg}
	}
	var pde *dbus.Error
	if errors.As(err, &pde) {
		return callError(method, *pde)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return &Error{Method: method, Name: errFailed, Message: err.Error(), Err: err}
}

func newError(name, format string, args ...interface{}) *Error {
	return &Error{Name: name, Message: fmt.Sprintf(format, args...)}
}
