#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints executions and findings per target.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, all targets)
#   fuzz/run.sh --seeds                              (rewrite the committed seed corpora)
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). New inputs the fuzzer finds go to fuzz/work/<target>/
# (ignored by git); crashes go to fuzz/artifacts/<target>/ and make the script fail.
set -euo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "--seeds" ]]; then
    rm -rf corpus
    exec cargo run --release --bin make_seeds
fi

seconds="${1:-60}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

for t in "${targets[@]}"; do
    cargo +nightly fuzz build --release "$t"
done
failed=0
printf '%-15s %12s %10s %8s  %s\n' target executions exec/s corpus findings
for t in "${targets[@]}"; do
    mkdir -p "work/$t"
    log="work/$t.log"
    status=0
    cargo +nightly fuzz run --release "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    corpus=$(find "work/$t" -type f | wc -l)
    findings=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    printf '%-15s %12s %10s %8s  %s\n' "$t" "$execs" "$speed" "$corpus" "$findings"
    if [[ $status -ne 0 || $findings -ne 0 ]]; then
        failed=1
        echo "  $t: see $PWD/$log and $PWD/artifacts/$t/" >&2
    fi
done
exit $failed
