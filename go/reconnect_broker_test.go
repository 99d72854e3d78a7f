package ally

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

// The broker going away and coming back: the tests SIGKILL a real broker and start a
// new one on the same runtime directory, talking to it as this process (root, not an
// instance: an admin, who may use the shared state).

// restartingBroker is `ally run` that the test kills and starts again.
type restartingBroker struct {
	t      *testing.T
	bin    string
	app    string
	rt     string
	cmd    *exec.Cmd
	exited chan struct{}
	out    *syncBuffer
	// started: when the last broker started accepting connections.
	started time.Time
	// instances: pids of the instances of brokers killed, which outlive them.
	instances []int
}

func newRestartingBroker(t *testing.T) *restartingBroker {
	t.Helper()
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	b := &restartingBroker{t: t, bin: allyBin(t), app: "gore", rt: t.TempDir(), out: &syncBuffer{}}
	t.Cleanup(b.stop)
	return b
}

func (b *restartingBroker) address(socket string) string {
	return "unix:path=" + filepath.Join(b.rt, socket)
}

// start runs a broker and waits until it accepts connections.
func (b *restartingBroker) start() {
	b.t.Helper()
	cmd := exec.Command(b.bin, "run", "--bus", "none", "--runtime-dir", b.rt,
		"--ready", "delay", "--ready-delay", "10ms", b.app, "--", "sleep", "1000")
	cmd.Env = append(os.Environ(), "ALLY_ADDRESS=", "ALLY_STATE_ADDRESS=")
	cmd.Stdout, cmd.Stderr = b.out, b.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		b.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	b.cmd, b.exited = cmd, exited
	waitUntil(b.t, "the broker accepts connections", 30*time.Second, func() bool {
		select {
		case <-exited:
			b.t.Fatalf("the broker exited:\n%s", b.out.String())
		default:
		}
		for _, socket := range []string{"bus", "state"} {
			conn, err := dial(b.address(socket), time.Second)
			if err != nil {
				return false
			}
			conn.Close()
		}
		return true
	})
	b.started = time.Now()
}

// kill SIGKILLs the broker's process group, as a crash would end it.
func (b *restartingBroker) kill() {
	b.t.Helper()
	b.instances = append(b.instances, children(b.cmd.Process.Pid)...)
	if err := syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		b.t.Fatal(err)
	}
	select {
	case <-b.exited:
	case <-time.After(30 * time.Second):
		b.t.Fatal("the broker did not die of SIGKILL")
	}
}

// pause SIGSTOPs the broker and waits until each of its threads stopped: a call sent
// afterwards is read by no one.
func (b *restartingBroker) pause() {
	b.t.Helper()
	pid := b.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		b.t.Fatal(err)
	}
	waitUntil(b.t, "every thread of the broker stops", 10*time.Second, func() bool {
		tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/stat")
		for _, task := range tasks {
			stat, err := os.ReadFile(task)
			if err != nil {
				return false
			}
			// pid (comm) STATE ...: comm may hold spaces, not ")".
			fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
			if len(fields) == 0 || fields[0] != "T" {
				return false
			}
		}
		return len(tasks) > 0
	})
}

func (b *restartingBroker) stop() {
	if b.cmd != nil {
		select {
		case <-b.exited:
		default:
			_ = b.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-b.exited:
			case <-time.After(30 * time.Second):
				b.t.Errorf("the broker did not stop within 30s of SIGTERM; killing it")
				_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
				<-b.exited
			}
		}
	}
	for _, pid := range b.instances {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if b.t.Failed() {
		b.t.Logf("the brokers said:\n%s", b.out.String())
	}
}

// children are pid's child processes.
func children(pid int) []int {
	var pids []int
	lists, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/children")
	for _, list := range lists {
		text, _ := os.ReadFile(list)
		for _, f := range strings.Fields(string(text)) {
			if n, err := strconv.Atoi(f); err == nil {
				pids = append(pids, n)
			}
		}
	}
	return pids
}

