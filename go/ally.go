package ally

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
)

// DefaultDrainIdle is how long an HTTP drain lets an idle keep-alive connection stay
// idle after the stop when ALLY_DRAIN_IDLE does not say (as the Rust client).
const DefaultDrainIdle = time.Second

const (
	objectPath      = dbus.ObjectPath("/org/ally")
	brokerInterface = "org.ally.Broker1"
)

// instance is this process's view of its broker, made once on first use.
type instance struct {
	app        string
	id         uint64
	generation uint64
	address    string // ALLY_ADDRESS; empty in simulate mode
	stateAddr  string // ALLY_STATE_ADDRESS
	dest       string // the broker's bus name, org.ally.$ALLY_APP; empty without ALLY_APP
	drainIdle  time.Duration
	stopSignal syscall.Signal
	envErr     error

	bus       *link // the private socket, ALLY_ADDRESS
	state     *link // the state socket, ALLY_STATE_ADDRESS
	stateOnce sync.Once
	stateOK   bool // the state socket could be reached: Cache and Atomic use it

	stopOnce   sync.Once
	stopping   chan struct{}
	stopCtx    context.Context
	stopCancel context.CancelFunc
	hooksMu    sync.Mutex
	hooks      []func()
	hooksRan   bool
}

var (
	selfOnce sync.Once
	selfInst *instance
)

func self() *instance {
	selfOnce.Do(func() { selfInst = fromEnv() })
	return selfInst
}

func fromEnv() *instance {
	in := &instance{
		address:   os.Getenv("ALLY_ADDRESS"),
		stateAddr: os.Getenv("ALLY_STATE_ADDRESS"),
		app:       os.Getenv("ALLY_APP"),
		drainIdle: DefaultDrainIdle,
		stopping:  make(chan struct{}),
	}
	in.stopCtx, in.stopCancel = context.WithCancel(context.Background())
	timeout, timeoutErr := parseReconnectTimeout(os.Getenv("ALLY_RECONNECT_TIMEOUT"))
	in.bus = newLink(in.address, timeout, timeoutErr)
	in.state = newLink(in.stateAddr, timeout, timeoutErr)
	if in.app == "" {
		in.app = filepath.Base(os.Args[0])
	} else {
		in.dest = "org.ally." + in.app
	}
	var err error
	if in.id, err = envNumber("ALLY_INSTANCE"); err != nil {
		in.envErr = err
	}
	if in.generation, err = envNumber("ALLY_GENERATION"); err != nil {
		in.envErr = err
	}
	if v := strings.TrimSpace(os.Getenv("ALLY_DRAIN_IDLE")); v != "" {
		if ms, err := strconv.ParseUint(v, 10, 63); err == nil && ms > 0 {
			in.drainIdle = time.Duration(ms) * time.Millisecond
		}
	}
	in.stopSignal = syscall.SIGTERM
	if v := os.Getenv("ALLY_STOP_SIGNAL"); v != "" {
		sig, err := parseSignal(v)
		if err != nil {
			in.envErr = err
		} else {
			in.stopSignal = sig
		}
	}
	return in
}

func envNumber(name string) (uint64, error) {
	v := os.Getenv(name)
	if v == "" {
		return 1, nil
	}
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
	if err != nil {
		return 1, &Error{Name: errInvalidArgument, Message: fmt.Sprintf("%s: %q is not a number", name, v)}
	}
	return n, nil
}

// ID is this instance's id, unique for the broker's life (ALLY_INSTANCE; 1 in simulate mode).
func ID() uint64 { return self().id }

// App is the application's name (ALLY_APP; in simulate mode the program's name when unset).
func App() string { return self().app }

// Generation is this instance's generation (ALLY_GENERATION; 1 in simulate mode).
func Generation() uint64 { return self().generation }

// Managed tells whether a broker manages this process: false in simulate mode
// (ALLY_ADDRESS unset).
func Managed() bool { return self().address != "" }

// DrainIdle is how long a draining HTTP server lets an idle keep-alive connection stay
// idle after the stop before closing it: the config's drain_idle (ALLY_DRAIN_IDLE,
// milliseconds), else DefaultDrainIdle.
func DrainIdle() time.Duration { return self().drainIdle }

// dial opens a peer-to-peer connection: EXTERNAL authentication (fd passing negotiated
// when the transport has it), no Hello, since there is no bus daemon. The handshake
// gives up after limit: a broker that accepts and never answers does not hang a call.
func dial(address string, limit time.Duration, options ...dbus.ConnOption) (*dbus.Conn, error) {
	ctx, cancel := context.WithCancel(context.Background())
	conn, err := dbus.Dial(address, append([]dbus.ConnOption{dbus.WithContext(ctx)}, options...)...)
	if err != nil {
		cancel()
		return nil, &Error{Name: errFailed, Message: fmt.Sprintf("cannot connect to the broker at %s: %v", address, err)}
	}
	timer := time.AfterFunc(limit, cancel)
	err = conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))})
	if !timer.Stop() {
		// The limit passed: the connection is closed, whatever Auth returned.
		err = fmt.Errorf("no answer within %v", limit)
	}
	if err != nil {
		cancel()
		conn.Close()
		return nil, &Error{Name: errFailed, Message: fmt.Sprintf("cannot authenticate to the broker at %s: %v", address, err)}
	}
	return conn, nil
}

