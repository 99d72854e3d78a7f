if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || :; fi
if [ -S /run/dbus/system_bus_socket ]; then
    dbus-send --system --type=method_call --dest=org.freedesktop.DBus / org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1 || :
fi
# $1 is 2 or more on upgrade: every running broker runs the new binary in place.
if [ "$1" -ge 2 ] && [ -d /run/systemd/system ]; then
    for unit in $(systemctl list-units --no-legend --plain --state=running 'ally@*.service' 2>/dev/null | awk '{print $1}'); do
        app=${unit#ally@}
        app=${app%.service}
        /usr/bin/ally reexec "$app" --quiet ||
            echo "ally: $unit could not re-execute; it runs the old binary until its next restart" >&2
    done
fi