// connectTo makes the package talk to b, with ALLY_RECONNECT_TIMEOUT=timeout, until
// the test ends. sent, when not nil, receives the member of every call the package
// sends, as it sends it.
func connectTo(t *testing.T, b *restartingBroker, timeout string, sent chan<- string) *instance {
	t.Setenv("ALLY_ADDRESS", b.address("bus"))
	t.Setenv("ALLY_STATE_ADDRESS", b.address("state"))
	t.Setenv("ALLY_APP", b.app)
	t.Setenv("ALLY_RECONNECT_TIMEOUT", timeout)
	self()
	previous := selfInst
	in := fromEnv()
	if sent != nil {
		watch := dbus.WithOutgoingInterceptor(func(m *dbus.Message) {
			if member, ok := m.Headers[dbus.FieldMember].Value().(string); ok && m.Type == dbus.TypeMethodCall {
				select {
				case sent <- member:
				default:
				}
			}
		})
		in.bus.options = []dbus.ConnOption{watch}
		in.state.options = []dbus.ConnOption{watch}
	}
	selfInst = in
	t.Cleanup(func() {
		selfInst = previous
		for _, lk := range []*link{in.bus, in.state} {
			lk.mu.Lock()
			if lk.conn != nil {
				lk.conn.Close()
			}
			lk.mu.Unlock()
		}
	})
	return in
}

// returns runs call, failing the test if it has not returned within d.
func returns(t *testing.T, what string, d time.Duration, call func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- call() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("%s: no return within %v", what, d)
		return nil
	}
}

// waitSent waits until the package sent a call of member.
func waitSent(t *testing.T, sent <-chan string, member string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-sent:
			if m == member {
				return
			}
		case <-deadline:
			t.Fatalf("no %s call was sent", member)
		}
	}
}

func (lk *link) current() *dbus.Conn {
	lk.mu.Lock()
	defer lk.mu.Unlock()
	return lk.conn
}

// After the broker died and came back, the next calls, on both sockets and whatever
// they do, reconnect without the caller seeing it.
func TestReconnectAfterBrokerRestart(t *testing.T) {
	b := newRestartingBroker(t)
	b.start()
	in := connectTo(t, b, "10s", nil)
	cache, counter, lock := NewCache("re"), NewAtomic("re"), NewLocker("re")
	must(t, cache.Set("k", []byte("before"), 0))
	_, err := counter.Add(1)
	must(t, err)
	must(t, lock.Lock())
	must(t, lock.Unlock())
	if !in.stateOK {
		t.Fatal("the state socket is not used")
	}
	oldState, oldBus := in.state.current(), in.bus.current()

	b.kill()
	waitUntil(t, "the package sees both connections close", 10*time.Second, func() bool {
		return !oldState.Connected() && !oldBus.Connected()
	})
	b.start()

	// Not retry-safe calls too: the connection was known broken before they were sent.
	start := time.Now()
	must(t, returns(t, "Add after the restart", 20*time.Second, func() error {
		_, err := counter.Add(1)
		return err
	}))
	t.Logf("the first call after the restart, reconnecting the state socket, took %v", time.Since(start))
	must(t, returns(t, "Lock after the restart", 20*time.Second, lock.Lock))
	holders, _, err := lock.Queues()
	must(t, err)
	if len(holders) != 1 || !holders[0].Write {
		t.Fatalf("holders after Lock on the new broker: %+v", holders)
	}
	must(t, lock.Unlock())
	must(t, cache.Set("k", []byte("after"), 0))
	v, ok, err := cache.Get("k")
	must(t, err)
	if !ok || string(v) != "after" {
		t.Fatalf("Get after Set on the new broker = %q %v", v, ok)
	}
	if in.state.current() == oldState || in.bus.current() == oldBus {
		t.Fatal("the calls did not use new connections")
	}
}

