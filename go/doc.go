// Package ally lets a Go service be reloaded by the Ally broker without dropping a
// connection: the broker holds the listening sockets, so a new generation of the
// program takes over the very same kernel sockets while the old one drains.
//
// An instance's life:
//
//  1. Listen (or ListenTCP, ListenPacket, ...) asks the broker for a socket. The first
//     request binds it; every later one, by this generation or the next, gets a
//     duplicate of the same socket, so its accept queue survives reloads.
//
//  2. Ready tells the broker the instance serves. During `ally reload` this is what
//     lets the broker ask the older generation to stop; a new generation that exits or
//     never calls Ready fails the reload and the old one keeps serving.
//
//  3. Stopping (a channel), Context (a context) or OnStop (a callback) tells the
//     instance the broker asked it to stop (its stop signal, ALLY_STOP_SIGNAL, usually
//     SIGTERM, arrived). Once one of them has been called the signal no longer ends
//     the process by itself, so call one before Ready (Serve calls Stopping).
//
//  4. Drain: stop accepting, finish what is in flight. For net/http, Serve(srv, ln)
//     does it without losing a keep-alive request; for gRPC, allygrpc.Serve.
//
//  5. Exit (return from main). The broker kills an instance still running after its
//     stop_timeout.
//
//     ln, err := ally.Listen("tcp", ":8080")
//     if err != nil {
//     log.Fatal(err)
//     }
//     srv := &http.Server{Handler: handler}
//     if err := ally.Ready(); err != nil {
//     log.Fatal(err)
//     }
//     if err := ally.Serve(srv, ln); err != nil {
//     log.Fatal(err)
//     }
//
// Without a broker (ALLY_ADDRESS unset) the package runs in simulate mode: Listen
// binds in the process, Ready does nothing, SIGINT stops as well as SIGTERM, and the
// shared state lives in the process with the broker's semantics, so the program and
// its tests run alone.
//
// Shared state that survives reloads and crashes lives in the broker: Cache (values
// with TTLs), Atomic (64-bit counters) and Locker (FIFO read/write locks released when
// their instance dies). See NewCache, NewAtomic and NewLocker.
//
// A socket received from the broker is duplicated into the returned listener and the
// received descriptor closed: the listener is the caller's to close, and closing it
// leaves the broker's socket to the next generation (Close drops this instance's
// reference). With sockets = "listen-fds", Listen takes the inherited sockets of
// declared addresses and unsets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.
//
// When the broker re-executes itself or restarts, its connections close: the next
// call reconnects (with back-off, for up to ALLY_RECONNECT_TIMEOUT, 10 s by default),
// a call in flight is repeated once when that is harmless (Listen, Ready, Report,
// Cache Get/Set/..., Atomic Load/Store), and any other fails with ErrDisconnected.
//
// Everything is safe for concurrent use; the connection to the broker is made on
// first use. docs/go.md in the repository has the details and a migration table
// from github.com/cjey/ally. Errors a caller may want to tell apart match the sentinels ErrAccessDenied,
// ErrAddressInUse, ... with errors.Is, and keep the broker's message.
package ally
