package ally

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultSettle is how long, by default, connections accepted just before the stop
// get to send their first request before a server that shuts every connection down
// at once (HTTP/2's GOAWAY, grpc.Server.GracefulStop) starts doing so: well above a
// handshake's round trips on a loaded machine, well below any stop_timeout.
const DefaultSettle = 500 * time.Millisecond

// DrainOptions say how a server drains once the stop comes. Zero values mean the
// defaults.
type DrainOptions struct {
	// Idle is how long an HTTP/1 connection must stay idle after the stop before it
	// is closed (counting from the later of the stop and its last read). Zero:
	// DrainIdle(), the app's drain_idle.
	Idle time.Duration
	// Settle is how long connections accepted before the stop may take to send their
	// first request before an HTTP/2 connection gets its GOAWAY (net/http) or
	// GracefulStop starts (allygrpc). Zero: DefaultSettle.
	Settle time.Duration
	// Timeout bounds the whole drain, from the stop: what is still open then is
	// closed and the drain returns an error. Zero: no bound of its own (the broker
	// kills an instance still running after its stop_timeout).
	Timeout time.Duration
}

// WithDefaults fills in the zero fields of o.
func (o DrainOptions) WithDefaults() DrainOptions {
	if o.Idle <= 0 {
		o.Idle = DrainIdle()
	}
	if o.Settle <= 0 {
		o.Settle = DefaultSettle
	}
	return o
}

// Serve serves srv on ln until this instance is asked to stop (Stopping), then
// drains without losing a request, and returns nil once every connection is done.
// It is ServeUntil(srv, ln, Stopping(), DrainOptions{}): see ServeUntil for how.
//
//	ln, err := ally.Listen("tcp", "127.0.0.1:8080")
//	...
//	if err := ally.Ready(); err != nil { ... }
//	err = ally.Serve(&http.Server{Handler: mux}, ln)
func Serve(srv *http.Server, ln net.Listener) error {
	return ServeUntil(srv, ln, Stopping(), DrainOptions{})
}

// ServeTLS is Serve for HTTPS (and HTTP/2 over TLS), as http.Server.ServeTLS.
func ServeTLS(srv *http.Server, ln net.Listener, certFile, keyFile string) error {
	return serveUntil(srv, ln, Stopping(), DrainOptions{}, func(l net.Listener) error {
		return srv.ServeTLS(l, certFile, keyFile)
	})
}

// ServeUntil serves srv on ln until stop is closed, then drains as below, each step
// for a failure a client that does not retry would otherwise see, and returns nil
// once every connection is done. If srv.Serve ends before the stop (the listener
// failed, or srv was shut down), ServeUntil returns its error at once.
//
//  1. Stop accepting, keep the socket. At the stop ln is closed: this process's
//     copy of the socket only. The broker and the next generation hold the same
//     kernel socket, so connections in its queue are accepted by the next
//     generation instead of being refused.
//  2. Serve what was accepted. A connection accepted just before the stop may not
//     have sent its request yet; closing it then (what http.Server.Shutdown does to
//     a connection with no request in progress) fails that request. It gets the
//     idle time to send it.
//  3. "Connection: close" on every HTTP/1 response while stopping. A keep-alive
//     client that keeps sending is told on its very next response to move to a new
//     connection, which the next generation accepts: it never sees a closed socket.
//     This covers HTTP/1.0 keep-alive clients (ab -k) too: net/http closes a
//     connection whose response says so.
//  4. Close an idle keep-alive connection only after it stayed idle. A connection
//     is closed once it has read nothing for opts.Idle after the stop, never the
//     instant the stop comes: a client may be sending its next request at that
//     instant. http.Server.Shutdown and SetKeepAlivesEnabled(false) close idle
//     connections at once, which loses about one request per kept-alive connection
//     per reload; they are not called while an HTTP/1 connection is open. What
//     remains is HTTP/1.1's own race, present without any reload: a client that
//     sends on a connection idle that long just as the server closes it sees the
//     close.
//  5. Shutdown. Once no HTTP/1 connection is left, srv.Shutdown sends HTTP/2
//     connections (over TLS) their GOAWAY, opts.Settle after the stop at the
//     earliest, and waits for their requests in flight.
//
// ServeUntil sets srv.Handler (nil: http.DefaultServeMux) to CloseWhileStopping of
// it and srv.ConnState to a hook that tracks each connection and then calls the one
// set before, so srv must not be serving yet. A hijacked connection (a WebSocket) is
// the handler's own: it is neither tracked nor waited for.
func ServeUntil(srv *http.Server, ln net.Listener, stop <-chan struct{}, opts DrainOptions) error {
	return serveUntil(srv, ln, stop, opts, srv.Serve)
}

func serveUntil(srv *http.Server, ln net.Listener, stop <-chan struct{}, opts DrainOptions, serve func(net.Listener) error) error {
	d := &httpDrain{
		opts:    opts.WithDefaults(),
		conns:   make(map[*drainConn]struct{}),
		changed: make(chan struct{}, 1),
	}
	handler := srv.Handler
	if handler == nil {
		handler = http.DefaultServeMux
	}
	srv.Handler = CloseWhileStopping(handler, stop)
	userHook := srv.ConnState
	srv.ConnState = func(c net.Conn, state http.ConnState) {
		d.connState(c, state)
		if userHook != nil {
			userHook(c, state)
		}
	}
	tracked := &drainListener{Listener: ln, drain: d}
	served := make(chan error, 1)
	go func() { served <- serve(tracked) }()
	select {
	case err := <-served:
		return err
	case <-stop:
	}
	d.stop(time.Now())
	// Step 1. Serve returns once its Accept fails; after that no connection is added.
	_ = tracked.Close()
	<-served
	return d.finish(srv)
}

