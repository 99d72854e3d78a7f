#!/bin/sh
# Runs a go command on this module offline, with Debian's Go libraries
# (golang-dbus-dev, golang-google-grpc-dev, ... in /usr/share/gocode) instead of a
# module proxy: GOPATH mode, where go.mod's presence lets `github.com/godbus/dbus/v5`
# resolve to Debian's github.com/godbus/dbus ("minimal module compatibility").
#
#   go/offline.sh vet ./...
#   go/offline.sh test ./...
#   go/offline.sh build -o target/go/hello-http ./examples/http
#
# With a module proxy, plain `go test ./...` in go/ works as usual.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
target=${CARGO_TARGET_DIR:-$repo/target}
gopath=$target/gopath
mkdir -p "$gopath/src/github.com/ally-rs"
ln -sfn "$repo" "$gopath/src/github.com/ally-rs/ally"
# Output paths (-o FILE) are the caller's, relative to where it runs this.
caller=$(pwd)
previous=
for arg do
    shift
    if [ "$previous" = -o ]; then
        case $arg in /*) ;; *) arg=$caller/$arg ;; esac
    fi
    set -- "$@" "$arg"
    previous=$arg
done
cd "$gopath/src/github.com/ally-rs/ally/go"
PWD=$gopath/src/github.com/ally-rs/ally/go
export PWD
export GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOPROXY=off
exec go "$@"