// A call in flight when the broker dies: repeated on the new broker when it is
// retry-safe, else ErrDisconnected; never a hang.
func TestReconnectCallInFlight(t *testing.T) {
	b := newRestartingBroker(t)
	b.start()
	sent := make(chan string, 64)
	connectTo(t, b, "10s", sent)
	cache, counter := NewCache("flight"), NewAtomic("flight")
	must(t, cache.Set("warm", []byte("up"), 0))

	// inFlight sends call to a paused broker, kills it once the call is sent, starts
	// a new one and returns the call's result.
	inFlight := func(member string, call func() error) error {
		t.Helper()
		b.pause()
		type result struct {
			err error
			at  time.Time
		}
		done := make(chan result, 1)
		go func() {
			err := call()
			done <- result{err, time.Now()}
		}()
		waitSent(t, sent, member)
		killed := time.Now()
		b.kill()
		b.start()
		var r result
		_ = returns(t, member+" in flight", 20*time.Second, func() error { r = <-done; return nil })
		t.Logf("%s in flight returned %v after the kill (the new broker accepted connections after %v): %v",
			member, r.at.Sub(killed), b.started.Sub(killed), r.err)
		return r.err
	}

	// Set is repeated, on the new broker: the paused one never read it.
	must(t, inFlight("Set", func() error { return cache.Set("k", []byte("in flight"), 0) }))
	v, ok, err := cache.Get("k")
	must(t, err)
	if !ok || string(v) != "in flight" {
		t.Fatalf("after Set in flight, Get = %q %v: the Set was not repeated on the new broker", v, ok)
	}

	// Add may have counted: not repeated.
	err = inFlight("Add", func() error { _, err := counter.Add(1); return err })
	if !errors.Is(err, ErrDisconnected) {
		t.Fatalf("Add in flight = %v, want ErrDisconnected", err)
	}
	if !strings.Contains(err.Error(), "closed during Add") || !strings.Contains(err.Error(), "may have taken effect") {
		t.Fatalf("unclear message: %v", err)
	}
	// The next call is served by the new broker.
	_, err = counter.Load()
	must(t, err)
}

// A lock waiter does not survive the broker: its Lock fails with ErrDisconnected as
// soon as the connection closes, without waiting for a new broker.
func TestReconnectLockWaiter(t *testing.T) {
	b := newRestartingBroker(t)
	b.start()
	connectTo(t, b, "10s", nil)
	holder, err := dial(b.address("bus"), time.Second)
	must(t, err)
	defer holder.Close()
	obj := holder.Object("org.ally."+b.app, objectPath)
	var acquired bool
	must(t, obj.Call(lockerInterface+"Lock", 0, "waited", uint64(waitForever)).Store(&acquired))
	if !acquired {
		t.Fatal("the holder did not get the free lock")
	}
	lock := NewLocker("waited")
	waiting := make(chan error, 1)
	go func() { waiting <- lock.Lock() }()
	waitUntil(t, "the package's Lock waits", 10*time.Second, func() bool { return waiters(t, lock) == 1 })

	b.kill()
	err = returns(t, "Lock waiting as the broker died", 5*time.Second, func() error { return <-waiting })
	if !errors.Is(err, ErrDisconnected) || !strings.Contains(err.Error(), "during Lock") {
		t.Fatalf("the waiting Lock = %v, want ErrDisconnected", err)
	}
	b.start()
	ok, err := lock.TryLock()
	must(t, err)
	if !ok {
		t.Fatal("TryLock on the new broker failed")
	}
	must(t, lock.Unlock())
}

// With no broker coming back, a call fails with ErrDisconnected once
// ALLY_RECONNECT_TIMEOUT has passed; a broker coming back later serves the next.
func TestReconnectGivesUp(t *testing.T) {
	b := newRestartingBroker(t)
	b.start()
	in := connectTo(t, b, "300ms", nil)
	counter := NewAtomic("gives-up")
	_, err := counter.Load()
	must(t, err)
	old := in.state.current()
	b.kill()
	waitUntil(t, "the package sees the connection close", 10*time.Second, func() bool { return !old.Connected() })

	start := time.Now()
	err = returns(t, "Load without a broker", 10*time.Second, func() error { _, err := counter.Load(); return err })
	took := time.Since(start)
	if !errors.Is(err, ErrDisconnected) || !strings.Contains(err.Error(), "reconnecting failed") ||
		!strings.Contains(err.Error(), "within 300ms (ALLY_RECONNECT_TIMEOUT)") {
		t.Fatalf("Load without a broker = %v, want ErrDisconnected after 300ms of reconnecting", err)
	}
	if took < 300*time.Millisecond || took > 5*time.Second {
		t.Fatalf("Load without a broker gave up after %v; ALLY_RECONNECT_TIMEOUT is 300ms", took)
	}
	t.Logf("gave up after %v: %v", took, err)

	b.start()
	_, err = counter.Load()
	must(t, err)
}

