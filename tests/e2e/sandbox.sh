#!/usr/bin/env bash
# A throwaway systemd: an overlay of / booted as PID 1 in new pid, mount, uts
# and ipc namespaces. Never boot systemd on the real root: its tmpfiles
# clean-up would empty the real /tmp.
#
#   sandbox.sh start DIR    boots it; prints the PID of its systemd
#   sandbox.sh exec DIR CMD runs CMD inside (all namespaces)
#   sandbox.sh stop DIR     powers it off and unmounts everything
set -euo pipefail

cmd=${1:?start|exec|stop}
dir=${2:?scratch directory}

case "$cmd" in
start)
    mkdir -p "$dir"/{upper,work,root}
    mount -t overlay overlay -o lowerdir=/,upperdir="$dir/upper",workdir="$dir/work" "$dir/root"
    # What the booted system needs fresh: its own /run, /tmp and /proc; the
    # real /dev and cgroup tree.
    unshare --pid --fork --mount --uts --ipc --propagation private bash -c '
        set -e
        root=$1
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o mode=755 tmpfs "$root/run"
        mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
        mkdir -p "$root/oldroot"
        cd "$root"
        pivot_root . oldroot
        umount -l /oldroot
        hostname ally-e2e
        export container=ally-e2e
        exec /lib/systemd/systemd --system --unit=multi-user.target --log-target=console --log-level=warning </dev/null
    ' _ "$dir/root" >"$dir/console.log" 2>&1 &
    unshare_pid=$!
    echo "$unshare_pid" > "$dir/unshare.pid"
    # The systemd is the child of unshare: PID 1 in its namespace.
    for _ in $(seq 1 100); do
        pid=$(pgrep -P "$unshare_pid" -x systemd || true)
        [ -n "$pid" ] && break
        sleep 0.1
    done
    [ -n "${pid:-}" ] || { echo "systemd did not start" >&2; cat "$dir/console.log" >&2; exit 1; }
    echo "$pid" > "$dir/systemd.pid"
    # Wait until it answers.
    for _ in $(seq 1 300); do
        state=$(nsenter -t "$pid" -a systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 0.1
    done
    echo "$pid"
    ;;
exec)
    shift 2
    exec nsenter -t "$(cat "$dir/systemd.pid")" -a "$@"
    ;;
stop)
    pid=$(cat "$dir/systemd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        nsenter -t "$pid" -a systemctl poweroff --no-block >/dev/null 2>&1 || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    upid=$(cat "$dir/unshare.pid" 2>/dev/null || true)
    [ -n "$upid" ] && { kill -KILL "$upid" 2>/dev/null || true; }
    sleep 0.2
    umount -R "$dir/root" 2>/dev/null || umount -l "$dir/root" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 start|exec|stop DIR [CMD...]" >&2; exit 2 ;;
esac
