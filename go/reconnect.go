package ally

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
)

// How the package survives the broker's re-exec or restart: a connection that broke
// is reopened by the next call, with back-off, and the call that was in flight is
// repeated once when repeating it is harmless.

// DefaultReconnectTimeout is how long a call waits for the broker to come back after
// its connection broke, unless ALLY_RECONNECT_TIMEOUT says otherwise.
const DefaultReconnectTimeout = 10 * time.Second

const (
	reconnectFirstDelay = 20 * time.Millisecond
	reconnectMaxDelay   = 500 * time.Millisecond
)

// backoff is the wait after the attempt-th failed connect attempt (0 the first): 20 ms
// doubling up to 500 ms.
func backoff(attempt int) time.Duration {
	d := reconnectFirstDelay
	for i := 0; i < attempt && d < reconnectMaxDelay; i++ {
		d *= 2
	}
	if d > reconnectMaxDelay {
		d = reconnectMaxDelay
	}
	return d
}

// handshakeLimit bounds a connect's handshake by what is left of the time allowed,
// but not below a second: a broker that answers slowly under load is not given up on
// at once.
func handshakeLimit(left time.Duration) time.Duration {
	if left < time.Second {
		return time.Second
	}
	return left
}

// parseReconnectTimeout reads ALLY_RECONNECT_TIMEOUT: a Go duration ("10s", "500ms"),
// 0 for a single attempt; empty is the default.
func parseReconnectTimeout(v string) (time.Duration, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return DefaultReconnectTimeout, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return DefaultReconnectTimeout, fmt.Errorf("ALLY_RECONNECT_TIMEOUT=%q is not a duration such as 10s or 500ms; %v used", v, DefaultReconnectTimeout)
	}
	return d, nil
}

// retrySafe names the calls the package repeats, once, on a new connection when the
// connection broke while they were in flight: doing them twice is doing them once.
// Any other call in flight then fails with ErrDisconnected, since it may have taken
// effect (Atomic Add/Swap/CompareAndSwap, Cache SetIfAbsent/CompareAndSwap/Delete/
// Flush, Lock and Unlock, Reload, Close).
var retrySafe = map[string]bool{
	brokerInterface + ".Listen":     true,
	brokerInterface + ".ListenWith": true,
	brokerInterface + ".Ready":      true,
	brokerInterface + ".Report":     true,
	brokerInterface + ".Status":     true,
	cacheInterface + "Get":          true,
	cacheInterface + "Exists":       true,
	cacheInterface + "Keys":         true,
	cacheInterface + "Count":        true,
	cacheInterface + "Set":          true,
	atomicInterface + "Load":        true,
	atomicInterface + "Store":       true,
	lockerInterface + "Queues":      true,
}

// link is the connection to one broker socket, reopened when it broke.
type link struct {
	address string
	timeout time.Duration
	// timeoutErr tells why timeout is the default (a bad ALLY_RECONNECT_TIMEOUT).
	timeoutErr error
	options    []dbus.ConnOption // for tests

	mu      sync.Mutex
	conn    *dbus.Conn   // the last connection made; closed once it broke
	dialing *dialAttempt // the connect attempt under way, shared by every caller
}

type dialAttempt struct {
	done chan struct{}
	conn *dbus.Conn
	err  error
}

func newLink(address string, timeout time.Duration, timeoutErr error) *link {
	return &link{address: address, timeout: timeout, timeoutErr: timeoutErr}
}

