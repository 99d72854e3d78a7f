package ally

import (
	"context"
	"errors"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The semantics suite: it runs in simulate mode (TestSimulate) and, unchanged, as an
// instance of a real broker (TestBroker runs this test binary under `ally run`).
func runSuite(t *testing.T) {
	t.Run("ListenSharesOneSocketPerAddress", testListenShares)
	t.Run("ListenUnix", testListenUnix)
	t.Run("ListenPacket", testListenPacket)
	t.Run("ListenErrors", testListenErrors)
	t.Run("Cache", testCache)
	t.Run("CacheTTL", testCacheTTL)
	t.Run("CacheRaces", testCacheRaces)
	t.Run("Atomic", testAtomic)
	t.Run("Locker", testLocker)
	t.Run("LockerFIFO", testLockerFIFO)
	t.Run("LockContextCancelLeaksNothing", testLockContextCancel)
	t.Run("Report", testReport)
	// Last: the stop cannot be undone.
	t.Run("Stopping", testStopping)
}

// waitUntil polls cond until it holds, failing the test after the deadline.
func waitUntil(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func testListenShares(t *testing.T) {
	a, err := Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer a.Close()
	// Port 0 binds a free port once: the same request gets the same socket.
	b, err := Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer b.Close()
	if a.Addr().String() != b.Addr().String() {
		t.Fatalf("two Listen of 127.0.0.1:0 gave %v and %v", a.Addr(), b.Addr())
	}
	port := a.(*net.TCPListener).Addr().(*net.TCPAddr).Port
	// localhost:P is 127.0.0.1:P: the same socket, not a second bind (EADDRINUSE).
	c, err := ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: port})
	must(t, err)
	defer c.Close()
	d, err := Listen("tcp", "localhost:"+strconv.Itoa(port))
	must(t, err)
	defer d.Close()
	// A connection is accepted on any of the duplicates.
	conn, err := net.DialTimeout("tcp", a.Addr().String(), 5*time.Second)
	must(t, err)
	defer conn.Close()
	must(t, c.SetDeadline(time.Now().Add(5*time.Second)))
	got, err := c.Accept()
	must(t, err)
	got.Close()
	// Closing a listener leaves the others serving.
	a.Close()
	conn2, err := net.DialTimeout("tcp", b.Addr().String(), 5*time.Second)
	must(t, err)
	defer conn2.Close()
	must(t, c.SetDeadline(time.Now().Add(5*time.Second)))
	got, err = c.Accept()
	must(t, err)
	got.Close()
}

func testListenUnix(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	a, err := ListenWith("unix", path, ListenOptions{Mode: 0o600})
	must(t, err)
	defer a.Close()
	st, err := os.Stat(path)
	must(t, err)
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("%s: mode %v, want a socket with 0600", path, st.Mode())
	}
	// "/dir//./s.sock" normalises to the same socket.
	b, err := ListenUnix("unix", &net.UnixAddr{Name: dir + "//./s.sock", Net: "unix"})
	must(t, err)
	defer b.Close()
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	must(t, err)
	defer conn.Close()
	must(t, b.SetDeadline(time.Now().Add(5*time.Second)))
	got, err := b.Accept()
	must(t, err)
	got.Close()
	must(t, Close("unix", path))
}

func testListenPacket(t *testing.T) {
	pc, err := ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP("127.0.0.1")})
	must(t, err)
	defer pc.Close()
	client, err := net.Dial("udp", pc.LocalAddr().String())
	must(t, err)
	defer client.Close()
	_, err = client.Write([]byte("ping"))
	must(t, err)
	must(t, pc.SetDeadline(time.Now().Add(5*time.Second)))
	buf := make([]byte, 16)
	n, _, err := pc.ReadFrom(buf)
	must(t, err)
	if string(buf[:n]) != "ping" {
		t.Fatalf("read %q", buf[:n])
	}
	ug, err := ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "g.sock"), Net: "unixgram"})
	must(t, err)
	ug.Close()
}

func testListenErrors(t *testing.T) {
	for _, c := range []struct{ network, address string }{
		{"tcp", "no-port"},
		{"tcp", "::1:80"},
		{"unix", "relative.sock"},
		{"sctp", ":80"},
	} {
		_, err := Listen(c.network, c.address)
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("Listen(%q, %q) = %v, want ErrInvalidArgument", c.network, c.address, err)
		}
	}
	// An address another process holds.
	other, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer other.Close()
	_, err = Listen("tcp", other.Addr().String())
	if !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("Listen of a taken address = %v, want ErrAddressInUse", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Message == "" {
		t.Fatalf("the error %v does not keep a message", err)
	}
}

