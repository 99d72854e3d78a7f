// Command http is the Go quick-start app: a net/http server that says which
// version, process and generation answered, drained by ally.Serve so that a reload
// loses no request.
//
//	http [--listen ADDR] [--version V] [--ready-delay D]
//
// Every request gets 200 OK with the body "hello version=V pid=P generation=G".
// Under `ally run` it takes its socket from the broker; alone it binds it itself
// (simulate mode). Build and run it under a broker:
//
//	go/offline.sh build -o target/go/hello-http ./examples/http
//	target/debug/ally run hello-go -- target/go/hello-http --listen 127.0.0.1:8080
//	ally reload hello-go
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	ally "github.com/ally-rs/ally/go"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "the address to serve on")
	version := flag.String("version", os.Getenv("HELLO_VERSION"), "the version it reports (default $HELLO_VERSION, else 1)")
	readyDelay := flag.Duration("ready-delay", 0, "how long to wait before reporting ready")
	flag.Parse()
	if *version == "" {
		*version = "1"
	}
	log.SetPrefix("hello-http: ")
	log.SetFlags(0)

	ln, err := ally.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	pid := os.Getpid()
	mode := "managed"
	if !ally.Managed() {
		mode = "simulate mode"
	}
	log.Printf("listening on %s version=%s pid=%d generation=%d (%s)", ln.Addr(), *version, pid, ally.Generation(), mode)

	body := fmt.Sprintf("hello version=%s pid=%d generation=%d\n", *version, pid, ally.Generation())
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, body)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	time.Sleep(*readyDelay)
	if err := ally.Ready(); err != nil {
		log.Fatal(err)
	}
	go func() {
		<-ally.Stopping()
		log.Printf("stopping pid=%d", pid)
	}()
	// Serves until the stop, then drains: returns once every connection is done.
	if err := ally.Serve(srv, ln); err != nil {
		log.Fatal(err)
	}
	log.Printf("stopped pid=%d", pid)
}
