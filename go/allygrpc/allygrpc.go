// Package allygrpc serves a grpc.Server under Ally without losing a call on a
// reload.
//
//	ln, err := ally.Listen("tcp", "127.0.0.1:50051")
//	...
//	s := grpc.NewServer()
//	pb.RegisterGreeterServer(s, &greeter{})
//	if err := ally.Ready(); err != nil { ... }
//	err = allygrpc.Serve(s, ln) // returns once the stop came and every call is done
//
// # Why not `go s.Serve(ln); <-ally.Stopping(); s.GracefulStop()`
//
// On a reload the old generation gets its stop while the new one already accepts
// from the same socket, and connections keep arriving at that very moment.
// GracefulStop does everything at once: it stops accepting and sends every
// connection a GOAWAY, including one accepted a moment earlier whose client has sent
// its connection preface but not its first call. The GOAWAY reaches that client
// first, so it must not send the call on that connection: grpc-go's client retries
// it on a new connection by itself, but a client that does not fails it (or, with
// older clients, sees "connection closed before server preface received": the
// failure users of the original Go Ally met with gRPC servers).
//
// # What Serve does instead
//
//  1. Stop accepting, keep the socket. At the stop the listener is closed: this
//     process's copy only. The broker holds the socket, so the next generation
//     accepts whatever is queued.
//  2. Settle. It waits until every connection accepted before the stop has sent its
//     first call (its first HEADERS frame was read) or closed, and at most the
//     settle time (ally.DefaultSettle), so a client that connects and says nothing
//     cannot hold the old generation. When every connection has spoken it goes on
//     at once. Behind TLS the first bytes are the client's TLS hello, which ends the
//     settle for that connection: the settle then covers the TCP connection, not the
//     first call.
//  3. GracefulStop: GOAWAY, then finish the calls in flight. grpc-go sends a first
//     GOAWAY that admits every stream and a PING; once the client has answered, it
//     sends the final GOAWAY. Every call the client sent before it saw the first
//     GOAWAY is served, and it opens its next calls on a new connection, which the
//     next generation accepts.
//
// A client that keeps one connection and calls back to back races the GOAWAY: a
// client that learns the connection is gone only when it ends fails a call it makes
// in between (the call never reached the server; grpc-go and most gRPC clients
// retry it transparently). To make that window rarer, a connection turns
// TCP_NODELAY off at its first write after the stop, so the kernel tends to send
// the client's last answer together with the final GOAWAY and the end of the
// connection, as the Rust client's tonic integration does.
package allygrpc

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	ally "github.com/ally-rs/ally/go"
	"google.golang.org/grpc"
)

// Serve serves s on ln until this instance is asked to stop (ally.Stopping), then
// drains as the package docs say, and returns nil once every call is done.
func Serve(s *grpc.Server, ln net.Listener) error {
	return ServeUntil(s, ln, ally.Stopping(), ally.DrainOptions{})
}

// ServeUntil is Serve with its own stop and options: Settle (zero:
// ally.DefaultSettle) and Timeout (zero: none; when it passes, s.Stop closes what is
// still open and ServeUntil returns an error). Idle does not apply to gRPC. If
// s.Serve ends before the stop, ServeUntil returns its error at once.
func ServeUntil(s *grpc.Server, ln net.Listener, stop <-chan struct{}, opts ally.DrainOptions) error {
	if opts.Settle <= 0 {
		opts.Settle = ally.DefaultSettle
	}
	l := &listener{Listener: ln, unheard: make(map[*conn]struct{}), heard: make(chan struct{}, 1)}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	select {
	case err := <-served:
		return err
	case <-stop:
	}
	stoppedAt := time.Now()
	atomic.StoreInt32(&l.stopping, 1)
	// Step 1: Serve returns once its Accept fails; no connection is added after it.
	_ = l.Close()
	<-served

	// Step 2.
	l.settle(opts.Settle)
	// Step 3.
	if opts.Timeout <= 0 {
		s.GracefulStop()
		return nil
	}
	done := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(done)
	}()
	left := time.Until(stoppedAt.Add(opts.Timeout))
	if left < 0 {
		left = 0
	}
	timeout := time.NewTimer(left)
	defer timeout.Stop()
	select {
	case <-done:
		return nil
	case <-timeout.C:
		s.Stop()
		<-done
		return fmt.Errorf("allygrpc: the drain took longer than its timeout (%v); closed what was still open", opts.Timeout)
	}
}