func testCache(t *testing.T) {
	c := NewCache("suite")
	_, err := c.Flush()
	must(t, err)
	must(t, c.Set("b", []byte("2"), 0))
	must(t, c.Set("a", []byte("1"), 0))
	v, ok, err := c.Get("a")
	must(t, err)
	if !ok || string(v) != "1" {
		t.Fatalf("Get a = %q %v", v, ok)
	}
	if v, ok, _ := c.Get("absent"); ok || v != nil {
		t.Fatalf("Get absent = %q %v", v, ok)
	}
	keys, err := c.Keys()
	must(t, err)
	if len(keys) != 2 || keys[0] != "a" || keys[1] != "b" {
		t.Fatalf("Keys = %q, want [a b]", keys)
	}
	if n, _ := c.Count(); n != 2 {
		t.Fatalf("Count = %d", n)
	}
	// CompareAndSwap: an absent key never matches, not even with an empty old value.
	if ok, _ := c.CompareAndSwap("absent", nil, []byte("x"), 0); ok {
		t.Fatal("CompareAndSwap created an absent key")
	}
	if ok, _ := c.CompareAndSwap("a", []byte("wrong"), []byte("x"), 0); ok {
		t.Fatal("CompareAndSwap matched a wrong value")
	}
	if ok, _ := c.CompareAndSwap("a", []byte("1"), []byte("x"), 0); !ok {
		t.Fatal("CompareAndSwap did not match the value")
	}
	if ok, _ := c.SetIfAbsent("a", []byte("y"), 0); ok {
		t.Fatal("SetIfAbsent replaced a present key")
	}
	if ok, _ := c.Delete("a"); !ok {
		t.Fatal("Delete of a present key said absent")
	}
	if ok, _ := c.Exists("a"); ok {
		t.Fatal("a exists after Delete")
	}
	if n, _ := c.Flush(); n != 1 {
		t.Fatalf("Flush = %d, want 1", n)
	}
	if _, _, err := NewCache("").Get("k"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("empty namespace: %v, want ErrInvalidArgument", err)
	}
	long := strings.Repeat("k", 1025)
	if err := c.Set("k"+long, nil, 0); !errors.Is(err, ErrLimitExceeded) {
		t.Fatalf("1 KiB key: %v, want ErrLimitExceeded", err)
	}
}

func testCacheTTL(t *testing.T) {
	c := NewCache("suite-ttl")
	must(t, c.Set("short", []byte("v"), 30*time.Millisecond))
	must(t, c.Set("long", []byte("v"), time.Hour))
	waitUntil(t, "the 30 ms key expires", 10*time.Second, func() bool {
		ok, err := c.Exists("short")
		must(t, err)
		return !ok
	})
	keys, _ := c.Keys()
	if len(keys) != 1 || keys[0] != "long" {
		t.Fatalf("Keys after expiry = %q", keys)
	}
	// An expired key is absent for SetIfAbsent.
	must(t, c.Set("short", []byte("v"), 20*time.Millisecond))
	waitUntil(t, "SetIfAbsent over the expired key", 10*time.Second, func() bool {
		ok, err := c.SetIfAbsent("short", []byte("w"), 0)
		must(t, err)
		return ok
	})
	_, _ = c.Flush()
}

func testCacheRaces(t *testing.T) {
	c := NewCache("suite-race")
	_, _ = c.Flush()
	const n = 16
	var wins sync.WaitGroup
	results := make(chan bool, n)
	for i := 0; i < n; i++ {
		wins.Add(1)
		go func(i int) {
			defer wins.Done()
			ok, err := c.SetIfAbsent("k", []byte(strconv.Itoa(i)), 0)
			if err != nil {
				t.Error(err)
			}
			results <- ok
		}(i)
	}
	wins.Wait()
	close(results)
	won := 0
	for ok := range results {
		if ok {
			won++
		}
	}
	if won != 1 {
		t.Fatalf("%d SetIfAbsent calls won, want exactly 1", won)
	}
	_, _ = c.Flush()
}

func testAtomic(t *testing.T) {
	a := NewAtomic("suite-counter")
	if v, _ := NewAtomic("suite-never-written").Load(); v != 0 {
		t.Fatalf("Load of a counter never written = %d", v)
	}
	must(t, a.Store(math.MaxInt64))
	v, err := a.Add(1)
	must(t, err)
	if v != math.MinInt64 {
		t.Fatalf("MaxInt64 + 1 = %d, want the wraparound to MinInt64", v)
	}
	old, err := a.Swap(10)
	must(t, err)
	if old != math.MinInt64 {
		t.Fatalf("Swap returned %d", old)
	}
	if ok, _ := a.CompareAndSwap(9, 11); ok {
		t.Fatal("CompareAndSwap matched a wrong value")
	}
	// Racing CAS increments lose nothing.
	must(t, a.Store(0))
	const workers, each = 8, 50
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if err := casIncrement(a); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if v, _ := a.Load(); v != workers*each {
		t.Fatalf("after %d CAS increments the counter is %d", workers*each, v)
	}
}

