package ally

import (
	"errors"
	"os"
	"sync"
	"syscall"
)

// Simulate mode's sockets, one per normalised endpoint, shared by every Listen of the
// process as the broker shares its sockets between instances.
var simSockets = struct {
	sync.Mutex
	files map[string]*os.File
}{files: map[string]*os.File{}}

func simulateListen(network, address string, options ListenOptions) (*os.File, error) {
	ep, err := parseEndpoint(network, address)
	if err != nil {
		return nil, err
	}
	simSockets.Lock()
	defer simSockets.Unlock()
	f, ok := simSockets.files[ep.String()]
	if !ok {
		if f, err = bindEndpoint(ep, options); err != nil {
			return nil, err
		}
		simSockets.files[ep.String()] = f
		if !ep.isUnix() && ep.port == 0 {
			// Later requests may name the port it got.
			if sa, err := sockname(f); err == nil {
				bound := ep
				bound.port = sa
				simSockets.files[bound.String()] = f
			}
		}
	}
	return dupFile(f, ep.String())
}

func simulateClose(network, address string) error {
	ep, err := parseEndpoint(network, address)
	if err != nil {
		return err
	}
	simSockets.Lock()
	defer simSockets.Unlock()
	if f, ok := simSockets.files[ep.String()]; ok {
		for k, g := range simSockets.files {
			if g == f {
				delete(simSockets.files, k)
			}
		}
		if ep.isUnix() && ep.path[0] == '/' {
			_ = os.Remove(ep.path)
		}
		return f.Close()
	}
	return nil
}

// dupFile returns a close-on-exec duplicate of f's descriptor as a new file, without
// f.Fd() (which would switch the shared file description to blocking mode).
func dupFile(f *os.File, name string) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, newError(errFailed, "%s: %v", name, err)
	}
	var dup int
	var dupErr error
	if err := rc.Control(func(fd uintptr) {
		dup, dupErr = fcntlDupCloexec(int(fd))
	}); err != nil {
		return nil, newError(errFailed, "%s: %v", name, err)
	}
	if dupErr != nil {
		return nil, newError(errFailed, "%s: dup: %v", name, dupErr)
	}
	return os.NewFile(uintptr(dup), name), nil
}

func fcntlDupCloexec(fd int) (int, error) {
	r, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_DUPFD_CLOEXEC, 0)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// bindEndpoint creates, binds and (for connection-oriented networks) listens on a
// socket as the broker does: close-on-exec, SO_REUSEADDR on stream sockets only,
// dual-stack for "tcp"/"udp" on [::], a stale unix socket file replaced.
func bindEndpoint(ep endpoint, o ListenOptions) (*os.File, error) {
	if o.Mode != 0 && (o.Mode > 0o777 || !ep.isUnix() || ep.path[0] != '/') {
		if o.Mode > 0o777 {
			return nil, newError(errInvalidArgument, "option mode: %#o is not a permission mode (at most 0o777; no set-id or sticky bits)", uint32(o.Mode))
		}
		return nil, newError(errInvalidArgument, "option mode: %s is not a filesystem unix socket", ep)
	}
	domain, typ, sa := syscall.AF_UNIX, syscall.SOCK_STREAM, syscall.Sockaddr(nil)
	switch ep.network {
	case "udp", "udp4", "udp6", "unixgram":
		typ = syscall.SOCK_DGRAM
	case "unixpacket":
		typ = syscall.SOCK_SEQPACKET
	}
	if ep.isUnix() {
		sa = &syscall.SockaddrUnix{Name: ep.path}
	} else if v4 := ep.ip.To4(); v4 != nil && ep.network[len(ep.network)-1] != '6' {
		domain = syscall.AF_INET
		s := &syscall.SockaddrInet4{Port: ep.port}
		copy(s.Addr[:], v4)
		sa = s
	} else {
		domain = syscall.AF_INET6
		s := &syscall.SockaddrInet6{Port: ep.port}
		copy(s.Addr[:], ep.ip.To16())
		sa = s
	}
	fd, err := syscall.Socket(domain, typ|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, newError(errFailed, "%s: socket: %v", ep, err)
	}
	fail := func(what string, err error) (*os.File, error) {
		syscall.Close(fd)
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, newError(errAddressInUse, "%s is already in use", ep)
		}
		if errors.Is(err, syscall.EADDRNOTAVAIL) {
			return nil, newError(errInvalidArgument, "%s: the address is not on this machine", ep)
		}
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
			return nil, newError(errAccessDenied, "%s: %s: %v", ep, what, err)
		}
		return nil, newError(errFailed, "%s: %s: %v", ep, what, err)
	}
	if typ != syscall.SOCK_DGRAM {
		if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
			return fail("SO_REUSEADDR", err)
		}
	}
	if o.ReusePort {
		if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1); err != nil {
			return fail("SO_REUSEPORT", err)
		}
	}
	if domain == syscall.AF_INET6 {
		v6only := 1
		if (ep.network == "tcp" || ep.network == "udp") && ep.ip.IsUnspecified() {
			v6only = 0
		}
		if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY, v6only); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
	}
	err = syscall.Bind(fd, sa)
	if errors.Is(err, syscall.EADDRINUSE) && ep.isUnix() && ep.path[0] == '/' && staleUnixSocket(ep.path) {
		_ = os.Remove(ep.path)
		err = syscall.Bind(fd, sa)
	}
	if err != nil {
		return fail("bind", err)
	}
	if o.Mode != 0 {
		if err := os.Chmod(ep.path, o.Mode&0o777); err != nil {
			return fail("chmod", err)
		}
	}
	if typ != syscall.SOCK_DGRAM {
		backlog := 4096
		if o.Backlog != 0 {
			backlog = int(o.Backlog)
		}
		if err := syscall.Listen(fd, backlog); err != nil {
			return fail("listen", err)
		}
	}
	return os.NewFile(uintptr(fd), ep.String()), nil
}

// staleUnixSocket: a socket file at path that nobody accepts on.
func staleUnixSocket(path string) bool {
	st, err := os.Lstat(path)
	if err != nil || st.Mode()&os.ModeSocket == 0 {
		return false
	}
	for _, typ := range []int{syscall.SOCK_STREAM, syscall.SOCK_DGRAM, syscall.SOCK_SEQPACKET} {
		fd, err := syscall.Socket(syscall.AF_UNIX, typ|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			return false
		}
		err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: path})
		syscall.Close(fd)
		if err == nil {
			return false
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.EPROTOTYPE) {
			return false
		}
	}
	return true
}

// sockname is the port an inet socket is bound to.
func sockname(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	port := 0
	var serr error
	err = rc.Control(func(fd uintptr) {
		var sa syscall.Sockaddr
		sa, serr = syscall.Getsockname(int(fd))
		switch sa := sa.(type) {
		case *syscall.SockaddrInet4:
			port = sa.Port
		case *syscall.SockaddrInet6:
			port = sa.Port
		}
	})
	if err == nil {
		err = serr
	}
	return port, err
}
