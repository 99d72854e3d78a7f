#!/usr/bin/env bash
# Builds the packages into target/pkg and lints them:
#   ally_<v>-1_amd64.deb, ally_<v>-2_amd64.deb (the same content as a newer
#   revision, for the upgrade test), ally-<v>-1.x86_64.rpm
# Needs cargo-deb, cargo-generate-rpm, lintian and rpmlint (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/pkg
rm -rf "$out" target/assets
mkdir -p "$out" target/assets/rpm

cargo build --release --locked --bin ally
cargo run --quiet --locked --example gen-assets -- target/assets
for page in target/assets/*.1; do
    gzip -9n -c "$page" > "target/assets/rpm/$(basename "$page").gz"
done

cargo deb --no-build --locked --output "$out/" >/dev/null
cargo deb --no-build --locked --deb-revision 2 --output "$out/" >/dev/null
cargo generate-rpm --output "$out/" >/dev/null
ls -l "$out"

echo "lintian:"
for deb in "$out"/*.deb; do
    lintian --allow-root --fail-on error,warning --display-info "$deb"
done
echo "rpmlint:"
rpmlint --config packaging/rpm/rpmlint.toml "$out"/*.rpm
