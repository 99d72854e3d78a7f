#!/usr/bin/env python3
# Keep-alive clients that pause between requests, never retry, during reloads:
# what an idle keep-alive connection can still see (HTTP/1.1's own race).
#
# Usage, from the workspace root, with the broker running the app on PORT:
#   ./target/debug/ally run APP --runtime-dir RT --bus none -- ./target/debug/examples/hello --listen 127.0.0.1:PORT &
#   python3 client/tests/load/idle_keepalive.py PORT APP RT CONNECTIONS MAX_PAUSE RELOADS [check]
# Each client sends a request, reads the answer, pauses uniformly 0..MAX_PAUSE s,
# and sends the next one on the same connection (a new one after `Connection:
# close`). With `check`, a client first looks whether the server closed the
# idle connection meanwhile, as pooled HTTP clients do (Go's net/http, urllib3,
# curl); without it, it writes blindly. One reload every 3 s.
import random, select, socket, subprocess, sys, threading, time
port, app, rt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conns, max_pause, reloads = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
check = len(sys.argv) > 7 and sys.argv[7] == "check"
ok = failed = 0
lock = threading.Lock()
done = threading.Event()

def closed_by_server(s):
    readable, _, _ = select.select([s], [], [], 0)
    return bool(readable) and s.recv(1, socket.MSG_PEEK) == b""

def request(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: ally\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise IOError("closed before the answer")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    fields = dict(l.split(b":", 1) for l in head.split(b"\r\n")[1:])
    fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
    while len(body) < int(fields[b"content-length"]):
        chunk = s.recv(4096)
        if not chunk:
            raise IOError("closed in the body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise IOError(head.split(b"\r\n")[0])
    return fields.get(b"connection") == b"close"

def client():
    global ok, failed
    s = None
    while not done.is_set():
        try:
            if s is not None and check and closed_by_server(s):
                s.close()
                s = None
            if s is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if request(s):
                s.close()
                s = None
            with lock:
                ok += 1
        except Exception:
            with lock:
                failed += 1
            if s is not None:
                s.close()
            s = None
        time.sleep(random.uniform(0, max_pause))

threads = [threading.Thread(target=client) for _ in range(conns)]
for t in threads:
    t.start()
time.sleep(2)
for _ in range(reloads):
    subprocess.run(["./target/debug/ally", "reload", app, "--runtime-dir", rt], check=True,
                   stdout=subprocess.DEVNULL)
    time.sleep(3)
done.set()
for t in threads:
    t.join()
print(f"{conns} clients pausing 0-{max_pause}s{' (checking for a closed connection)' if check else ''}, "
      f"{reloads} reloads: {ok} requests, {failed} failed")