// get returns the connection, connecting when there is none: once for the first
// connection, with back-off for up to the timeout when a connection was had and
// broke (the broker restarts). Callers arriving meanwhile share the attempt; each
// stops waiting when its ctx ends.
func (l *link) get(ctx context.Context) (*dbus.Conn, error) {
	l.mu.Lock()
	if l.conn != nil && l.conn.Connected() {
		conn := l.conn
		l.mu.Unlock()
		return conn, nil
	}
	a := l.dialing
	if a == nil {
		a = &dialAttempt{done: make(chan struct{})}
		l.dialing = a
		go l.connect(a, l.conn != nil)
	}
	l.mu.Unlock()
	select {
	case <-a.done:
		return a.conn, a.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (l *link) connect(a *dialAttempt, reconnect bool) {
	if reconnect {
		a.conn, a.err = l.redial()
	} else {
		a.conn, a.err = dial(l.address, handshakeLimit(l.timeout), l.options...)
	}
	l.mu.Lock()
	if a.err == nil {
		l.conn = a.conn
	}
	l.dialing = nil
	l.mu.Unlock()
	close(a.done)
}

// redial connects with back-off until it succeeds or the timeout has passed.
func (l *link) redial() (*dbus.Conn, error) {
	deadline := time.Now().Add(l.timeout)
	for attempt := 0; ; attempt++ {
		conn, err := dial(l.address, handshakeLimit(time.Until(deadline)), l.options...)
		if err == nil {
			return conn, nil
		}
		var e *Error
		if errors.As(err, &e) {
			err = errors.New(e.Message)
		}
		wait := backoff(attempt)
		if left := time.Until(deadline); left < wait {
			if left <= 0 {
				if l.timeoutErr != nil {
					return nil, fmt.Errorf("no broker within %v (%v): %w", l.timeout, l.timeoutErr, err)
				}
				return nil, fmt.Errorf("no broker within %v (ALLY_RECONNECT_TIMEOUT): %w", l.timeout, err)
			}
			wait = left
		}
		time.Sleep(wait)
	}
}

// invoke makes a call on lk. When the connection had broken it is reopened first;
// when it breaks with the call in flight, the call is repeated once on a new
// connection if it is retry-safe, else it fails with ErrDisconnected.
func (in *instance) invoke(ctx context.Context, lk *link, method string, args ...interface{}) (*dbus.Call, error) {
	member := memberOf(method)
	for repeat := false; ; repeat = true {
		conn, err := in.linkConn(ctx, lk, member, repeat)
		if err != nil {
			return nil, err
		}
		c := in.object(conn).CallWithContext(ctx, method, 0, args...)
		if c.Err == nil {
			return c, nil
		}
		if !brokenBy(conn, c.Err) {
			return nil, callError(member, c.Err)
		}
		conn.Close()
		if repeat {
			return nil, disconnected(member, "it was repeated on a new connection, which closed too", c.Err)
		}
		if !retrySafe[method] {
			return nil, disconnected(member, "it was not repeated because it may have taken effect", c.Err)
		}
	}
}

// linkConn is lk's connection for a call of member; repeat: the call was in flight
// when the last one broke.
func (in *instance) linkConn(ctx context.Context, lk *link, member string, repeat bool) (*dbus.Conn, error) {
	if in.envErr != nil {
		return nil, in.envErr
	}
	lk.mu.Lock()
	reconnect := lk.conn != nil
	lk.mu.Unlock()
	conn, err := lk.get(ctx)
	if err == nil || !reconnect || ctx.Err() != nil {
		return conn, err
	}
	when := "before"
	if repeat {
		when = "during"
	}
	return nil, &Error{Method: member, Name: errDisconnected, Err: err, Message: fmt.Sprintf(
		"the broker's connection closed %s %s (the broker restarted?); reconnecting failed: %v", when, member, err)}
}

// failed is the error of a call on conn that was not repeated: ErrDisconnected when
// the connection broke (conn is then closed, so that the next call reconnects).
func failed(conn *dbus.Conn, member string, err error) error {
	if !brokenBy(conn, err) {
		return callError(member, err)
	}
	conn.Close()
	return disconnected(member, "it was not repeated because it may have taken effect", err)
}

func disconnected(member, why string, err error) error {
	return &Error{Method: member, Name: errDisconnected, Err: err, Message: fmt.Sprintf(
		"the broker's connection closed during %s (the broker restarted?); %s", member, why)}
}

// brokenBy tells whether err, a call's error on conn, is the connection breaking
// rather than the broker's reply or the caller's context.
func brokenBy(conn *dbus.Conn, err error) bool {
	var reply dbus.Error
	var replyPtr *dbus.Error
	if errors.As(err, &reply) || errors.As(err, &replyPtr) {
		return false
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	return !conn.Connected() ||
		errors.Is(err, dbus.ErrClosed) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) ||
		errors.Is(err, os.ErrClosed) ||
		errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ECONNRESET)
}
