#!/usr/bin/env bash
# What serving the node's metrics costs (BENCHMARKS.md section 6):
#  1. the node store: RSS with 10,000 and 100,000 series held, and the time
#     and CPU of a Prometheus scrape of them (the release collector, no
#     Kafka, fed series by fastavro over its TCP input);
#  2. node metrics beside Debian's prometheus-node-exporter, on this
#     machine in one run: CPU per scrape and RSS of each, and the
#     collector's CPU per poll.
# Needs: cargo build --release -p collector; python3 with fastavro
# (scripts/requirements-test.txt); prometheus-node-exporter and curl.
# Usage: benchmarks/served.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/collector
[ -x "$bin" ] || { echo "build first: cargo build --release -p collector" >&2; exit 1; }

# shellcheck source=benchmarks/common.sh
. benchmarks/common.sh
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== 1. the node store"
for series in 10000 100000; do
  "$bin" --kafka=false --agent-polling=false --node-metrics=false \
    --listen-endpoint=127.0.0.1:0 --api-listen=127.0.0.1:0 --partner-listen=127.0.0.1:0 \
    --prometheus-listen=127.0.0.1:0 --store-max-series=200000 \
    --input-limit-amount-kbytes=0 --global-limit-amount-kbytes=0 2> "$work/c.log" &
  pid=$!
  input=$(port_of "$work/c.log" input)
  prom=$(port_of "$work/c.log" prometheus)
  sleep 2
  idle=$(rss_kib "$pid")
  python3 - "$input" "$series" <<'EOF'
import io, socket, sys, json
import fastavro
schema = fastavro.parse_schema(json.load(open("schema/avro/metrics.avsc")))
host, port = sys.argv[1].rsplit(":", 1)
n = int(sys.argv[2])
# A container's series: 40 names, 5 tags, as the agent poller's records.
records = []
for c in range(n // 40):
    records.append({
        "topic": "bench",
        "tags": [{"key": k, "value": f"{k}-{c:06d}"} for k in
                 ("container_id", "executor_id", "framework_id", "source", "executor_name")],
        "datapoints": [{"name": f"dcos.metrics.container.stat_{i:02d}", "time_ms": 1, "value": float(i)}
                       for i in range(40)],
    })
out = io.BytesIO()
fastavro.writer(out, schema, records, codec="null", sync_interval=64 * 1024)
with socket.create_connection((host, int(port))) as s:
    s.sendall(out.getvalue())
EOF
  for _ in $(seq 300); do
    held=$(curl -s "http://$prom/metrics" | awk '/^collector_store_series / { print $2 }')
    [ "${held:-0}" -ge "$series" ] && break
    sleep 0.2
  done
  held_rss=$(rss_kib "$pid")
  before=$(cpu_ms "$pid")
  for _ in $(seq 10); do
    curl -s -o "$work/scrape" -w '%{time_total}\n' "http://$prom/metrics"
  done > "$work/times"
  after=$(cpu_ms "$pid")
  scrape_ms=$(awk '{ print $1 * 1000 }' "$work/times" | median)
  printf '%7d series: RSS %.1f MiB idle, %.1f MiB held (+%.2f MiB per 10,000); scrape %s bytes in %.1f ms (median of 10), %.1f CPU ms each\n' \
    "$held" "$(echo "$idle / 1024" | bc -l)" "$(echo "$held_rss / 1024" | bc -l)" \
    "$(echo "($held_rss - $idle) / 1024 / ($held / 10000)" | bc -l)" \
    "$(wc -c < "$work/scrape")" "$scrape_ms" "$(echo "($after - $before) / 10" | bc -l)"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo "== 2. node metrics beside prometheus-node-exporter"
"$bin" --kafka=false --agent-polling=false --node-metrics=true --node-poll-period=1 \
  --listen-endpoint=127.0.0.1:0 --api-listen=127.0.0.1:0 --partner-listen=127.0.0.1:0 \
  --prometheus-listen=127.0.0.1:0 2> "$work/c.log" &
cpid=$!
prom=$(port_of "$work/c.log" prometheus)
prometheus-node-exporter --web.listen-address=127.0.0.1:0 2> "$work/ne.log" &
npid=$!
ne=$(port_of "$work/ne.log" 'Listening on" address')
sleep 5
# Polls: 60 s of one poll a second, no scrape.
before=$(cpu_ms "$cpid"); sleep 60; after=$(cpu_ms "$cpid")
per_poll=$(echo "($after - $before) / 60" | bc -l)
scrape() { # pid url: CPU ms per scrape over 100 scrapes, and the series of one
  local before after
  before=$(cpu_ms "$1")
  for _ in $(seq 100); do curl -s -o "$work/s" "$2"; done
  after=$(cpu_ms "$1")
  echo "$(echo "($after - $before) / 100" | bc -l) $(grep -vc '^#' "$work/s")"
}
# The collector still polls during its scrapes: take its polls' share out.
start=$(date +%s.%N)
read -r c_scrape c_series < <(scrape "$cpid" "http://$prom/metrics")
seconds=$(echo "$(date +%s.%N) - $start" | bc -l)
c_scrape=$(echo "$c_scrape - $per_poll * $seconds / 100" | bc -l)
read -r n_scrape n_series < <(scrape "$npid" "http://$ne/metrics")
printf 'collector: %.2f CPU ms per poll, %.2f CPU ms per scrape of %d series, RSS %.1f MiB\n' \
  "$per_poll" "$c_scrape" "$c_series" "$(echo "$(rss_kib "$cpid") / 1024" | bc -l)"
printf 'node-exporter: %.2f CPU ms per scrape of %d series, RSS %.1f MiB\n' \
  "$n_scrape" "$n_series" "$(echo "$(rss_kib "$npid") / 1024" | bc -l)"
