#!/usr/bin/env bash
# Runs every BENCHMARKS.md scenario RUNS times (default 3) with the release
# binaries, writing one JSON file per run to OUT (default bench/results).
# Needs PostgreSQL (HERALD_BENCH_ADMIN_URL, default
# postgres://postgres@127.0.0.1:5432/postgres) and a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
out=${OUT:-bench/results}
mkdir -p "$out"
cargo build --release --bins
b=target/release/herald-bench
for i in $(seq 1 "$runs"); do
  $b --json "$out/latency-$i.json" latency --subscribers 2000 --rate 2000 --duration 10s --callers 32
  $b --json "$out/throughput-$i.json" throughput --subscribers 1000 --rate 12000 --step 2000 \
    --max-rate 30000 --duration 5s --callers 1024 --send-connections 8
  $b --json "$out/fanout100-$i.json" fanout --subscribers 100 --rate 1500 --duration 10s --callers 128
  $b --json "$out/fanout1000-$i.json" fanout --subscribers 1000 --rate 150 --duration 10s --callers 64
  $b --json "$out/bulk-$i.json" bulk --subscribers 2000 --rate 200 --items 500 --duration 10s --callers 16
  $b --replicas 1 --json "$out/streams50k-$i.json" streams --streams 50000 --stream-connections 500
  $b --replicas 1 --json "$out/streams10k-$i.json" streams --streams 10000 --stream-connections 10000
  # Group-commit window at low load: it must not add latency.
  for w in 0s 2ms; do
    $b --replica-arg=--group-commit-window=$w --json "$out/lowload-window$w-$i.json" \
      latency --subscribers 200 --rate 200 --duration 10s --callers 4
  done
done
