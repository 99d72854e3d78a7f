// The Go server of `cargo bench -p ally-bench --bench go`: one net/http handler,
// run the three ways a Go service is upgraded, and a sequential state caller.
//
//	goserver ally --listen ADDR         under `ally run`: ally.Listen, ally.Ready, ally.Serve
//	goserver tableflip --listen ADDR --pid-file F
//	                                    cloudflare/tableflip as its example does it:
//	                                    SIGHUP → Upgrade; Ready; <-Exit(); Shutdown
//	goserver plain --listen ADDR        binds itself; SIGTERM → Shutdown (stop, then start)
//	goserver state                      reads "OP SECONDS" lines (OP: add, get, set) on
//	                                    stdin, calls the broker sequentially, prints ops/s
//
// Every server answers `GET /` with `hello <version> pid=<pid>`, the version read
// once at start from the file named by APP_VERSION_FILE.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

func main() {
	if len(os.Args) < 2 {
		log.Fatal("usage: goserver ally|tableflip|plain|state [flags]")
	}
	mode := os.Args[1]
	flags := flag.NewFlagSet(mode, flag.ExitOnError)
	listen := flags.String("listen", "127.0.0.1:8080", "address to serve")
	pidFile := flags.String("pid-file", "", "tableflip's pid file")
	_ = flags.Parse(os.Args[2:])
	log.SetPrefix(fmt.Sprintf("%s %d ", mode, os.Getpid()))

	switch mode {
	case "ally":
		serveAlly(*listen, handler())
	case "tableflip":
		serveTableflip(*listen, *pidFile, handler())
	case "plain":
		servePlain(*listen, handler())
	case "state":
		stateCalls(os.Stdin, os.Stdout)
	default:
		log.Fatalf("unknown mode %q", mode)
	}
}

// handler is the same in every mode.
func handler() http.Handler {
	raw, err := os.ReadFile(os.Getenv("APP_VERSION_FILE"))
	if err != nil {
		log.Fatalf("reading the version: %v", err)
	}
	body := fmt.Sprintf("hello %s pid=%d\n", strings.TrimSpace(string(raw)), os.Getpid())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, body)
	})
}

// serveTableflip is tableflip's http example, as its users copy it.
func serveTableflip(addr, pidFile string, h http.Handler) {
	upg, err := tableflip.New(tableflip.Options{PIDFile: pidFile})
	if err != nil {
		log.Fatal(err)
	}
	defer upg.Stop()

	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGHUP)
		for range sig {
			if err := upg.Upgrade(); err != nil {
				log.Println("Upgrade failed:", err)
			}
		}
	}()

	ln, err := upg.Listen("tcp", addr)
	if err != nil {
		log.Fatalln("Can't listen:", err)
	}
	server := http.Server{Handler: h}
	go func() {
		if err := server.Serve(ln); err != http.ErrServerClosed {
			log.Println("HTTP server:", err)
		}
	}()
	if err := upg.Ready(); err != nil {
		log.Fatal(err)
	}
	<-upg.Exit()

	time.AfterFunc(30*time.Second, func() {
		log.Println("Graceful shutdown timed out")
		os.Exit(1)
	})
	_ = server.Shutdown(context.Background())
}

// servePlain binds the address itself and stops gracefully on SIGTERM: a new
// version can bind only once this one has closed its listener.
func servePlain(addr string, h http.Handler) {
	server := http.Server{Addr: addr, Handler: h}
	done := make(chan struct{})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
		close(done)
	}()
	if err := server.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	<-done
}
