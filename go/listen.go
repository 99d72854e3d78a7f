package ally

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/godbus/dbus/v5"
)

// ListenOptions apply when the socket is created; a later request for the same
// address shares the existing socket whatever its options. Zero values mean the
// broker's defaults.
type ListenOptions struct {
	// Backlog of a listening socket (0: 4096, capped by net.core.somaxconn).
	Backlog uint32
	// ReusePort sets SO_REUSEPORT.
	ReusePort bool
	// Mode is the permission bits of a filesystem unix socket, at most 0o777 (0: the
	// binding thread's umask decides).
	Mode os.FileMode
}

func (o ListenOptions) isZero() bool { return o == ListenOptions{} }

// Listen returns a listening socket for a stream network ("tcp", "tcp4", "tcp6",
// "unix", "unixpacket") and address, as net.Listen does; the broker binds it once and
// every later request, by this instance or a later generation, gets the same kernel
// socket, so its accept queue survives reloads.
//
// Addresses are "host:port", "[ipv6]:port" or ":port" (every address, dual-stack for
// "tcp"), an absolute path for unix networks, or "@name" for an abstract socket.
// With sockets = "listen-fds", a declared address comes from the inherited fds. In
// simulate mode the process binds it itself (SO_REUSEADDR), once per address.
//
// The returned listener is the caller's to close; closing it does not drop the
// broker's reference (see Close).
func Listen(network, address string) (net.Listener, error) {
	return ListenWith(network, address, ListenOptions{})
}

// ListenWith is Listen with options used if the socket has to be created.
func ListenWith(network, address string, options ListenOptions) (net.Listener, error) {
	if !isStreamNetwork(network) {
		return nil, newError(errInvalidArgument, "Listen: network %q is not a stream network (tcp, tcp4, tcp6, unix, unixpacket); use ListenPacket", network)
	}
	f, err := listenFile(network, address, options)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, newError(errFailed, "%s %s: the socket is not a listener: %v", network, address, err)
	}
	return ln, nil
}

// ListenPacket returns a datagram socket for "udp", "udp4", "udp6" or "unixgram", as
// net.ListenPacket does, shared through the broker as Listen's sockets are.
func ListenPacket(network, address string) (net.PacketConn, error) {
	return ListenPacketWith(network, address, ListenOptions{})
}

// ListenPacketWith is ListenPacket with options used if the socket has to be created.
func ListenPacketWith(network, address string, options ListenOptions) (net.PacketConn, error) {
	if !isPacketNetwork(network) {
		return nil, newError(errInvalidArgument, "ListenPacket: network %q is not a datagram network (udp, udp4, udp6, unixgram); use Listen", network)
	}
	f, err := listenFile(network, address, options)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pc, err := net.FilePacketConn(f)
	if err != nil {
		return nil, newError(errFailed, "%s %s: the socket is not a datagram socket: %v", network, address, err)
	}
	return pc, nil
}

// ListenTCP is net.ListenTCP through the broker. A nil laddr is ":0".
func ListenTCP(network string, laddr *net.TCPAddr) (*net.TCPListener, error) {
	if !isTCP(network) {
		return nil, newError(errInvalidArgument, "ListenTCP: network %q is not tcp, tcp4 or tcp6", network)
	}
	address := ":0"
	if laddr != nil {
		address = laddr.String()
	}
	ln, err := Listen(network, address)
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// ListenUnix is net.ListenUnix through the broker ("unix" or "unixpacket").
func ListenUnix(network string, laddr *net.UnixAddr) (*net.UnixListener, error) {
	if network != "unix" && network != "unixpacket" {
		return nil, newError(errInvalidArgument, "ListenUnix: network %q is not unix or unixpacket", network)
	}
	if laddr == nil {
		return nil, newError(errInvalidArgument, "ListenUnix: no address")
	}
	ln, err := Listen(network, laddr.Name)
	if err != nil {
		return nil, err
	}
	return ln.(*net.UnixListener), nil
}

// ListenUDP is net.ListenUDP through the broker. A nil laddr is ":0".
func ListenUDP(network string, laddr *net.UDPAddr) (*net.UDPConn, error) {
	if network != "udp" && network != "udp4" && network != "udp6" {
		return nil, newError(errInvalidArgument, "ListenUDP: network %q is not udp, udp4 or udp6", network)
	}
	address := ":0"
	if laddr != nil {
		address = laddr.String()
	}
	pc, err := ListenPacket(network, address)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// ListenUnixgram is net.ListenUnixgram through the broker.
func ListenUnixgram(network string, laddr *net.UnixAddr) (*net.UnixConn, error) {
	if network != "unixgram" {
		return nil, newError(errInvalidArgument, "ListenUnixgram: network %q is not unixgram", network)
	}
	if laddr == nil {
		return nil, newError(errInvalidArgument, "ListenUnixgram: no address")
	}
	pc, err := ListenPacket(network, laddr.Name)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UnixConn), nil
}

// Close drops this instance's reference to the broker's socket for network and
// address (listeners already handed out stay open until closed). A socket no instance
// references is closed by the broker after its linger period; sockets the config
// declares never are. In simulate mode the next Listen binds anew.
func Close(network, address string) error {
	in := self()
	if inheritedFor(network, address) != nil {
		return nil
	}
	if !Managed() {
		return simulateClose(network, address)
	}
	_, err := in.call(context.Background(), "Close", network, address)
	return err
}

// listenFile returns a new *os.File for the socket, which the caller closes once it
// has made its own net type from it (net.FileListener duplicates it).
func listenFile(network, address string, options ListenOptions) (*os.File, error) {
	if f := inheritedFor(network, address); f != nil {
		return f, nil
	}
	in := self()
	if !Managed() {
		return simulateListen(network, address, options)
	}
	var c *dbus.Call
	var err error
	if options.isZero() {
		c, err = in.call(context.Background(), "Listen", network, address)
	} else {
		c, err = in.call(context.Background(), "ListenWith", network, address, options.dict())
	}
	if err != nil {
		return nil, err
	}
	var fd dbus.UnixFD
	if err := c.Store(&fd); err != nil {
		return nil, newError(errFailed, "Listen %s %s: unexpected reply: %v", network, address, err)
	}
	return os.NewFile(uintptr(fd), fmt.Sprintf("%s %s", network, address)), nil
}

func (o ListenOptions) dict() map[string]dbus.Variant {
	d := map[string]dbus.Variant{}
	if o.Backlog != 0 {
		d["backlog"] = dbus.MakeVariant(o.Backlog)
	}
	if o.ReusePort {
		d["reuse_port"] = dbus.MakeVariant(true)
	}
	if o.Mode != 0 {
		d["mode"] = dbus.MakeVariant(uint32(o.Mode))
	}
	return d
}

func isTCP(network string) bool {
	return network == "tcp" || network == "tcp4" || network == "tcp6"
}

func isStreamNetwork(network string) bool {
	return isTCP(network) || network == "unix" || network == "unixpacket"
}

func isPacketNetwork(network string) bool {
	switch network {
	case "udp", "udp4", "udp6", "unixgram":
		return true
	}
	return false
}
