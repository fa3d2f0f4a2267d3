#!/usr/bin/env bash
# The collector's own CPU per datapoint at saturation into Kafka
# (BENCHMARKS.md section 1): two collector binaries alternated ROUNDS (3)
# times, each `simulator bench --sink kafka --connections 4 --seconds 10`
# against the simulator's 3-broker mock cluster, as the node profile's
# saturation phase runs it. Prints, per run, the collector's own threads'
# and librdkafka's threads' CPU per datapoint (schedstat) and the rate.
# Needs: cargo build --release -p collector -p simulator.
# Usage: benchmarks/saturation.sh BEFORE AFTER   (two collector binaries;
#        the same binary twice measures the spread)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 BEFORE AFTER (collector binaries)" >&2; exit 64; }
sim=target/release/simulator
[ -x "$sim" ] || { echo "build first: cargo build --release -p collector -p simulator" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$1" "$work/before"
cp "$2" "$work/after"
sync "$work/before" "$work/after"

for round in $(seq "${ROUNDS:-3}"); do
  for v in before after; do
    "$sim" bench --sink kafka --connections 4 --seconds 10 \
      --collector-bin "$work/$v" --json "$work/$v.json" > /dev/null
    python3 - "$work/$v.json" "$v" "$round" <<'PY'
import json, sys
point = json.load(open(sys.argv[1]))[0]
cpu, sent = point["cpu"], point["datapoints_sent"]
print(f"round {sys.argv[3]} {sys.argv[2]:6}: own threads {cpu['own_ns'] / sent:5.1f} ns/datapoint, "
      f"librdkafka {cpu['librdkafka_ns'] / sent:5.1f} ns/datapoint, "
      f"{point['datapoints_per_sec'] / 1e6:5.2f} M datapoints/s")
PY
  done
done
