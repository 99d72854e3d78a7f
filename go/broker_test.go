package ally

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Tests against a real broker: the test binary runs itself as the app under
// `ally run`, with ALLY_GO_TEST_CHILD naming what the child does (TestChild) and
// ALLY_GO_TEST_DIR where it reports.
const (
	childEnv = "ALLY_GO_TEST_CHILD"
	dirEnv   = "ALLY_GO_TEST_DIR"
)

// allyBin finds the broker: ALLY_BIN, else ../target/debug/ally.
func allyBin(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ALLY_BIN"); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("ALLY_BIN=%s: %v", p, err)
		}
		return p
	}
	if p, err := filepath.Abs(filepath.Join("..", "target", "debug", "ally")); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("ALLY_GO_SIMULATE_ONLY") == "1" {
		t.Skip("ALLY_GO_SIMULATE_ONLY=1: no broker tests")
	}
	t.Fatalf("these tests need the broker: build it with `cargo build --bin ally` at the repository root " +
		"(it is then found as ../target/debug/ally), or set ALLY_BIN=/path/to/ally; " +
		"ALLY_GO_SIMULATE_ONLY=1 runs the simulate-mode tests only")
	return ""
}

// syncBuffer collects the broker's and its instances' output.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type broker struct {
	t      *testing.T
	bin    string
	app    string
	rt     string
	dir    string // where the children report
	cmd    *exec.Cmd
	out    *syncBuffer
	exited chan struct{}
}

// childCommand is this test binary, running TestChild only.
func childCommand(t *testing.T) []string {
	self, err := filepath.Abs(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	return []string{self, "-test.run=^TestChild$", "-test.v", "-test.count=1", "-test.timeout=150s"}
}

// startBroker runs `ally run --bus none --runtime-dir <tmp> <app> <args...>` with the
// child's role in its environment. The broker is stopped (and, failing that, killed
// with every instance that reported its pid) when the test ends.
func startBroker(t *testing.T, role string, args ...string) *broker {
	t.Helper()
	b := &broker{t: t, bin: allyBin(t), app: "gotest", rt: t.TempDir(), dir: t.TempDir(), out: &syncBuffer{}, exited: make(chan struct{})}
	full := append([]string{"run", "--bus", "none", "--runtime-dir", b.rt}, args...)
	b.cmd = exec.Command(b.bin, full...)
	b.cmd.Env = append(os.Environ(), childEnv+"="+role, dirEnv+"="+b.dir, "ALLY_ADDRESS=", "ALLY_STATE_ADDRESS=")
	b.cmd.Stdout, b.cmd.Stderr = b.out, b.out
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = b.cmd.Wait(); close(b.exited) }()
	t.Cleanup(b.stop)
	return b
}

func (b *broker) stop() {
	select {
	case <-b.exited:
	default:
		_ = b.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-b.exited:
		case <-time.After(60 * time.Second):
			b.t.Errorf("the broker did not stop within 60s of SIGTERM; killing it")
			_ = b.cmd.Process.Kill()
			<-b.exited
		}
	}
	// An instance the broker could not stop must not outlive the test.
	pids, _ := filepath.Glob(filepath.Join(b.dir, "pid-*"))
	for _, p := range pids {
		if text, err := os.ReadFile(p); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(text))); err == nil && pid > 0 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if b.t.Failed() {
		b.t.Logf("broker and instances said:\n%s", b.out.String())
	}
}

