package ally

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// endpoint is a normalised (network, address) pair, read the way the broker reads it
// (ally_core::net::ListenAddr): equal endpoints name the same socket.
type endpoint struct {
	network string
	ip      net.IP // inet networks
	port    int
	path    string // unix networks: an absolute path, or "@name"
}

func (e endpoint) isUnix() bool { return strings.HasPrefix(e.network, "unix") }

// key is the endpoint as one string, e.g. "tcp [::]:80", "unix /run/x.sock".
func (e endpoint) String() string {
	if e.isUnix() {
		return e.network + " " + e.path
	}
	return e.network + " " + e.address()
}

// address is what net.Listen takes for the endpoint.
func (e endpoint) address() string {
	if e.isUnix() {
		return e.path
	}
	return net.JoinHostPort(e.ip.String(), strconv.Itoa(e.port))
}

func parseEndpoint(network, address string) (endpoint, error) {
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
		return parseInet(network, address)
	case "unix", "unixgram", "unixpacket":
		return parseUnix(network, address)
	}
	return endpoint{}, newError(errInvalidArgument, "unknown network %q: expected one of tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket", network)
}

func parseInet(network, address string) (endpoint, error) {
	invalid := func(why string) error {
		return newError(errInvalidArgument, "invalid %s address %q: %s (expected host:port, [ipv6]:port or :port)", network, address, why)
	}
	i := strings.LastIndexByte(address, ':')
	if i < 0 {
		return endpoint{}, invalid("missing port")
	}
	host, portText := address[:i], address[i+1:]
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil {
		return endpoint{}, invalid("port must be a number from 0 to 65535")
	}
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	} else if strings.Contains(host, ":") {
		return endpoint{}, invalid("an IPv6 host must be in brackets")
	}
	family := network[len(network)-1]
	var ip net.IP
	switch {
	case host == "":
		if family == '4' {
			ip = net.IPv4zero.To4()
		} else {
			ip = net.IPv6unspecified
		}
	case net.ParseIP(host) != nil:
		ip = net.ParseIP(host)
	default:
		ips, err := net.DefaultResolver.LookupIPAddr(context.Background(), host)
		if err != nil {
			return endpoint{}, invalid(fmt.Sprintf("cannot resolve host %q: %v", host, err))
		}
		for _, a := range ips {
			if familyAccepts(family, a.IP) {
				ip = a.IP
				break
			}
		}
		if ip == nil {
			return endpoint{}, invalid(fmt.Sprintf("host %q has no address for %s", host, network))
		}
	}
	if !familyAccepts(family, ip) {
		return endpoint{}, invalid(fmt.Sprintf("%s is not an address of %s", ip, network))
	}
	if v4 := ip.To4(); v4 != nil && family != '6' {
		ip = v4
	}
	return endpoint{network: network, ip: ip, port: int(port)}, nil
}

// familyAccepts: '4' takes IPv4 (and v4-mapped), '6' takes IPv6 but not v4-mapped.
func familyAccepts(family byte, ip net.IP) bool {
	isV4 := ip.To4() != nil
	switch family {
	case '4':
		return isV4
	case '6':
		return !isV4
	}
	return true
}

func parseUnix(network, address string) (endpoint, error) {
	invalid := func(why string) error {
		return newError(errInvalidArgument, "invalid %s address %q: %s", network, address, why)
	}
	switch {
	case address == "":
		return endpoint{}, invalid("empty path")
	case strings.ContainsRune(address, 0):
		return endpoint{}, invalid("contains a NUL byte")
	case len(address) > 107:
		return endpoint{}, invalid("longer than 107 bytes, the limit of a unix socket address")
	case strings.HasPrefix(address, "@"):
		if len(address) == 1 {
			return endpoint{}, invalid("abstract name after '@' is empty")
		}
		return endpoint{network: network, path: address}, nil
	case !strings.HasPrefix(address, "/"):
		return endpoint{}, invalid("the path must be absolute")
	case strings.HasSuffix(address, "/") || strings.HasSuffix(address, "/.") || strings.HasSuffix(address, "/.."):
		return endpoint{}, invalid("the path names a directory")
	}
	return endpoint{network: network, path: normalisePath(address)}, nil
}

// normalisePath drops "." components and repeated slashes; ".." is kept (it may cross
// a symlink), unlike path.Clean.
func normalisePath(p string) string {
	parts := strings.Split(p, "/")
	out := make([]string, 0, len(parts))
	for _, part := range parts {
		if part == "" || part == "." {
			continue
		}
		out = append(out, part)
	}
	return "/" + strings.Join(out, "/")
}
