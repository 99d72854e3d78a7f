package ally

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// drainServer serves a hello handler with ServeUntil on 127.0.0.1 until stop is
// closed; done gets ServeUntil's result. other is a second handle on the same
// socket, standing for the next generation.
type drainServer struct {
	addr  string
	stop  chan struct{}
	done  chan error
	other net.Listener
	conns chan net.Conn // each connection the server accepted (ConnState StateNew)
}

func startDrainServer(t *testing.T, opts DrainOptions) *drainServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	other, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	s := &drainServer{
		addr:  ln.Addr().String(),
		stop:  make(chan struct{}),
		done:  make(chan error, 1),
		other: other,
		conns: make(chan net.Conn, 16),
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello %s", r.URL.Path)
		}),
		ConnState: func(c net.Conn, state http.ConnState) {
			if state == http.StateNew {
				s.conns <- c
			}
		},
	}
	go func() { s.done <- ServeUntil(srv, ln, s.stop, opts) }()
	return s
}

func (s *drainServer) dial(t *testing.T) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	select {
	case <-s.conns:
	case <-time.After(5 * time.Second):
		t.Fatal("the server did not accept the connection")
	}
	return c, bufio.NewReader(c)
}

// get sends one request and reads its response.
func get(t *testing.T, c net.Conn, r *bufio.Reader, request string) *http.Response {
	t.Helper()
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatalf("sending %q: %v", request, err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("reading the answer to %q: %v", request, err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || !strings.HasPrefix(string(body), "hello /") {
		t.Fatalf("answer to %q: %q, %v", request, body, err)
	}
	return resp
}

const (
	http11      = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
	http10KeepA = "GET /b HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
)

// The connection is closed by the server: EOF, with nothing more to read.
func closedByServer(t *testing.T, c net.Conn, r *bufio.Reader) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := r.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("the connection is still open: read %d, %v", n, err)
	}
}

func waitDone(t *testing.T, s *drainServer) time.Time {
	t.Helper()
	select {
	case err := <-s.done:
		if err != nil {
			t.Fatalf("ServeUntil: %v", err)
		}
		return time.Now()
	case <-time.After(10 * time.Second):
		t.Fatal("ServeUntil did not return")
	}
	return time.Time{}
}

func TestDrainLeavesQueuedConnectionsToTheNextGeneration(t *testing.T) {
	s := startDrainServer(t, DrainOptions{Idle: 200 * time.Millisecond})
	c, r := s.dial(t)
	get(t, c, r, http11)
	close(s.stop)
	waitDone(t, s)
	// The socket is open in the other holder: a new connection is queued, not refused.
	queued, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatalf("the drain closed the shared socket: %v", err)
	}
	defer queued.Close()
	s.other.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	accepted, err := s.other.Accept()
	if err != nil {
		t.Fatalf("the next generation accepts nothing: %v", err)
	}
	accepted.Close()
}

func TestAKeptAliveConnectionIsToldToCloseOnItsNextRequest(t *testing.T) {
	for _, request := range []string{http11, http10KeepA} {
		t.Run(strings.Fields(request)[2], func(t *testing.T) {
			s := startDrainServer(t, DrainOptions{Idle: 2 * time.Second})
			c, r := s.dial(t)
			if resp := get(t, c, r, request); resp.Close {
				t.Fatalf("closed before the stop: %v", resp.Header)
			}
			stopped := time.Now()
			close(s.stop)
			time.Sleep(300 * time.Millisecond)
			resp := get(t, c, r, request)
			if !resp.Close {
				t.Fatalf("an answer during the drain does not say Connection: close: %v %v", resp.Proto, resp.Header)
			}
			closedByServer(t, c, r)
			// Nothing is left to wait for: no idle time.
			if took := waitDone(t, s).Sub(stopped); took > 1500*time.Millisecond {
				t.Fatalf("the drain took %v with no connection left", took)
			}
		})
	}
}

func TestAnIdleConnectionIsClosedOnlyOnceIdleForTheIdleTime(t *testing.T) {
	idle := 600 * time.Millisecond
	s := startDrainServer(t, DrainOptions{Idle: idle})
	c, r := s.dial(t)
	get(t, c, r, http11)
	slow, slowReader := s.dial(t)
	stopped := time.Now()
	close(s.stop)

	time.Sleep(idle / 2)
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := r.Peek(1); err == nil || err == io.EOF {
		t.Fatalf("the idle connection was closed %v after the stop, before the idle time: %v", time.Since(stopped), err)
	}
	// Half a request now, the rest after the stop's idle time: a read restarts the clock.
	half := len(http11) / 2
	io.WriteString(slow, http11[:half])
	time.Sleep(idle/2 + idle/3)
	get(t, slow, slowReader, http11[half:])

	closedByServer(t, c, r)
	if took := time.Since(stopped); took < idle {
		t.Fatalf("the idle connection was closed %v after the stop, before the idle time %v", took, idle)
	}
	closedByServer(t, slow, slowReader)
	waitDone(t, s)
}

func TestAConnectionAcceptedBeforeTheStopMaySendItsFirstRequestAfter(t *testing.T) {
	s := startDrainServer(t, DrainOptions{Idle: time.Second})
	c, r := s.dial(t)
	close(s.stop)
	time.Sleep(400 * time.Millisecond)
	resp := get(t, c, r, http11)
	if !resp.Close {
		t.Fatalf("the answer does not say Connection: close: %v", resp.Header)
	}
	closedByServer(t, c, r)
	waitDone(t, s)
}

func TestTheDrainTimeoutClosesWhatIsLeft(t *testing.T) {
	s := startDrainServer(t, DrainOptions{Idle: time.Minute, Timeout: 300 * time.Millisecond})
	c, r := s.dial(t)
	get(t, c, r, http11)
	close(s.stop)
	select {
	case err := <-s.done:
		if err == nil || !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("ServeUntil: %v, want a timeout error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the timeout did not end the drain")
	}
	closedByServer(t, c, r)
}

func TestServeUntilReturnsServesError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{}
	done := make(chan error, 1)
	go func() { done <- ServeUntil(srv, ln, make(chan struct{}), DrainOptions{}) }()
	time.Sleep(50 * time.Millisecond)
	srv.Close()
	select {
	case err := <-done:
		if err != http.ErrServerClosed {
			t.Fatalf("got %v, want http.ErrServerClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeUntil did not return when the server was closed")
	}
}

func TestDrainOptionsDefaultToTheAppsDrainIdle(t *testing.T) {
	if os.Getenv("ALLY_DRAIN_IDLE") != "" {
		t.Skip("ALLY_DRAIN_IDLE is set")
	}
	o := DrainOptions{}.WithDefaults()
	if o.Idle != DrainIdle() || o.Settle != DefaultSettle || o.Timeout != 0 {
		t.Fatalf("%+v", o)
	}
	o = DrainOptions{Idle: time.Millisecond, Settle: 2 * time.Millisecond}.WithDefaults()
	if o.Idle != time.Millisecond || o.Settle != 2*time.Millisecond {
		t.Fatalf("%+v", o)
	}
}