// casIncrement adds one with a Load/CompareAndSwap loop; how many tries it lost.
func casIncrement(a *Atomic) error {
	for {
		v, err := a.Load()
		if err != nil {
			return err
		}
		ok, err := a.CompareAndSwap(v, v+1)
		if err != nil || ok {
			return err
		}
	}
}

func testLocker(t *testing.T) {
	l := NewLocker("suite-lock")
	must(t, l.Lock())
	if ok, err := l.TryLock(); ok || err != nil {
		t.Fatalf("TryLock of a held lock = %v %v", ok, err)
	}
	if ok, _ := l.TryRLock(); ok {
		t.Fatal("TryRLock of a write-held lock succeeded")
	}
	start := time.Now()
	err := l.LockTimeout(50 * time.Millisecond)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("LockTimeout of a held lock = %v, want ErrTimeout", err)
	}
	if time.Since(start) < 40*time.Millisecond {
		t.Fatalf("LockTimeout gave up after %v", time.Since(start))
	}
	if err := l.RUnlock(); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("RUnlock of a write hold = %v, want ErrNotOwner", err)
	}
	must(t, l.Unlock())
	if err := l.Unlock(); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("Unlock of a free lock = %v, want ErrNotOwner", err)
	}
	// Readers share.
	must(t, l.RLock())
	must(t, l.RLockTimeout(time.Second))
	if ok, _ := l.TryLock(); ok {
		t.Fatal("TryLock of a read-held lock succeeded")
	}
	must(t, l.RUnlock())
	must(t, l.RUnlock())
	if ok, _ := l.TryLock(); !ok {
		t.Fatal("TryLock of a free lock failed")
	}
	must(t, l.Unlock())
	if err := NewLocker("").Lock(); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("empty lock name: %v, want ErrInvalidArgument", err)
	}
}

func waiters(t *testing.T, l *Locker) int {
	_, w, err := l.Queues()
	must(t, err)
	return len(w)
}

func testLockerFIFO(t *testing.T) {
	l := NewLocker("suite-fifo")
	must(t, l.Lock())
	order := make(chan string, 2)
	go func() {
		if err := l.LockTimeout(30 * time.Second); err != nil {
			t.Error(err)
		}
		order <- "writer"
	}()
	waitUntil(t, "the writer waits", 10*time.Second, func() bool { return waiters(t, l) == 1 })
	go func() {
		if err := l.RLockTimeout(30 * time.Second); err != nil {
			t.Error(err)
		}
		order <- "reader"
	}()
	waitUntil(t, "the reader waits", 10*time.Second, func() bool { return waiters(t, l) == 2 })
	must(t, l.Unlock())
	if first := <-order; first != "writer" {
		t.Fatalf("%s was granted first; the writer queued first", first)
	}
	// The reader, queued behind the writer, still waits.
	if _, w, _ := l.Queues(); len(w) != 1 || w[0].Write {
		t.Fatalf("waiters after the writer's grant: %+v", w)
	}
	must(t, l.Unlock())
	if second := <-order; second != "reader" {
		t.Fatalf("second grant: %s", second)
	}
	must(t, l.RUnlock())
}

func testLockContextCancel(t *testing.T) {
	l := NewLocker("suite-cancel")
	must(t, l.Lock())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.LockContext(ctx) }()
	waitUntil(t, "the LockContext waits", 10*time.Second, func() bool { return waiters(t, l) == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled LockContext = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("LockContext did not return on cancel")
	}
	// The abandoned request may still be granted; it must then be given back.
	must(t, l.Unlock())
	waitUntil(t, "the lock is free again", 10*time.Second, func() bool {
		h, w, err := l.Queues()
		must(t, err)
		return len(h) == 0 && len(w) == 0
	})
	if ok, _ := l.TryLock(); !ok {
		t.Fatal("the lock leaked to the cancelled request")
	}
	must(t, l.Unlock())
	// A deadline gives up too.
	must(t, l.Lock())
	dctx, dcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer dcancel()
	if err := l.LockContext(dctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("LockContext past its deadline = %v", err)
	}
	must(t, l.Unlock())
}

func testStopping(t *testing.T) {
	if IsStopping() {
		t.Skip("the stop comes once per process: checked by the first run (-count > 1)")
	}
	hook := make(chan struct{})
	OnStop(func() { close(hook) })
	ch := Stopping()
	ctx := Context()
	must(t, syscall.Kill(os.Getpid(), self().stopSignal))
	for _, c := range []<-chan struct{}{ch, ctx.Done(), hook} {
		select {
		case <-c:
		case <-time.After(10 * time.Second):
			t.Fatal("the stop signal was not seen")
		}
	}
	if !IsStopping() {
		t.Fatal("IsStopping false after the stop")
	}
}