// object is /org/ally on conn. The destination is the broker's bus name
// (org.ally.$ALLY_APP), which a peer-to-peer connection ignores and every broker
// accepts; without ALLY_APP there is none, which newer brokers accept.
func (in *instance) object(conn *dbus.Conn) dbus.BusObject {
	return conn.Object(in.dest, objectPath)
}

// call makes a Broker1 call on the private connection (see invoke).
func (in *instance) call(ctx context.Context, method string, args ...interface{}) (*dbus.Call, error) {
	return in.invoke(ctx, in.bus, brokerInterface+"."+method, args...)
}

// Ready tells the broker this instance serves; during a reload that is what lets the
// older generation be stopped. Calling it again is harmless. In simulate mode it does
// nothing.
//
// Watch the stop (Stopping, Context, OnStop, or Serve which does) before calling
// Ready: until something watches it, the stop signal ends the process as it would
// without this package.
func Ready() error {
	in := self()
	if ExitHook != nil {
		in.installStop()
	}
	if !Managed() {
		return nil
	}
	_, err := in.call(context.Background(), "Ready")
	return err
}

// ExitHook, when set before Ready, runs when the stop comes, as the original Ally's
// did. Prefer Stopping, Context or OnStop, which need not be set before Ready.
var ExitHook func()

// Reload asks the broker for a reload (as `ally reload` does) and returns the new
// generation once it is ready. This instance is then asked to stop like every older
// one. ErrReloadFailed when the new generation does not come up (this one keeps
// serving); ErrNotManaged in simulate mode.
func Reload() (uint64, error) {
	if !Managed() {
		return 0, &Error{Method: "Reload", Name: errNotManaged, Message: "no broker (simulate mode; ALLY_ADDRESS is not set)"}
	}
	c, err := self().call(context.Background(), "Reload")
	if err != nil {
		return 0, err
	}
	var generation uint64
	if err := c.Store(&generation); err != nil {
		return 0, &Error{Method: "Reload", Name: errFailed, Message: "unexpected reply: " + err.Error(), Err: err}
	}
	return generation, nil
}

// Stopping returns a channel closed when the broker asks this instance to stop (its
// stop signal, ALLY_STOP_SIGNAL, e.g. SIGTERM, arrives; in simulate mode also SIGINT).
// From the first call on, the signal no longer ends the process: stop serving, drain,
// and return from main. Further stop signals are ignored.
func Stopping() <-chan struct{} {
	in := self()
	in.installStop()
	return in.stopping
}

// Context returns a context cancelled when the stop comes (see Stopping).
func Context() context.Context {
	in := self()
	in.installStop()
	return in.stopCtx
}

// OnStop registers f to run, in its own goroutine, when the stop comes (at once if it
// already came). It is the original Ally's exit hook.
func OnStop(f func()) {
	in := self()
	in.installStop()
	in.hooksMu.Lock()
	defer in.hooksMu.Unlock()
	if in.hooksRan {
		go f()
		return
	}
	in.hooks = append(in.hooks, f)
}

// IsStopping tells whether the stop came.
func IsStopping() bool {
	select {
	case <-self().stopping:
		return true
	default:
		return false
	}
}

func (in *instance) installStop() {
	in.stopOnce.Do(func() {
		sigs := []os.Signal{in.stopSignal}
		if !Managed() && in.stopSignal != syscall.SIGINT {
			sigs = append(sigs, syscall.SIGINT)
		}
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, sigs...)
		hook := ExitHook
		go func() {
			<-ch
			if hook != nil {
				go hook()
			}
			in.stop()
		}()
	})
}

func (in *instance) stop() {
	in.hooksMu.Lock()
	select {
	case <-in.stopping:
	default:
		close(in.stopping)
	}
	in.stopCancel()
	hooks := in.hooks
	in.hooks = nil
	in.hooksRan = true
	in.hooksMu.Unlock()
	for _, f := range hooks {
		go f()
	}
}

func parseSignal(name string) (syscall.Signal, error) {
	name = strings.TrimSpace(name)
	if n, err := strconv.Atoi(name); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	upper := strings.ToUpper(name)
	if !strings.HasPrefix(upper, "SIG") {
		upper = "SIG" + upper
	}
	if sig, ok := signalNames[upper]; ok {
		return sig, nil
	}
	return 0, &Error{Name: errInvalidArgument, Message: fmt.Sprintf("ALLY_STOP_SIGNAL: %q is not a signal name (expected e.g. SIGTERM)", name)}
}

var signalNames = map[string]syscall.Signal{
	"SIGHUP": syscall.SIGHUP, "SIGINT": syscall.SIGINT, "SIGQUIT": syscall.SIGQUIT,
	"SIGUSR1": syscall.SIGUSR1, "SIGUSR2": syscall.SIGUSR2, "SIGTERM": syscall.SIGTERM,
	"SIGWINCH": syscall.SIGWINCH, "SIGPWR": syscall.SIGPWR, "SIGALRM": syscall.SIGALRM,
	"SIGCONT": syscall.SIGCONT, "SIGTSTP": syscall.SIGTSTP, "SIGURG": syscall.SIGURG,
	"SIGXCPU": syscall.SIGXCPU, "SIGVTALRM": syscall.SIGVTALRM, "SIGPROF": syscall.SIGPROF,
	"SIGIO": syscall.SIGIO, "SIGSYS": syscall.SIGSYS, "SIGPIPE": syscall.SIGPIPE,
}
