package ally

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

func TestBackoff(t *testing.T) {
	want := []time.Duration{20, 40, 80, 160, 320, 500, 500, 500}
	for attempt, w := range want {
		if got := backoff(attempt); got != w*time.Millisecond {
			t.Errorf("backoff(%d) = %v, want %v", attempt, got, w*time.Millisecond)
		}
	}
	if got := backoff(1000); got != reconnectMaxDelay {
		t.Errorf("backoff(1000) = %v", got)
	}
	// 10 s of attempts is about 25 connects, not a busy loop.
	total, attempts := time.Duration(0), 0
	for total < DefaultReconnectTimeout {
		total += backoff(attempts)
		attempts++
	}
	if attempts < 20 || attempts > 30 {
		t.Errorf("%d attempts in %v", attempts, DefaultReconnectTimeout)
	}
}

func TestParseReconnectTimeout(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Duration
		bad  bool
	}{
		{"", DefaultReconnectTimeout, false},
		{"250ms", 250 * time.Millisecond, false},
		{" 2s ", 2 * time.Second, false},
		{"1m30s", 90 * time.Second, false},
		{"0", 0, false},
		{"10", DefaultReconnectTimeout, true}, // no unit
		{"-1s", DefaultReconnectTimeout, true},
		{"soon", DefaultReconnectTimeout, true},
	} {
		got, err := parseReconnectTimeout(c.in)
		if got != c.want || (err != nil) != c.bad {
			t.Errorf("parseReconnectTimeout(%q) = %v, %v", c.in, got, err)
		}
		if err != nil && !strings.Contains(err.Error(), "ALLY_RECONNECT_TIMEOUT") {
			t.Errorf("the error %q does not name the variable", err)
		}
	}
}

// The contract's table (notes: "What clients do"): which calls in flight are repeated.
func TestRetrySafe(t *testing.T) {
	repeated := []string{
		"org.ally.Broker1.Listen", "org.ally.Broker1.ListenWith", "org.ally.Broker1.Ready",
		"org.ally.Broker1.Report", "org.ally.Broker1.Status",
		"org.ally.Cache1.Get", "org.ally.Cache1.Exists", "org.ally.Cache1.Keys",
		"org.ally.Cache1.Count", "org.ally.Cache1.Set",
		"org.ally.Atomic1.Load", "org.ally.Atomic1.Store", "org.ally.Locker1.Queues",
	}
	notRepeated := []string{
		"org.ally.Broker1.Close", "org.ally.Broker1.Reload",
		"org.ally.Atomic1.Add", "org.ally.Atomic1.Swap", "org.ally.Atomic1.CompareAndSwap",
		"org.ally.Cache1.SetIfAbsent", "org.ally.Cache1.CompareAndSwap", "org.ally.Cache1.Delete",
		"org.ally.Cache1.Flush",
		"org.ally.Locker1.Lock", "org.ally.Locker1.RLock", "org.ally.Locker1.Unlock",
		"org.ally.Locker1.RUnlock",
	}
	for _, m := range repeated {
		if !retrySafe[m] {
			t.Errorf("%s is not repeated", m)
		}
	}
	for _, m := range notRepeated {
		if retrySafe[m] {
			t.Errorf("%s is repeated", m)
		}
	}
	if len(retrySafe) != len(repeated) {
		t.Errorf("retrySafe has %d entries, the contract %d", len(retrySafe), len(repeated))
	}
}

// brokenBy, on a live connection (a net.Pipe) and on a closed one.
func TestBrokenBy(t *testing.T) {
	here, there := net.Pipe()
	defer there.Close()
	conn, err := dbus.NewConn(here)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	reply := dbus.Error{Name: errAccessDenied, Body: []interface{}{"no"}}
	for _, c := range []struct {
		err    error
		broken bool
	}{
		{reply, false},
		{&reply, false},
		{context.Canceled, false},
		{context.DeadlineExceeded, false},
		{errors.New("dbus: invalid signature"), false},
		{dbus.ErrClosed, true},
		{io.EOF, true},
		{io.ErrUnexpectedEOF, true},
		{&net.OpError{Op: "write", Net: "unix", Err: syscall.EPIPE}, true},
		{&net.OpError{Op: "read", Net: "unix", Err: syscall.ECONNRESET}, true},
		{fmt.Errorf("read: %w", net.ErrClosed), true},
	} {
		if got := brokenBy(conn, c.err); got != c.broken {
			t.Errorf("brokenBy(live, %v) = %v", c.err, got)
		}
	}
	conn.Close()
	if !brokenBy(conn, errors.New("anything")) {
		t.Error("an error on a closed connection is not a break")
	}
	if brokenBy(conn, reply) {
		t.Error("a reply on a closed connection is a break")
	}
}

func TestDisconnectedError(t *testing.T) {
	err := disconnected("Add", "it was not repeated because it may have taken effect", dbus.ErrClosed)
	if !errors.Is(err, ErrDisconnected) || errors.Is(err, ErrFailed) {
		t.Fatalf("%v is not ErrDisconnected alone", err)
	}
	if !errors.Is(err, dbus.ErrClosed) {
		t.Fatalf("%v does not wrap the transport's error", err)
	}
	want := "ally: Add: the broker's connection closed during Add (the broker restarted?); it was not repeated because it may have taken effect"
	if err.Error() != want {
		t.Fatalf("message %q, want %q", err.Error(), want)
	}
}

// redial with no broker: it tries until the timeout, then says what it met; a bad
// ALLY_RECONNECT_TIMEOUT is named in the error.
func TestRedialGivesUp(t *testing.T) {
	address := "unix:path=" + t.TempDir() + "/no-broker"
	_, bad := parseReconnectTimeout("soon")
	for _, c := range []struct {
		timeout time.Duration
		bad     error
		says    string
	}{
		{0, nil, "no broker within 0s (ALLY_RECONNECT_TIMEOUT): cannot connect"},
		{150 * time.Millisecond, nil, "no broker within 150ms (ALLY_RECONNECT_TIMEOUT): cannot connect"},
		{150 * time.Millisecond, bad, `ALLY_RECONNECT_TIMEOUT="soon" is not a duration`},
	} {
		start := time.Now()
		conn, err := newLink(address, c.timeout, c.bad).redial()
		took := time.Since(start)
		if conn != nil || err == nil || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), "no-broker") {
			t.Errorf("redial within %v = %v, %v; want an error saying %q", c.timeout, conn, err, c.says)
		}
		if took < c.timeout || took > c.timeout+time.Second {
			t.Errorf("redial within %v gave up after %v", c.timeout, took)
		}
	}
}

// A socket that accepts and never answers (a broker hung mid-start) does not hold a
// connect for ever: the handshake gives up after its limit.
func TestDialHandshakeBounded(t *testing.T) {
	path := t.TempDir() + "/mute"
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		conn, err := dial("unix:path="+path, 200*time.Millisecond)
		if conn != nil {
			conn.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "no answer within 200ms") {
			t.Fatalf("dial of a mute socket = %v", err)
		}
		if took := time.Since(start); took < 200*time.Millisecond {
			t.Fatalf("gave up after %v", took)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("dial of a mute socket did not return within 10s")
	}
}
