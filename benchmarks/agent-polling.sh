#!/usr/bin/env bash
# What polling the agent costs an idle collector (BENCHMARKS.md section 1):
# two collector binaries side by side, each from its own synced copy (the
# page-out needs a binary mapped once and written back), idle against one
# `simulator kafka --brokers 3`, both polling one
# `simulator agent --containers 50` every 15 s; VmRSS and the resident
# bytes of each mapping (smaps) after SECS (45).
# Needs: cargo build --release -p collector -p simulator.
# Usage: benchmarks/agent-polling.sh BEFORE AFTER   (two collector binaries;
#        the same binary twice measures the spread)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 BEFORE AFTER (collector binaries)" >&2; exit 64; }
sim=target/release/simulator
[ -x "$sim" ] || { echo "build first: cargo build --release -p collector -p simulator" >&2; exit 1; }

# shellcheck source=benchmarks/common.sh
. benchmarks/common.sh

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp "$1" "$work/before"
cp "$2" "$work/after"
sync "$work/before" "$work/after"

"$sim" kafka --brokers 3 > "$work/kafka.log" 2>&1 &
"$sim" agent --listen 127.0.0.1:0 --containers 50 > "$work/agent.log" 2>&1 &
for _ in $(seq 100); do
  brokers=$(grep -o '127\.0\.0\.1:[0-9]*\(,127\.0\.0\.1:[0-9]*\)\+' "$work/kafka.log" | head -1) || true
  agent=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$work/agent.log" | head -1) || true
  [ -n "$brokers" ] && [ -n "$agent" ] && break
  sleep 0.1
done
[ -n "$brokers" ] && [ -n "$agent" ] || { echo "the simulator did not start" >&2; exit 1; }

declare -A pids
for v in before after; do
  "$work/$v" --kafka-brokers="$brokers" --agent-url="$agent" --agent-poll-period=15 \
    --node-metrics=false --listen-endpoint=127.0.0.1:0 --api-listen=127.0.0.1:0 \
    --partner-listen=127.0.0.1:0 > "$work/$v.log" 2>&1 &
  pids[$v]=$!
done
sleep "${SECS:-45}"
for v in before after; do
  pid=${pids[$v]}
  kill -0 "$pid" 2>/dev/null || { echo "$v exited:"; tail -3 "$work/$v.log"; exit 1; }
  printf '%-6s VmRSS %.1f MiB; resident MiB by mapping: ' "$v" "$(echo "$(rss_kib "$pid") / 1024" | bc -l)"
  awk '/^[0-9a-f]+-[0-9a-f]+ / { n = split($0, f, " "); name = (n > 5) ? f[n] : "[anon]"; sub(".*/", "", name) }
       /^Rss:/ { rss[name] += $2 }
       END { for (k in rss) if (rss[k] >= 100) printf "%s %.1f\n", k, rss[k] / 1024 }' \
    "/proc/$pid/smaps" | sort -k2 -nr | paste -sd, | sed 's/,/, /g'
done
