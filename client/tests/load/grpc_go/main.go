// grpc_go ADDR CLIENTS: unary calls to hello.Greeter/Hello back to back, each
// client on the one channel it keeps, until stdin closes; then prints
// "calls=N failed=M" and one line per distinct error.
//
// No retry policy is configured: what grpc-go does on its own is all there is
// (its transparent retry of a call that never left the client, gRFC A6).
// Builds offline from Debian's golang-google-grpc-dev, in GOPATH mode.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
)

// raw passes the request's protobuf bytes as they are and keeps the answer's.
type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error)      { return v.([]byte), nil }
func (raw) Unmarshal(data []byte, v interface{}) error { *(v.(*[]byte)) = data; return nil }
func (raw) Name() string                               { return "proto" }

func main() {
	addr := os.Args[1]
	clients, err := strconv.Atoi(os.Args[2])
	if err != nil {
		panic(err)
	}
	var calls, failed int64
	var errs sync.Map
	var stop int32
	go func() {
		io.Copy(io.Discard, os.Stdin)
		atomic.StoreInt32(&stop, 1)
	}()
	// HelloRequest{name: "go"}: field 1, length-delimited.
	request := []byte{0x0a, 2, 'g', 'o'}
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := grpc.Dial(addr, grpc.WithInsecure())
			if err != nil {
				panic(err)
			}
			defer conn.Close()
			for atomic.LoadInt32(&stop) == 0 {
				var answer []byte
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := conn.Invoke(ctx, "/hello.Greeter/Hello", request, &answer, grpc.ForceCodec(raw{}))
				cancel()
				atomic.AddInt64(&calls, 1)
				if err != nil {
					atomic.AddInt64(&failed, 1)
					errs.Store(err.Error(), true)
				}
			}
		}()
	}
	wg.Wait()
	fmt.Printf("calls=%d failed=%d\n", calls, failed)
	errs.Range(func(e, _ interface{}) bool {
		fmt.Println("error:", e)
		return true
	})
}
