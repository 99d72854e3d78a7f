#!/usr/bin/env python3
# Usage, from the workspace root, with the broker running the app on PORT:
#   ./target/debug/ally run APP --runtime-dir RT --bus none -- ./target/debug/examples/hello --listen 127.0.0.1:PORT &
#   python3 client/tests/load/reload.py PORT APP RT SECONDS RELOADS
# Non-retrying HTTP load during reloads: keep-alive and new-connection clients.
import http.client, sys, threading, time, subprocess
port, app, rt, secs, reloads = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
stats = {"ka_ok": 0, "ka_fail": 0, "new_ok": 0, "new_fail": 0}
lock = threading.Lock()
stop = time.time() + secs
errors = {}
def count(k, e=None):
    with lock:
        stats[k] += 1
        if e is not None:
            errors[repr(e)[:80]] = errors.get(repr(e)[:80], 0) + 1
def keepalive():
    conn = None
    while time.time() < stop:
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/")
            r = conn.getresponse(); r.read()
            if r.status != 200: raise Exception(r.status)
            count("ka_ok")
            if r.getheader("Connection", "").lower() == "close":
                conn.close(); conn = None
        except Exception as e:
            count("ka_fail", e); conn = None
def fresh():
    while time.time() < stop:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Connection": "close"})
            r = conn.getresponse(); r.read(); conn.close()
            if r.status != 200: raise Exception(r.status)
            count("new_ok")
        except Exception as e:
            count("new_fail", e)
threads = [threading.Thread(target=keepalive) for _ in range(6)] + [threading.Thread(target=fresh) for _ in range(4)]
for t in threads: t.start()
time.sleep(0.5)
for i in range(reloads):
    subprocess.run(["./target/debug/ally", "reload", app, "--runtime-dir", rt], check=True, capture_output=True)
    time.sleep((secs - 1) / reloads)
for t in threads: t.join()
print(stats, errors)
