#!/usr/bin/env bash
# Load benchmark of GET /fhir/Patient/{id}/$medication-profile over a populated database:
# maximum throughput, then latency at 2,000 req/s: at a fixed rate (oha), in lock-step bursts,
# as independent arrivals (wrk), and at the fixed rate across a merge of the audit trail's
# index. Release builds; production durability for the data load
# (fsync, synchronous_commit, acks=all). The API's settings come from the environment, e.g.
# PROFILE_CACHE_MIB=0 measures it without its memory of profile bodies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/bench.d/lib.sh
members=${BENCH_MEMBERS:-20000}
port=${BENCH_PORT:-18181}
duration=${BENCH_DURATION:-20s}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
# oha (crates.io) sends at a fixed rate from one schedule and measures each request from the
# moment it was due (--latency-correction), which Debian's wrk cannot. Built once (~10 min),
# with the system OpenSSL (the bootstrap installs it for rdkafka) rather than compiling aws-lc.
tools=${PLATFORM_STATE_DIR:-$HOME/.cache/fhir-platform}/tools
oha=$tools/bin/oha
[ -x "$oha" ] || env -u CARGO_TARGET_DIR cargo install -q --locked --no-default-features --features native-tls --version 1.16.0 --root "$tools" oha
cargo build --release --locked -q --workspace --bins
bin=${CARGO_TARGET_DIR:-target}/release
run=bench_api_$$
export PGPASSWORD=fhir
psql -X -q -h 127.0.0.1 -U fhir -d postgres -c "CREATE DATABASE $run"
# Loopback without TLS, as the platform's default DATABASE_URL (BENCH_PG_SSLMODE=require measures TLS).
export DATABASE_URL="postgres://fhir:fhir@127.0.0.1:5432/$run?sslmode=${BENCH_PG_SSLMODE:-disable}" KAFKA_TOPIC_PREFIX=$run. COMPOSER_GROUP_ID=$run \
  HTTP_BIND=127.0.0.1:$port FHIR_BASE_URL=http://127.0.0.1:$port/fhir LOG_LEVEL=warn
cleanup() { kill "${api:-}" "${composer:-}" 2>/dev/null || true; wait 2>/dev/null || true; drop_database "$run"; }
trap cleanup EXIT

published=$("$bin/generate" --members "$members" --seed 5 | tee /dev/stderr | awk '/published/ { print $2 }')
"$bin/composer" & composer=$!
until [ "$(psql -X -h 127.0.0.1 -U fhir -d "$run" -tAc "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets" 2>/dev/null || echo 0)" -ge "$published" ]; do sleep 1; done
kill $composer; wait $composer 2>/dev/null || true; composer=
# Steady state, as autovacuum leaves a database in service: the load's rows vacuumed (visibility
# and hint bits set) and analyzed, rather than the first reads after a bulk load writing them.
psql -X -q -h 127.0.0.1 -U fhir -d "$run" -c "VACUUM (ANALYZE) components, composites, composite_history"
list=$(mktemp)
# The reads are partner-1's: the members attributed to it (about a quarter of the generated ones).
psql -X -h 127.0.0.1 -U fhir -d "$run" -tAc "SELECT c.member_id FROM composites c WHERE NOT c.deleted AND EXISTS (
  SELECT 1 FROM components a WHERE a.kind = 'attribution' AND NOT a.deleted AND a.member_id = c.member_id
  AND a.body ->> 'partner_id' = 'partner-1' AND (a.body ->> 'period_start')::date <= current_date)" >"$list"
echo "populated: $(wc -l <"$list") live medication profiles attributed to partner-1, average $(psql -X -h 127.0.0.1 -U fhir -d "$run" -tAc "SELECT avg(length(h.body::text))::int FROM composites c JOIN composite_history h USING (member_id, version_id) WHERE NOT c.deleted") bytes"

