#!/usr/bin/env bash
# Benchmark of POST /fhir/Patient/$hashed-match over a match index of 1M synthetic members
# (5 stored values each): index size on disk, then latency with no floor (what matching itself
# costs) and with the default floor. Release builds; production durability for the load.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/bench.d/lib.sh
members=${BENCH_MEMBERS:-1000000}
port=${BENCH_PORT:-18182}
duration=${BENCH_DURATION:-20s}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release --locked -q --workspace --bins
bin=${CARGO_TARGET_DIR:-target}/release
run=bench_match_$$
requests=$(mktemp)
# Fresh secrets for this run only.
PMM1_MASTER_SECRET=$(openssl rand -hex 32) PMM1_PEPPER=$(openssl rand -hex 32)
export PMM1_MASTER_SECRET PMM1_PEPPER PGPASSWORD=fhir
cleanup() { kill "${api:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -f "$requests"; drop_database "$run"; }
trap cleanup EXIT

"$bin/match-bench" --database "$run" --members "$members" --requests-out "$requests"
export DATABASE_URL=postgres://fhir:fhir@127.0.0.1:5432/$run?sslmode=disable KAFKA_TOPIC_PREFIX=$run. \
  HTTP_BIND=127.0.0.1:$port FHIR_BASE_URL=http://127.0.0.1:$port/fhir LOG_LEVEL=warn \
  MATCH_RATE_LIMIT_PER_SECOND=1000000 MATCH_RATE_LIMIT_BURST=1000000 AUTH_TOKEN_LIFETIME_SECS=3600
echo "machine: $(nproc) cores; wrk, API and PostgreSQL share them"
for floor in 0 40; do
  MATCH_LATENCY_FLOOR_MS=$floor "$bin/api" & api=$!
  until curl -sf "127.0.0.1:$port/health" >/dev/null; do sleep 0.2; done
  TOKEN=$("$bin/partners" demo-token --id bench --pmm1-key-ids bench --rate 1000000 --burst 1000000)
  export TOKEN
  REQUESTS_FILE=$requests wrk -t2 -c8 -d5s -s scripts/bench.d/match.lua "http://127.0.0.1:$port" >/dev/null
  echo "== latency floor ${floor} ms: 8 connections, $duration, half indexed members, half random people"
  REQUESTS_FILE=$requests wrk -t2 -c8 -d"$duration" --latency -s scripts/bench.d/match.lua "http://127.0.0.1:$port"
  kill $api; wait $api 2>/dev/null || true; api=
done
