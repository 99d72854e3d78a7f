package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"
	"time"

	ally "github.com/ally-rs/ally/go"
)

// serveAlly is the package's quick start: the socket from the broker, Ready once
// serving is set up, and ally.Serve, which drains at the stop.
func serveAlly(addr string, h http.Handler) {
	ln, err := ally.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	if err := ally.Ready(); err != nil {
		log.Fatal(err)
	}
	if err := ally.Serve(&http.Server{Handler: h}, ln); err != nil {
		log.Fatal(err)
	}
}

// stateCalls answers each "OP SECONDS" line with the ops/s of one caller calling
// OP back to back for that long (checking the clock every 100 calls, as the Rust
// side does).
func stateCalls(in io.Reader, out io.Writer) {
	counter := ally.NewAtomic("bench")
	cache := ally.NewCache("bench")
	var i uint64
	value := make([]byte, 8)
	calls := map[string]func() error{
		"add": func() error { _, err := counter.Add(1); return err },
		"get": func() error { _, _, err := cache.Get("key"); return err },
		"set": func() error {
			binary.LittleEndian.PutUint64(value, i)
			i++
			return cache.Set("key", value, 0)
		},
	}
	lines := bufio.NewScanner(in)
	for lines.Scan() {
		fields := strings.Fields(lines.Text())
		if len(fields) != 2 {
			log.Fatalf("expected OP SECONDS, got %q", lines.Text())
		}
		call, ok := calls[fields[0]]
		secs, err := strconv.ParseFloat(fields[1], 64)
		if !ok || err != nil {
			log.Fatalf("expected OP SECONDS with OP one of add, get, set, got %q", lines.Text())
		}
		budget := time.Duration(secs * float64(time.Second))
		start := time.Now()
		n := 0
		for time.Since(start) < budget {
			for j := 0; j < 100; j++ {
				if err := call(); err != nil {
					log.Fatalf("%s: %v", fields[0], err)
				}
			}
			n += 100
		}
		fmt.Fprintf(out, "%.1f\n", float64(n)/time.Since(start).Seconds())
	}
}