// waitFile waits for a child's report and returns its text.
func (b *broker) waitFile(name string, within time.Duration) string {
	b.t.Helper()
	path := filepath.Join(b.dir, name)
	deadline := time.Now().Add(within)
	for {
		if text, err := os.ReadFile(path); err == nil && strings.HasSuffix(string(text), "\n") {
			return strings.TrimSpace(string(text))
		}
		select {
		case <-b.exited:
			if text, err := os.ReadFile(path); err == nil {
				return strings.TrimSpace(string(text))
			}
			b.t.Fatalf("the broker exited before %s was written", name)
		default:
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("%s not written within %v", name, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ctl runs an ally command (reload, atomic, ...) on this broker, with a deadline.
func (b *broker) ctl(within time.Duration, command []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	full := append(append(append([]string{}, command...), "--runtime-dir", b.rt), args...)
	out, err := exec.CommandContext(ctx, b.bin, full...).CombinedOutput()
	return string(out), err
}

// writeConfig writes a config whose command is this test binary's TestChild.
func writeConfig(t *testing.T, extra string) string {
	var quoted []string
	for _, a := range childCommand(t) {
		quoted = append(quoted, strconv.Quote(a))
	}
	path := filepath.Join(t.TempDir(), "gotest.toml")
	text := fmt.Sprintf("command = [%s]\nready_timeout = \"60s\"\nstop_timeout = \"30s\"\n%s", strings.Join(quoted, ", "), extra)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// report writes name in the test's report directory, atomically (a reader sees all or
// nothing: the text ends with a newline).
func report(t *testing.T, name, format string, args ...interface{}) {
	dir := os.Getenv(dirEnv)
	tmp := filepath.Join(dir, "."+name)
	if err := os.WriteFile(tmp, []byte(fmt.Sprintf(format, args...)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func TestBroker(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	b := startBroker(t, "suite", b0(t)...)
	if got := b.waitFile("suite-1", 120*time.Second); got != "PASS" {
		t.Fatalf("the suite under the broker: %s", got)
	}
}

func b0(t *testing.T) []string { return append([]string{"gotest", "--"}, childCommand(t)...) }

// Two generations racing Atomic.CompareAndSwap lose no increment.
func TestBrokerCASAcrossGenerations(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	b := startBroker(t, "cas", "-c", writeConfig(t, ""), "gotest")
	b.waitFile("ready-1", 60*time.Second)
	if out, err := b.ctl(120*time.Second, []string{"reload"}, "gotest"); err != nil {
		t.Fatalf("ally reload: %v\n%s", err, out)
	}
	one, two := b.waitFile("cas-1", 60*time.Second), b.waitFile("cas-2", 60*time.Second)
	t.Logf("generation 1: %s; generation 2: %s", one, two)
	out, err := b.ctl(30*time.Second, []string{"atomic", "get"}, "gotest", "cas-count")
	if err != nil {
		t.Fatalf("ally atomic get: %v\n%s", err, out)
	}
	if got, want := strings.TrimSpace(out), strconv.Itoa(2*casIncrements); got != want {
		t.Fatalf("after %s increments by two generations the counter is %s", want, got)
	}
}

const casIncrements = 2000

// A lock held by a SIGKILLed instance passes to the next waiter.
func TestBrokerLockOfKilledInstance(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	b := startBroker(t, "lock", "-c", writeConfig(t, ""), "gotest")
	holder, err := strconv.Atoi(b.waitFile("held-1", 60*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	reload := make(chan error, 1)
	go func() {
		out, err := b.ctl(120*time.Second, []string{"reload"}, "gotest")
		if err != nil {
			err = fmt.Errorf("%v: %s", err, out)
		}
		reload <- err
	}()
	if got := b.waitFile("waiting-2", 60*time.Second); got != "PASS" {
		t.Fatalf("generation 2 while generation 1 held the lock: %s", got)
	}
	if err := syscall.Kill(holder, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if got := b.waitFile("acquired-2", 60*time.Second); got != "PASS" {
		t.Fatalf("the waiter: %s", got)
	}
	select {
	case err := <-reload:
		if err != nil {
			t.Fatalf("ally reload: %v", err)
		}
	case <-time.After(120 * time.Second):
		t.Fatal("ally reload did not return")
	}
}

// With sockets = "listen-fds", Listen takes the inherited socket of a declared address.
func TestBrokerListenFDs(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "fds.sock")
	args := append([]string{"--sockets", "listen-fds", "--listen", "unix:" + path}, b0(t)...)
	b := startBroker(t, "listenfds:"+path, args...)
	if got := b.waitFile("listenfds-1", 60*time.Second); got != "PASS" {
		t.Fatalf("the instance: %s", got)
	}
}

// TestChild is the app under a broker started by the tests above.
func TestChild(t *testing.T) {
	role := os.Getenv(childEnv)
	if role == "" {
		t.Skip("runs as an instance of a broker the other tests start")
	}
	if !Managed() {
		t.Fatalf("%s is set but ALLY_ADDRESS is not", childEnv)
	}
	gen := Generation()
	report(t, fmt.Sprintf("pid-%d", gen), "%d", os.Getpid())
	result := func(name string) {
		if t.Failed() {
			report(t, fmt.Sprintf("%s-%d", name, gen), "FAIL (see the test output)")
		} else {
			report(t, fmt.Sprintf("%s-%d", name, gen), "PASS")
		}
	}
	switch {
	case role == "suite":
		must(t, Ready())
		runSuite(t)
		// Cache and Atomic calls went over the state socket.
		if os.Getenv("ALLY_STATE_ADDRESS") == "" || !self().stateOK || self().state.current() == nil || !self().state.current().Connected() {
			t.Errorf("no state socket connection (ALLY_STATE_ADDRESS=%q)", os.Getenv("ALLY_STATE_ADDRESS"))
		}
		result("suite")
	case role == "cas":
		childCAS(t, gen)
	case role == "lock":
		childLock(t, gen)
	case role == "reexec":
		childReexec(t)
		result("reexec")
	case strings.HasPrefix(role, "listenfds:"):
		childListenFDs(t, strings.TrimPrefix(role, "listenfds:"))
		result("listenfds")
	default:
		t.Fatalf("unknown role %q", role)
	}
}

func childCAS(t *testing.T, gen uint64) {
	stopping := Stopping()
	started := NewAtomic("cas-started")
	if gen == 1 {
		must(t, Ready())
		report(t, "ready-1", "ready")
	}
	_, err := started.Add(1)
	must(t, err)
	waitUntil(t, "both generations run", 60*time.Second, func() bool {
		n, err := started.Load()
		must(t, err)
		return n >= 2
	})
	counter := NewAtomic("cas-count")
	lost := 0
	for i := 0; i < casIncrements; i++ {
		for {
			v, err := counter.Load()
			must(t, err)
			ok, err := counter.CompareAndSwap(v, v+1)
			must(t, err)
			if ok {
				break
			}
			lost++
		}
	}
	report(t, fmt.Sprintf("cas-%d", gen), "%d increments, %d CAS lost to the other generation", casIncrements, lost)
	if gen == 2 {
		must(t, Ready())
	}
	select {
	case <-stopping:
	case <-time.After(120 * time.Second):
		t.Fatal("no stop within 120s")
	}
}

func childLock(t *testing.T, gen uint64) {
	stopping := Stopping()
	l := NewLocker("held-by-gen-1")
	if gen == 1 {
		must(t, Ready())
		must(t, l.Lock())
		report(t, "held-1", "%d", os.Getpid())
		<-stopping // it is SIGKILLed first
		return
	}
	acquired := make(chan error, 1)
	go func() { acquired <- l.LockTimeout(60 * time.Second) }()
	var holders []LockHold
	waitUntil(t, "generation 2 queues for the lock generation 1 holds", 60*time.Second, func() bool {
		h, w, err := l.Queues()
		must(t, err)
		holders = h
		return len(w) == 1 && w[0].Owner == ID()
	})
	if len(holders) != 1 || holders[0].Owner == ID() || !holders[0].Write {
		report(t, "waiting-2", "FAIL: holders %+v", holders)
		t.Fatalf("holders while generation 2 waits: %+v", holders)
	}
	report(t, "waiting-2", "PASS")
	if err := <-acquired; err != nil {
		report(t, "acquired-2", "FAIL: %v", err)
		t.Fatal(err)
	}
	report(t, "acquired-2", "PASS")
	must(t, l.Unlock())
	must(t, Ready())
	select {
	case <-stopping:
	case <-time.After(120 * time.Second):
		t.Fatal("no stop within 120s")
	}
}

func childListenFDs(t *testing.T, path string) {
	if os.Getenv("LISTEN_FDS") != "" || os.Getenv("LISTEN_PID") != "" {
		t.Errorf("LISTEN_FDS/LISTEN_PID left set for children: %q %q", os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_PID"))
	}
	if len(inherited) != 1 {
		t.Fatalf("%d inherited sockets, want 1", len(inherited))
	}
	if s, _ := inheritedMatch("unix", path); s == nil {
		t.Fatalf("the inherited socket does not match unix %s", path)
	}
	// Close of an inherited address drops nothing and leaks no descriptor.
	before := openFDs(t)
	must(t, Close("unix", path))
	if after := openFDs(t); after != before {
		t.Errorf("Close of an inherited address: %d open fds, then %d", before, after)
	}
	ln, err := Listen("unix", path)
	must(t, err)
	defer ln.Close()
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	must(t, err)
	defer conn.Close()
	must(t, ln.(*net.UnixListener).SetDeadline(time.Now().Add(5*time.Second)))
	c, err := ln.Accept()
	must(t, err)
	c.Close()
	must(t, Ready())
}

func openFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
