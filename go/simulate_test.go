package ally

import (
	"errors"
	"strings"
	"syscall"
	"testing"
)

func TestSimulate(t *testing.T) {
	if Managed() {
		t.Skip("runs without a broker (ALLY_ADDRESS is set)")
	}
	runSuite(t)
}

func TestSimulateReloadNeedsABroker(t *testing.T) {
	if Managed() {
		t.Skip("runs without a broker")
	}
	if _, err := Reload(); !errors.Is(err, ErrNotManaged) {
		t.Fatalf("Reload in simulate mode = %v, want ErrNotManaged", err)
	}
}

func TestSimulateIdentity(t *testing.T) {
	if Managed() {
		t.Skip("runs without a broker")
	}
	if ID() != 1 || Generation() != 1 || App() == "" || DrainIdle() <= 0 {
		t.Fatalf("simulate mode's identity: id %d, generation %d, app %q, drain idle %v", ID(), Generation(), App(), DrainIdle())
	}
}

func TestParseSignal(t *testing.T) {
	for name, want := range map[string]syscall.Signal{"SIGTERM": syscall.SIGTERM, "term": syscall.SIGTERM, " SIGINT ": syscall.SIGINT, "10": syscall.SIGUSR1} {
		if got, err := parseSignal(name); err != nil || got != want {
			t.Errorf("parseSignal(%q) = %v, %v; want %v", name, got, err, want)
		}
	}
	if _, err := parseSignal("SIGNOPE"); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("parseSignal(SIGNOPE) = %v, want ErrInvalidArgument", err)
	}
}

func TestEndpointNormalisation(t *testing.T) {
	same := [][2]string{
		{"tcp 127.0.0.1:80", "tcp localhost:80"},
		{"tcp [::]:80", "tcp :80"},
		{"tcp4 0.0.0.0:80", "tcp4 :80"},
		{"tcp 127.0.0.1:80", "tcp [::ffff:127.0.0.1]:80"},
		{"unix /run/x.sock", "unix //run/./x.sock"},
	}
	for _, pair := range same {
		a, b := splitKey(t, pair[0]), splitKey(t, pair[1])
		if a.String() != b.String() {
			t.Errorf("%q is %s but %q is %s", pair[0], a, pair[1], b)
		}
	}
	if a, b := splitKey(t, "unix /run/a/../x.sock"), splitKey(t, "unix /run/x.sock"); a.String() == b.String() {
		t.Errorf("'..' was resolved textually: %s", a)
	}
	for _, bad := range [][2]string{{"tcp4", "[::1]:80"}, {"tcp6", "127.0.0.1:80"}, {"unix", "/run/"}, {"unix", "@"}, {"tcp", "1.2.3.4:99999"}} {
		if _, err := parseEndpoint(bad[0], bad[1]); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s %s: %v, want ErrInvalidArgument", bad[0], bad[1], err)
		}
	}
}

func splitKey(t *testing.T, key string) endpoint {
	t.Helper()
	i := strings.IndexByte(key, ' ')
	ep, err := parseEndpoint(key[:i], key[i+1:])
	if err != nil {
		t.Fatal(err)
	}
	return ep
}
