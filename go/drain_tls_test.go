package ally

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"testing"
	"time"
)

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// Over TLS the connections are tracked under the TLS layer: an HTTP/1.1 one is
// told to close on its next request as in the clear, and an HTTP/2 one is left to
// Shutdown's GOAWAY, Settle after the stop, without waiting for any idle time.
func TestServeTLSDrainsHTTP1AndHTTP2(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello %s", r.URL.Path)
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}},
	}
	stop := make(chan struct{})
	done := make(chan error, 1)
	idle, settle := 5*time.Second, 300*time.Millisecond
	go func() {
		done <- serveUntil(srv, ln, stop, DrainOptions{Idle: idle, Settle: settle}, func(l net.Listener) error {
			return srv.ServeTLS(l, "", "")
		})
	}()

	h2 := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: true,
	}}
	resp, err := h2.Get("https://" + addr + "/h2")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("the client spoke %s, not HTTP/2", resp.Proto)
	}

	h1, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer h1.Close()
	r := bufio.NewReader(h1)
	if resp := get(t, h1, r, http11); resp.Close {
		t.Fatal("closed before the stop")
	}

	stopped := time.Now()
	close(stop)
	time.Sleep(200 * time.Millisecond)
	if resp := get(t, h1, r, http11); !resp.Close {
		t.Fatalf("an HTTP/1.1 answer over TLS during the drain does not say Connection: close: %v", resp.Header)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(idle / 2):
		t.Fatal("the drain waited the idle time for the HTTP/2 connection")
	}
	if took := time.Since(stopped); took < settle {
		t.Fatalf("HTTP/2 got its GOAWAY %v after the stop, before the settle %v", took, settle)
	}
}
