# $1 is 0 on removal, 1 on upgrade: stop the brokers only on removal.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop 'ally@*.service' 'ally@*.socket' >/dev/null 2>&1 || :
fi
