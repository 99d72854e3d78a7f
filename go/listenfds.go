package ally

import (
	"os"
	"strconv"
	"strings"
	"syscall"
)

// A socket inherited with sockets = "listen-fds" (LISTEN_FDS, LISTEN_PID,
// LISTEN_FDNAMES; docs/unmodified-apps.md).
type inheritedSocket struct {
	file *os.File
	name string
}

var inherited []inheritedSocket

func init() { inherited = takeListenFDs() }

// takeListenFDs takes the sockets passed as fds 3, 4, … when LISTEN_PID is this
// process, marks them close-on-exec and unsets the variables, as sd_listen_fds does,
// so a child does not misread them.
func takeListenFDs() []inheritedSocket {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	if err != nil || n <= 0 {
		return nil
	}
	var out []inheritedSocket
	for i := 0; i < n; i++ {
		fd := 3 + i
		syscall.CloseOnExec(fd)
		name := ""
		if i < len(names) {
			name = names[i]
		}
		out = append(out, inheritedSocket{file: os.NewFile(uintptr(fd), "listen-fd "+name), name: name})
	}
	return out
}

// inheritedFor returns a duplicate of the inherited socket for network and address,
// or nil: one named "<network> <address>" (":" written "_") in LISTEN_FDNAMES, or one
// whose type and actual local address are the normalised address's.
func inheritedFor(network, address string) *os.File {
	if len(inherited) == 0 {
		return nil
	}
	ep, err := parseEndpoint(network, address)
	if err != nil {
		return nil
	}
	unnamed := network + " " + strings.ReplaceAll(address, ":", "_")
	for _, s := range inherited {
		if s.name == unnamed || socketIs(s.file, ep) {
			if f, err := dupFile(s.file, ep.String()); err == nil {
				return f
			}
		}
	}
	return nil
}

func socketIs(f *os.File, ep endpoint) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	match := false
	_ = rc.Control(func(fd uintptr) {
		typ, err := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TYPE)
		if err != nil || typ != socketType(ep.network) {
			return
		}
		sa, err := syscall.Getsockname(int(fd))
		if err != nil {
			return
		}
		switch sa := sa.(type) {
		case *syscall.SockaddrUnix:
			match = ep.isUnix() && sa.Name == ep.path
		case *syscall.SockaddrInet4:
			match = !ep.isUnix() && ep.port != 0 && sa.Port == ep.port && ep.ip.Equal(sa.Addr[:]) && ep.network[len(ep.network)-1] != '6'
		case *syscall.SockaddrInet6:
			match = !ep.isUnix() && ep.port != 0 && sa.Port == ep.port && ep.ip.Equal(sa.Addr[:]) && ep.network[len(ep.network)-1] != '4'
		}
	})
	return match
}

func socketType(network string) int {
	switch network {
	case "udp", "udp4", "udp6", "unixgram":
		return syscall.SOCK_DGRAM
	case "unixpacket":
		return syscall.SOCK_SEQPACKET
	}
	return syscall.SOCK_STREAM
}
