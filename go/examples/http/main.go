// Command http is the Go quick-start app: a net/http server that says which
// version, process and generation answered, drained by ally.Serve so that a reload
// loses no request.
//
//	http [--listen ADDR] [--version V] [--ready-delay D] [--plain-shutdown]
//
// Every request gets 200 OK with the body "hello version=V pid=P generation=G".
// Under `ally run` it takes its socket from the broker; alone it binds it itself
// (simulate mode). --plain-shutdown stops the usual way instead, for comparison:
// srv.Shutdown at the stop, which closes idle keep-alive connections at once and
// so loses a request a client sends on one at that moment. Build and run it under
// a broker:
//
//	go/offline.sh build -o target/go/hello-http ./examples/http
//	target/debug/ally run hello-go -- target/go/hello-http --listen 127.0.0.1:8080
//	ally reload hello-go
package main

import (
	"context"
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
	plainShutdown := flag.Bool("plain-shutdown", false, "stop with srv.Shutdown at the stop instead of ally.Serve's drain (loses requests; for comparison)")
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
	// Watch the stop before saying ready: from then on the stop signal drains
	// instead of ending the process.
	stopping := ally.Stopping()
	if err := ally.Ready(); err != nil {
		log.Fatal(err)
	}
	if *plainShutdown {
		go srv.Serve(ln)
		<-stopping
		if err := srv.Shutdown(context.Background()); err != nil {
			log.Fatal(err)
		}
	} else if err := ally.Serve(srv, ln); err != nil {
		// Serves until the stop, then drains: returns once every connection is done.
		log.Fatal(err)
	}
	log.Printf("stopped pid=%d", pid)
}
