#!/usr/bin/env bash
# Jobs per minute of a queue-mode fleet (one front, 1 then 2 workers, one Redis) on the tiny
# fixtures: how throughput scales with workers on this machine, not how fast a real model runs.
#
#   [ROUNDS=2] tools/fleet_throughput.sh [jobs=40] [steps=4] [size=64]
#
# Needs redis-server and curl. Builds the release worker. Each worker gets
# $THREADS_PER_WORKER compute threads (default: cores / 2), so one and two workers use the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-40}
STEPS=${2:-4}
SIZE=${3:-64}
CORES=$(nproc)
THREADS=${THREADS_PER_WORKER:-$(( CORES / 2 > 0 ? CORES / 2 : 1 ))}
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }
cargo build --release -q -p sd-worker
BIN=target/release/sd-worker
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $(( 20000 + RANDOM % 20000 )); }
wait_ready() { for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return 0; sleep 0.1; done; echo "port $1 never ready" >&2; for f in "$TMP"/*.log; do echo "== $f" >&2; tail -n 5 "$f" >&2; done; exit 1; }

submit_and_wait() { # port label
  local port=$1 label=$2 ids=() t0 t1
  t0=$(date +%s.%N)
  for i in $(seq 1 "$JOBS"); do
    ids+=("$(curl -s -X POST "http://127.0.0.1:$port/v1/jobs" -d "{\"operation\":\"image_generation\",\"prompt\":\"x\",\"width\":$SIZE,\"height\":$SIZE,\"steps\":$STEPS,\"seed\":$i}" | sed -n 's/.*"job_id":"\([^"]*\)".*/\1/p')")
  done
  for id in "${ids[@]}"; do
    until curl -s "http://127.0.0.1:$port/v1/jobs/$id" | grep -q '"status":"completed"'; do sleep 0.05; done
  done
  t1=$(date +%s.%N)
  awk -v n="$JOBS" -v a="$t0" -v b="$t1" -v l="$label" -v t="$THREADS" 'BEGIN { printf "%s, %d thread(s) each: %d jobs in %.1f s = %.1f jobs/min\n", l, t, n, b - a, n * 60 / (b - a) }'
}

run_single() {
  local port
  port=$(free_port)
  RAYON_NUM_THREADS=$THREADS "$BIN" --model fixtures/sd15 --device cpu --port "$port" --preview-every 0 --queue-capacity 1000 --max-stored-jobs 2000 >"$TMP/single.log" 2>&1 &
  PIDS+=($!)
  wait_ready "$port"
  submit_and_wait "$port" "single process (no queue)"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

run_fleet() {
  local workers=$1 rport fport
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$TMP/redis.log" 2>&1 &
  PIDS+=($!)
  sleep 0.3
  local q="redis://127.0.0.1:$rport/0"
  fport=$(free_port)
  "$BIN" --front-only --queue "$q" --port "$fport" --queue-capacity 1000 >"$TMP/front.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 1 "$workers"); do
    RAYON_NUM_THREADS=$THREADS "$BIN" --queue "$q" --model fixtures/sd15 --device cpu --port "$(free_port)" --preview-every 0 >"$TMP/w$i.log" 2>&1 &
    PIDS+=($!)
  done
  wait_ready "$fport"
  sleep 2.5 # every worker registered its heartbeat
  submit_and_wait "$fport" "queue mode, $workers worker(s)"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $CORES cores; $JOBS jobs of $STEPS steps at ${SIZE}², tiny SD 1.5 fixture"
# Interleaved rounds: this machine's speed drifts, so compare within a round.
for round in $(seq 1 "${ROUNDS:-2}"); do
  echo "round $round"
  run_single
  run_fleet 1
  run_fleet 2
done
