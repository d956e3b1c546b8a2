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
bench=target/release/herald-bench
admin=${HERALD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}

# Each scenario: first the machine's noise, then the run (scenario name =
# the JSON file's).
b() {
  for a in "$@"; do
    case $a in "$out"/*.json) noise "$(basename "$a" .json)" ;; esac
  done
  "$bench" "$@"
}

# Machine noise: the share of both cores that other processes keep busy
# over 2 s while nothing of ours runs (from /proc/stat), one line per
# scenario in $out/noise.txt.
noise() {
  read -r _ u n s i w q sq _ < /proc/stat
  sleep 2
  read -r _ u2 n2 s2 i2 w2 q2 sq2 _ < /proc/stat
  busy=$(( (u2 + n2 + s2 + q2 + sq2) - (u + n + s + q + sq) ))
  idle=$(( (i2 + w2) - (i + w) ))
  echo "$1 busy $(( 100 * busy / (busy + idle + 1) ))%" >> "$out/noise.txt"
}

# The database's ceiling beside the figures: one client inserting
# 1,000-row batches of narrow rows (a notification row's columns, primary
# key only) for 10 s
# with pgbench, as rows/s, in $out/ceiling-RUN.txt.
ceiling() {
  pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | tail -1)
  if [ -z "$pgbench" ]; then
    echo "no pgbench: ceiling not measured" > "$out/ceiling-$1.txt"
    return
  fi
  db=herald_ceiling_$$
  psql "$admin" -qc "CREATE DATABASE $db"
  url=$(echo "$admin" | sed "s|/[^/?]*\(?.*\)\{0,1\}$|/$db\1|")
  psql "$url" -qc "CREATE TABLE rows (id bigint PRIMARY KEY, tenant text, user_id text, \
    seq bigint, content_id bigint, created_at timestamptz DEFAULT now())"
  script=$(mktemp)
  echo "INSERT INTO rows (id, tenant, user_id, seq, content_id) \
    SELECT nextval('s'), '', 'u' || g, g, g FROM generate_series(1, 1000) g;" > "$script"
  psql "$url" -qc "CREATE SEQUENCE s"
  tps=$("$pgbench" -n -T 10 -c 1 -f "$script" "$url" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  rows=$(awk -v t="$tps" 'BEGIN { printf "%.0f", t * 1000 }')
  echo "batched insert: $rows rows/s (pgbench, 1 client, 1,000 rows per transaction)" \
    > "$out/ceiling-$1.txt"
  rm -f "$script"
  psql "$admin" -qc "DROP DATABASE $db WITH (FORCE)"
}

for i in $(seq 1 "$runs"); do
  ceiling "$i"
  b --json "$out/latency-$i.json" latency --subscribers 2000 --rate 2000 --duration 10s --callers 32
  # The same over Server-Sent Events (one HTTP/1.1 connection per subscriber).
  b --json "$out/latency-sse-$i.json" latency --subscribers 2000 --rate 2000 --duration 10s --callers 32 --sse
  b --json "$out/throughput-$i.json" throughput --subscribers 1000 --rate 12000 --step 2000 \
    --max-rate 30000 --duration 5s --callers 1024 --send-connections 8
  b --json "$out/fanout100-$i.json" fanout --subscribers 100 --rate 1500 --duration 10s --callers 128
  b --json "$out/fanout1000-$i.json" fanout --subscribers 1000 --rate 150 --duration 10s --callers 64
  b --json "$out/bulk-$i.json" bulk --subscribers 2000 --rate 200 --items 500 --duration 10s --callers 16
  b --replicas 1 --json "$out/streams50k-$i.json" streams --streams 50000 --stream-connections 500
  b --replicas 1 --json "$out/streams10k-$i.json" streams --streams 10000 --stream-connections 10000
  b --replicas 1 --json "$out/streams10k-grpcweb-$i.json" streams --streams 10000 --grpc-web
  b --replicas 1 --json "$out/streams10k-sse-$i.json" streams --streams 10000 --sse
  # Group-commit window at low load: it must not add latency.
  for w in 0s 2ms; do
    b --replica-arg=--group-commit-window=$w --json "$out/lowload-window$w-$i.json" \
      latency --subscribers 200 --rate 200 --duration 10s --callers 4
  done
done
