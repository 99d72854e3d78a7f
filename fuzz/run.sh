#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60) from its committed
# corpus, then prints its speed and corpus size. Exits non-zero if any target
# crashes, panics, times out or runs out of memory; the input is then saved in
# fuzz/artifacts/<target>/ and the end of libFuzzer's log is printed.
#
# Works with a stable toolchain: without a sanitizer, cargo-fuzz needs no nightly
# flag. FUZZ_SANITIZER=address adds AddressSanitizer, which needs nightly (or
# RUSTC_BOOTSTRAP=1, set here when the toolchain is not nightly).
set -euo pipefail

seconds=${1:-60}
cargo_fuzz_version=0.13.2
sanitizer=${FUZZ_SANITIZER:-none}
rss_limit_mb=${FUZZ_RSS_LIMIT_MB:-2048}

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
    cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi
if [ "$sanitizer" != none ] && ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

build=(--sanitizer "$sanitizer")
started=$(date +%s)
cargo fuzz build "${build[@]}"
echo "fuzz: built in $(($(date +%s) - started)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for target in $(cargo fuzz list); do
    # New inputs go to the first directory, so the committed corpus stays as it is.
    mkdir -p "$work/$target" "corpus/$target"
    log="$work/$target.log"
    echo "fuzz: $target for ${seconds} s"
    status=0
    cargo fuzz run "${build[@]}" "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss_limit_mb" -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    corpus=$(sed -n 's/.* corp: \([0-9]*\)\/\([0-9]*[a-zA-Z]*\) .*/\1 inputs, \2/p' "$log" | tail -n 1)
    line="$target: ${execs:-?} execs/s, ${runs:-?} runs, corpus ${corpus:-?}"
    if [ "$status" -ne 0 ]; then
        # From the first report of what went wrong to cargo-fuzz's advice.
        sed -n '/panicked at\|ERROR: libFuzzer\|==ERROR\|deadly signal\|out-of-memory\|timeout after/,/^Minimize/p' "$log"
        line="$line: FAILED (exit $status), input in fuzz/artifacts/$target/"
        failed+=("$target")
    fi
    echo "fuzz: $line"
    summary+=("$line")
done

echo "fuzz: summary after $(($(date +%s) - started)) s"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