// listener hands out connections that count as unheard until their first call.
type listener struct {
	net.Listener
	stopping  int32 // atomic: 1 once the stop came
	closeOnce sync.Once
	closeErr  error

	mu      sync.Mutex
	unheard map[*conn]struct{}
	heard   chan struct{} // a connection was heard from or closed
}

func (l *listener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := &conn{Conn: nc, l: l}
	l.mu.Lock()
	l.unheard[c] = struct{}{}
	l.mu.Unlock()
	return c, nil
}

// Close closes the listener once; grpc.Server closes it again when Serve returns.
func (l *listener) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.Listener.Close() })
	return l.closeErr
}

// settle returns once every connection accepted was heard from or closed, or after
// d at the latest.
func (l *listener) settle(d time.Duration) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for l.unheardCount() > 0 {
		select {
		case <-l.heard:
		case <-timer.C:
			return
		}
	}
}

func (l *listener) unheardCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.unheard)
}

func (l *listener) heardFrom(c *conn) {
	l.mu.Lock()
	_, was := l.unheard[c]
	delete(l.unheard, c)
	l.mu.Unlock()
	if was {
		select {
		case l.heard <- struct{}{}:
		default:
		}
	}
}

// conn is an accepted connection that watches its first bytes for its first call.
type conn struct {
	net.Conn
	l       *listener
	first   firstRequest // read only by the connection's one reader
	heard   int32        // atomic: 1 once heard from or closed
	coalesc int32        // atomic: 1 once TCP_NODELAY was turned off
}

func (c *conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if atomic.LoadInt32(&c.heard) == 0 && (err != nil || c.first.read(p[:n])) {
		c.markHeard()
	}
	return n, err
}

func (c *conn) Write(p []byte) (int, error) {
	if atomic.LoadInt32(&c.l.stopping) == 1 && atomic.CompareAndSwapInt32(&c.coalesc, 0, 1) {
		if t, ok := c.Conn.(*net.TCPConn); ok {
			_ = t.SetNoDelay(false)
		}
	}
	return c.Conn.Write(p)
}

func (c *conn) Close() error {
	c.markHeard()
	return c.Conn.Close()
}

func (c *conn) markHeard() {
	if atomic.CompareAndSwapInt32(&c.heard, 0, 1) {
		c.l.heardFrom(c)
	}
}

// HTTP/2's client connection preface (RFC 9113, 3.4).
const preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

const (
	frameHeaderLen = 9
	headersFrame   = 0x1
)

// firstRequest follows the first bytes a client sends to the start of its first
// request: in HTTP/2 the first HEADERS frame after the preface (and the SETTINGS
// and WINDOW_UPDATE frames clients send before it); anything but the HTTP/2 preface
// (TLS, HTTP/1) counts as a request from its first byte on.
type firstRequest struct {
	step    int // 0: preface, 1: frame header, 2: payload, 3: started
	n       int // preface bytes seen, or frame header bytes filled
	header  [frameHeaderLen]byte
	payload int // payload bytes left to skip
}

// read feeds the next bytes the client sent; true once its first request started.
func (f *firstRequest) read(b []byte) bool {
	for len(b) > 0 && f.step != 3 {
		switch f.step {
		case 0:
			k := len(preface) - f.n
			if k > len(b) {
				k = len(b)
			}
			if string(b[:k]) != preface[f.n:f.n+k] {
				f.step = 3
				break
			}
			f.n += k
			b = b[k:]
			if f.n == len(preface) {
				f.step, f.n = 1, 0
			}
		case 1:
			k := copy(f.header[f.n:], b)
			f.n += k
			b = b[k:]
			if f.n == frameHeaderLen {
				length := int(f.header[0])<<16 | int(f.header[1])<<8 | int(f.header[2])
				switch {
				case f.header[3] == headersFrame:
					f.step = 3
				case length == 0:
					f.step, f.n = 1, 0
				default:
					f.step, f.payload = 2, length
				}
			}
		case 2:
			k := f.payload
			if k > len(b) {
				k = len(b)
			}
			f.payload -= k
			b = b[k:]
			if f.payload == 0 {
				f.step, f.n = 1, 0
			}
		}
	}
	return f.step == 3
}