// CloseWhileStopping wraps h so that every HTTP/1 response says "Connection: close"
// once stop is closed (step 3 of ServeUntil): for servers not run through
// ServeUntil.
func CloseWhileStopping(h http.Handler, stop <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 1 {
			select {
			case <-stop:
				w.Header().Set("Connection", "close")
			default:
			}
		}
		h.ServeHTTP(w, r)
	})
}

// httpDrain tracks the connections of one server through its drain.
type httpDrain struct {
	opts    DrainOptions
	changed chan struct{} // a connection went idle, closed or was hijacked

	mu        sync.Mutex
	conns     map[*drainConn]struct{}
	stoppedAt time.Time // zero until the stop
}

func (d *httpDrain) stop(at time.Time) {
	d.mu.Lock()
	d.stoppedAt = at
	d.mu.Unlock()
}

func (d *httpDrain) add(c *drainConn) {
	d.mu.Lock()
	d.conns[c] = struct{}{}
	d.mu.Unlock()
}

func (d *httpDrain) connState(nc net.Conn, state http.ConnState) {
	c := unwrapDrainConn(nc)
	if c == nil {
		return
	}
	http2 := false
	if t, ok := nc.(*tls.Conn); ok && (state == http.StateActive || state == http.StateIdle) {
		http2 = t.ConnectionState().NegotiatedProtocol == "h2"
	}
	d.mu.Lock()
	switch state {
	case http.StateClosed, http.StateHijacked:
		delete(d.conns, c)
	default:
		c.state = state
		c.http2 = c.http2 || http2
	}
	d.mu.Unlock()
	if state != http.StateActive && state != http.StateNew {
		select {
		case d.changed <- struct{}{}:
		default:
		}
	}
}

// finish runs steps 2, 4 and 5 of ServeUntil once the stop came and no connection
// is accepted any more.
func (d *httpDrain) finish(srv *http.Server) error {
	ctx := context.Background()
	if d.opts.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.stoppedAt.Add(d.opts.Timeout))
		defer cancel()
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		due, waiting := d.closeIdle(time.Now())
		if !waiting {
			break
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		if !due.IsZero() {
			timer.Reset(time.Until(due))
		}
		select {
		case <-d.changed:
		case <-timer.C:
		case <-ctx.Done():
			srv.Close()
			return fmt.Errorf("ally: the drain took longer than its timeout (%v); closed what was still open", d.opts.Timeout)
		}
	}
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("ally: the drain took longer than its timeout (%v); closed what was still open", d.opts.Timeout)
		}
		return err
	}
	return nil
}

// closeIdle closes the HTTP/1 connections idle for the idle time after the stop,
// and tells whether any connection is still to wait for and, if one will be due by
// time alone, when.
func (d *httpDrain) closeIdle(now time.Time) (due time.Time, waiting bool) {
	var done []*drainConn
	d.mu.Lock()
	for c := range d.conns {
		if c.closing {
			continue
		}
		var at time.Time
		switch {
		case c.http2:
			// Its graceful end is Shutdown's GOAWAY, after which the client opens
			// no new stream on it; the settle lets a new one send its first.
			at = d.stoppedAt.Add(d.opts.Settle)
		case c.state == http.StateNew || c.state == http.StateIdle:
			quiet := d.stoppedAt
			if read := c.lastRead(); read.After(quiet) {
				quiet = read
			}
			at = quiet.Add(d.opts.Idle)
			if !now.Before(at) {
				c.closing = true
				done = append(done, c)
				continue
			}
		default:
			// A request in progress: its response says Connection: close, or the
			// connection goes idle and is timed from there.
			waiting = true
			continue
		}
		if now.Before(at) {
			waiting = true
			if due.IsZero() || at.Before(due) {
				due = at
			}
		}
	}
	d.mu.Unlock()
	for _, c := range done {
		c.Close()
	}
	return due, waiting
}

// drainListener hands out tracked connections.
type drainListener struct {
	net.Listener
	drain     *httpDrain
	closeOnce sync.Once
	closeErr  error
}

func (l *drainListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := &drainConn{Conn: nc, born: time.Now(), state: http.StateNew}
	l.drain.add(c)
	return c, nil
}

// Close closes the listener once; http.Server closes it again when Serve returns.
func (l *drainListener) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.Listener.Close() })
	return l.closeErr
}

// drainConn is an accepted connection whose reads are timed: a connection the
// server sees as idle may be reading its next request at that moment.
type drainConn struct {
	net.Conn
	born time.Time
	// Nanoseconds after born of the last read plus one; 0: nothing read yet.
	readAt int64

	// Under the drain's mu.
	state   http.ConnState
	http2   bool
	closing bool
}

func (c *drainConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		atomic.StoreInt64(&c.readAt, int64(time.Since(c.born))+1)
	}
	return n, err
}

func (c *drainConn) lastRead() time.Time {
	at := atomic.LoadInt64(&c.readAt)
	if at == 0 {
		return time.Time{}
	}
	return c.born.Add(time.Duration(at - 1))
}

// unwrapDrainConn finds the drainConn under nc (a *tls.Conn over it, for ServeTLS).
func unwrapDrainConn(nc net.Conn) *drainConn {
	for nc != nil {
		if c, ok := nc.(*drainConn); ok {
			return c
		}
		u, ok := nc.(interface{ NetConn() net.Conn })
		if !ok {
			return nil
		}
		nc = u.NetConn()
	}
	return nil
}