// An instance across `ally reexec`: the broker's connections close, the instance's
// next calls reconnect, and what it had is still there. Skipped by a broker without
// `ally reexec`.
func TestReconnectAcrossReexec(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in a child")
	}
	if err := exec.Command(allyBin(t), "reexec", "--help").Run(); err != nil {
		t.Skipf("this broker has no `ally reexec` (%v)", err)
	}
	b := startBroker(t, "reexec", b0(t)...)
	b.waitFile("listening-1", 60*time.Second)
	if out, err := b.ctl(60*time.Second, []string{"reexec"}, "gotest"); err != nil {
		t.Fatalf("ally reexec: %v\n%s", err, out)
	}
	must(t, os.WriteFile(filepath.Join(b.dir, "reexeced"), []byte("go on\n"), 0o644))
	if got := b.waitFile("reexec-1", 60*time.Second); got != "PASS" {
		t.Fatalf("the instance across the re-exec: %s", got)
	}
}

func childReexec(t *testing.T) {
	in := self()
	ln, err := Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer ln.Close()
	must(t, Ready())
	must(t, Report(ReportValues{Version: "before"}))
	cache, counter, lock := NewCache("reexec"), NewAtomic("reexec"), NewLocker("reexec")
	must(t, cache.Set("k", []byte("kept"), 0))
	_, err = counter.Add(1)
	must(t, err)
	must(t, lock.Lock())
	bus, state := in.bus.current(), in.state.current()
	report(t, "listening-1", "%s", ln.Addr())

	path := filepath.Join(os.Getenv(dirEnv), "reexeced")
	waitUntil(t, "the test re-executes the broker", 60*time.Second, func() bool {
		_, err := os.Stat(path)
		return err == nil
	})
	waitUntil(t, "the broker's connections close", 30*time.Second, func() bool {
		return !bus.Connected() && !state.Connected()
	})
	// Whatever they do, calls made now go to the new image.
	again, err := Listen("tcp", ln.Addr().String())
	must(t, err)
	defer again.Close()
	if again.Addr().String() != ln.Addr().String() {
		t.Fatalf("Listen after the re-exec gave %v, before %v", again.Addr(), ln.Addr())
	}
	must(t, Ready())
	must(t, Report(ReportValues{Version: "after"}))
	v, ok, err := cache.Get("k")
	must(t, err)
	if !ok || string(v) != "kept" {
		t.Errorf("the cache after the re-exec: %q %v", v, ok)
	}
	n, err := counter.Add(1)
	must(t, err)
	if n != 2 {
		t.Errorf("the counter after the re-exec: %d, want 2", n)
	}
	holders, _, err := lock.Queues()
	must(t, err)
	if len(holders) != 1 || holders[0].Owner != ID() {
		t.Errorf("the lock's holders after the re-exec: %+v, want this instance", holders)
	}
	must(t, lock.Unlock())
	if in.bus.current() == bus || in.state.current() == state {
		t.Error("the calls did not use new connections")
	}
}

// Goroutines reading the cache and the locks without pause while the broker dies and
// comes back: not one call fails (every one is retry-safe, or sent after the
// connection was known closed) and they all go on with the new broker.
func TestReconnectConcurrentCalls(t *testing.T) {
	b := newRestartingBroker(t)
	b.start()
	connectTo(t, b, "10s", nil)
	cache, lock := NewCache("busy"), NewLocker("busy")
	const workers = 8
	var calls [workers]atomic.Int64
	var failure atomic.Value // the first failed call's error
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	t.Cleanup(halt)
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		go func(w int) {
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				var err error
				if w%2 == 0 {
					_, _, err = cache.Get("k")
				} else {
					_, _, err = lock.Queues()
				}
				if err != nil {
					failure.Store(err.Error())
					errs <- err
					return
				}
				calls[w].Add(1)
			}
		}(w)
	}
	// each waits until every goroutine made a call more than in counts.
	each := func(what string, counts []int64) {
		waitUntil(t, what, 20*time.Second, func() bool {
			if err := failure.Load(); err != nil {
				t.Fatalf("a call across the restart: %v", err)
			}
			for w := range calls {
				if calls[w].Load() <= counts[w] {
					return false
				}
			}
			return true
		})
	}
	warm := make([]int64, workers)
	for w := range warm {
		warm[w] = 20
	}
	each("every goroutine calls the broker 20 times", warm)
	b.kill()
	b.start()
	served := make([]int64, workers)
	for w := range calls {
		served[w] = calls[w].Load()
	}
	each("every goroutine calls the new broker", served)
	halt()
	for w := 0; w < workers; w++ {
		if err := <-errs; err != nil {
			t.Errorf("a call across the restart: %v", err)
		}
	}
	var total int64
	for w := range calls {
		total += calls[w].Load()
	}
	t.Logf("%d calls by %d goroutines, none failed", total, workers)
}