# BENCH_API_BINARY: another build's API under the same load (a same-session comparison).
AUTH_TOKEN_LIFETIME_SECS=3600 "${BENCH_API_BINARY:-$bin/api}" & api=$!
until curl -sf "127.0.0.1:$port/health" >/dev/null; do sleep 0.2; done
# A partner whose rate limit is far above what wrk can send, so the figures are the server's.
TOKEN=$("$bin/partners" demo-token --id partner-1 --rate 1000000 --burst 1000000)
export TOKEN
echo "machine: $(nproc) cores; the load generator, API and PostgreSQL share them; PROFILE_CACHE_MIB=${PROFILE_CACHE_MIB:-256}"
# Each phase measures its own load, not the catching up after the one before: wait until the
# audit relay has published every audit event of the previous phase (at most 5 minutes).
settle() {
  local started=$SECONDS backlog
  while backlog=$(psql -X -h 127.0.0.1 -U fhir -d "$run" -tAc "SELECT count(*) FROM audit_events e, audit_relay r WHERE (e.txid, e.id) > (r.txid, r.id)") && [ "$backlog" -gt 0 ] \
    && [ $((SECONDS - started)) -lt 300 ]; do sleep 1; done
  echo "(audit relay caught up in $((SECONDS - started)) s; $backlog audit events still unpublished)"
  # Then a checkpoint, as pgbench takes before it measures: the phase writes its WAL into
  # segments recycled by it, as in a server in service, rather than creating and zero-filling
  # new 16 MB segment files in the commit path (each stalled every commit for 30-50 ms).
  as_root runuser -u postgres -- psql -X -q -p 5432 -c CHECKPOINT || echo "(no CHECKPOINT: PostgreSQL's superuser is not reachable from here)"
  # And the page cache written back: Kafka does not fsync its logs, so the kernel writes the
  # earlier phases' (and the data load's) records back in bursts of 100+ MB every 30 s, and
  # PostgreSQL's WAL fsyncs on the same disk waited behind them (commits of 90-200 ms).
  sync
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
# The machine's CPU over a phase, from /proc/stat. On a shared VM the host's steal slows every
# process here; runs are comparable only with it (and the busy share) in view.
cpu_mark() { local _ user nice system idle iowait irq softirq steal; read -r _ user nice system idle iowait irq softirq steal _ </proc/stat
  echo "$user $nice $system $idle $iowait $irq $softirq $steal"; }
cpu_report() {
  local a b d=() total=0 i
  read -r -a a <<<"$1"; read -r -a b <<<"$(cpu_mark)"
  for i in 0 1 2 3 4 5 6 7; do d[i]=$((b[i] - a[i])); total=$((total + d[i])); done
  if [ "$total" -gt 0 ]; then echo "(CPU over the phase: $((100 * (total - d[3] - d[4]) / total))% busy, steal $((100 * d[7] / total))%)"; fi
}
# wrk with the profile script; the run fails if any response was an error or a socket failed
# (the script has no response callback: see profile.lua).
wrk_profile() {
  local out; out=$(MEMBERS_FILE=$list wrk -s scripts/bench.d/profile.lua "$@" "http://127.0.0.1:$port")
  echo "$out"
  if grep -qE "Non-2xx or 3xx responses|Socket errors" <<<"$out"; then echo "wrk: error responses or socket errors (above); the figures do not count" >&2; exit 1; fi
}
# The host's speed now: a VM's neighbours slow it without showing as steal (here the same
# loop took 0.77-1.52 s within a day). The figures move with it, though not only with it: at a
# loop of 0.82 s the maximum was 10,100 req/s in one run and 16,600 in another. The CPU's busy
# share in a fixed-rate phase (the same load each run: 41-59 % that day) is the other sign.
host_speed() { local TIMEFORMAT=%R t; t=$( { time awk 'BEGIN { for (i = 0; i < 3e7; i++) s += i }'; } 2>&1 ); echo "(host speed: a reference loop took $t s)"; }
echo "== warm-up"
wrk_profile -t2 -c32 -d5s >/dev/null
settle
host_speed
echo "== maximum throughput (64 connections, $duration)"
mark=$(cpu_mark)
wrk_profile -t2 -c64 -d"$duration" --latency
cpu_report "$mark"
settle
host_speed
echo "== fixed rate 2,000 req/s (oha: one schedule, a request due every 0.5 ms on 24 connections; latency from when it was due, $duration)"
sed "s|^|http://127.0.0.1:$port/fhir/Patient/|; s|\$|/\$medication-profile|" "$list" >"$list.urls"
fixed_rate() {
  local mark; mark=$(cpu_mark)
  "$oha" --no-tui -z "$duration" -c 24 -q 2000 --latency-correction --urls-from-file "$list.urls" \
    -H "Authorization: Bearer $TOKEN" -H "Accept: application/fhir+json" | sed -n '/^Summary/,/Requests\/sec/p; /^Response time distribution/,/^$/p; /^Status code distribution/,/^$/p'
  cpu_report "$mark"
}
fixed_rate
settle
echo "== lock-step bursts ~2,000 req/s (wrk: 24 connections x 1 request / 10 ms + response time, $duration)"
mark=$(cpu_mark)
RATE_DELAY_MS=10 wrk_profile -t2 -c24 -d"$duration" --latency
cpu_report "$mark"
settle
echo "== independent arrivals ~2,000 req/s (wrk: 24 connections x 1 request / exponential wait, mean 11 ms, + response time, $duration)"
mark=$(cpu_mark)
RATE_DELAY_MS=11 RATE_POISSON=1 wrk_profile -t2 -c24 -d"$duration" --latency
cpu_report "$mark"
settle
# The trail's member index (GIN) gathers new entries in a pending list, and the insert that fills
# it (4 MB: about 146,000 audited reads, every ~70 s at 2,000 req/s) merges it into the index
# inside its own statement. A phase above contains one only by chance, so this one makes sure:
# reads at full speed until the list is about 20,000 entries short of its limit, then the fixed
# rate again. Autovacuum (which also merges the list) is held off the trail meanwhile, as in a
# long-lived trail, where its insert threshold (20 % of the table) comes far less often.
pg() { as_root runuser -u postgres -- psql -X -d "$run" -tAc "$1"; }
echo "== fixed rate 2,000 req/s across a merge of the audit trail's GIN pending list ($duration)"
if pg "CREATE EXTENSION IF NOT EXISTS pgstattuple" >/dev/null 2>&1; then
  pg "ALTER TABLE audit_events SET (autovacuum_enabled = false)" >/dev/null
  IFS='|' read -r pages entries <<<"$(pg "SELECT pending_pages, pending_tuples FROM pgstatginindex('audit_events_member')")"
  # Merged once the pending pages' usable space (8,160 bytes each) exceeds the limit.
  limit_pages=$(( $(pg "SELECT setting FROM pg_settings WHERE name = 'gin_pending_list_limit'") * 1024 / 8160 ))
  per_page=$(( pages >= 10 ? entries / pages : 280 ))
  fill=$(( (limit_pages - pages) * per_page - 20000 ))
  echo "(pending list: $pages pages, $entries entries; $fill reads at full speed first)"
  if [ "$fill" -gt 0 ]; then
    "$oha" --no-tui -n "$fill" -c 64 --urls-from-file "$list.urls" -H "Authorization: Bearer $TOKEN" -H "Accept: application/fhir+json" >/dev/null
  fi
  settle
  host_speed
  echo "(pending list before: $(pg "SELECT pending_pages || ' pages, ' || pending_tuples || ' entries' FROM pgstatginindex('audit_events_member')"); merged at $limit_pages pages)"
  fixed_rate
  echo "(pending list after: $(pg "SELECT pending_pages || ' pages, ' || pending_tuples || ' entries' FROM pgstatginindex('audit_events_member')"))"
  pg "ALTER TABLE audit_events RESET (autovacuum_enabled)" >/dev/null
else
  echo "(skipped: the pgstattuple extension needs PostgreSQL's superuser, not reachable from here)"
fi
rm -f "$list" "$list.urls"
