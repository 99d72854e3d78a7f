package allygrpc

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	ally "github.com/ally-rs/ally/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func frame(kind byte, payload int) []byte {
	f := []byte{byte(payload >> 16), byte(payload >> 8), byte(payload), kind, 0, 0, 0, 0, 1}
	return append(f, make([]byte, payload)...)
}

func TestTheFirstRequestIsTheFirstHeadersFrameAfterThePreface(t *testing.T) {
	var stream []byte
	stream = append(stream, preface...)
	stream = append(stream, frame(0x4, 18)...) // SETTINGS
	stream = append(stream, frame(0x8, 4)...)  // WINDOW_UPDATE
	stream = append(stream, frame(0x4, 0)...)  // SETTINGS ack
	before := len(stream)
	stream = append(stream, frame(headersFrame, 30)...)
	for _, chunk := range []int{1, 3, 7, len(stream)} {
		var f firstRequest
		started := -1
		for i := 0; i < len(stream); i += chunk {
			end := i + chunk
			if end > len(stream) {
				end = len(stream)
			}
			if f.read(stream[i:end]) {
				started = end
				break
			}
		}
		if started <= before {
			t.Fatalf("chunks of %d: started after %d bytes; the HEADERS frame starts at %d", chunk, started, before)
		}
	}
	var f firstRequest
	if f.read(stream[:before]) {
		t.Fatal("started before any HEADERS frame")
	}
	var h1 firstRequest
	if !h1.read([]byte("GET / HTTP/1.1\r\n")) {
		t.Fatal("an HTTP/1 request did not count as a request")
	}
	var tlsHello firstRequest
	if !tlsHello.read([]byte{0x16, 0x03, 0x01}) {
		t.Fatal("a TLS hello did not end the settle")
	}
}

func TestServeUntilStopsAcceptingSettlesAndStops(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, health.NewServer())
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- ServeUntil(s, ln, stop, ally.DrainOptions{Settle: 2 * time.Second}) }()

	conn, err := grpc.Dial(ln.Addr().String(), grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	// A connection that says nothing: the settle waits for it, at most Settle.
	silent, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	time.Sleep(100 * time.Millisecond)
	stopped := time.Now()
	close(stop)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeUntil did not return")
	}
	if took := time.Since(stopped); took < 2*time.Second {
		t.Fatalf("returned %v after the stop: the silent connection got no settle", took)
	}
}

// h2Conn is a bare HTTP/2 client connection: it says only what the test makes it say,
// and neither retries nor reconnects.
type h2Conn struct {
	net.Conn
	frames chan h2Frame
}

type h2Frame struct {
	kind, flags byte
	stream      uint32
	payload     []byte
}

func dialH2(t *testing.T, addr string) *h2Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := &h2Conn{Conn: nc, frames: make(chan h2Frame, 64)}
	c.write(t, []byte(preface))
	c.frame(t, 0x4, 0, 0, nil) // SETTINGS
	go c.readFrames()
	return c
}

func (c *h2Conn) write(t *testing.T, b []byte) {
	if _, err := c.Write(b); err != nil {
		t.Errorf("writing: %v", err)
	}
}

func (c *h2Conn) frame(t *testing.T, kind, flags byte, stream uint32, payload []byte) {
	n := len(payload)
	header := []byte{byte(n >> 16), byte(n >> 8), byte(n), kind, flags,
		byte(stream >> 24), byte(stream >> 16), byte(stream >> 8), byte(stream)}
	c.write(t, append(header, payload...))
}

// readFrames passes on every frame, acknowledging SETTINGS and PINGs as a client must.
func (c *h2Conn) readFrames() {
	defer close(c.frames)
	for {
		var h [frameHeaderLen]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return
		}
		f := h2Frame{kind: h[3], flags: h[4], stream: uint32(h[5]&0x7f)<<24 | uint32(h[6])<<16 | uint32(h[7])<<8 | uint32(h[8])}
		f.payload = make([]byte, int(h[0])<<16|int(h[1])<<8|int(h[2]))
		if _, err := io.ReadFull(c, f.payload); err != nil {
			return
		}
		switch {
		case f.kind == 0x4 && f.flags&1 == 0:
			c.Write([]byte{0, 0, 0, 0x4, 1, 0, 0, 0, 0})
		case f.kind == 0x6 && f.flags&1 == 0:
			c.Write(append([]byte{0, 0, 8, 0x6, 1, 0, 0, 0, 0}, f.payload...))
		}
		c.frames <- f
	}
}

// hpackLiteral is one header field as an HPACK literal without indexing, no Huffman.
func hpackLiteral(name, value string) []byte {
	b := []byte{0, byte(len(name))}
	b = append(b, name...)
	b = append(b, byte(len(value)))
	return append(b, value...)
}

// TestACallSentAfterTheStopOnAConnectionAcceptedBeforeIsServed: the settle (step 2)
// sends no GOAWAY to a connection whose client has said its preface but not yet
// made its first call, and serves that call when it comes. GracefulStop at the stop
// would send the GOAWAY at once, and a client that sees it first must not send the
// call.
func TestACallSentAfterTheStopOnAConnectionAcceptedBeforeIsServed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, health.NewServer())
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- ServeUntil(s, ln, stop, ally.DrainOptions{Settle: 5 * time.Second}) }()

	c := dialH2(t, ln.Addr().String())
	defer c.Close()
	time.Sleep(200 * time.Millisecond) // the server's handshake
	close(stop)
	quiet := time.After(500 * time.Millisecond)
wait:
	for {
		select {
		case f := <-c.frames:
			if f.kind == 0x7 {
				t.Fatal("GOAWAY before the connection's first call, while it settles")
			}
		case <-quiet:
			break wait
		}
	}

	var headers []byte
	for _, h := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/grpc.health.v1.Health/Check"},
		{":authority", "test"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		headers = append(headers, hpackLiteral(h[0], h[1])...)
	}
	c.frame(t, 0x1, 0x4, 1, headers)               // HEADERS, END_HEADERS
	c.frame(t, 0x0, 0x1, 1, []byte{0, 0, 0, 0, 0}) // DATA: an empty HealthCheckRequest, END_STREAM
	answered, goaway := false, false
	deadline := time.After(10 * time.Second)
	for !(answered && goaway) {
		select {
		case f, ok := <-c.frames:
			if !ok {
				t.Fatalf("the connection ended; answered=%v goaway=%v", answered, goaway)
			}
			switch {
			case f.kind == 0x0 && f.stream == 1 && len(f.payload) > 5:
				answered = true
			case f.kind == 0x3 && f.stream == 1:
				t.Fatalf("the call was reset: %x", f.payload)
			case f.kind == 0x7:
				goaway = true
			}
		case <-deadline:
			t.Fatalf("answered=%v goaway=%v", answered, goaway)
		}
	}
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeUntil did not return")
	}
}
