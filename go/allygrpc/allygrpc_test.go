package allygrpc

import (
	"context"
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
