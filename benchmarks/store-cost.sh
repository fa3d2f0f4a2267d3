#!/usr/bin/env bash
# What the node store costs (BENCHMARKS.md section 6):
#  1. with both listeners off (the default), the store must cost nothing:
#     the busy node (`simulator bench --profile busy`) and the TCP → null
#     saturation, this build beside BEFORE (a collector binary built before
#     the store), alternating, two rounds;
#  2. the busy node with the store on (prometheus_listen) and a real
#     Prometheus (Debian's) scraping it every 15 s: CPU, RSS, series,
#     this build beside BEFORE, alternating, ROUNDS (2) rounds, each
#     with a run of this build with the listeners off (build "off").
# Needs: cargo build --release -p collector -p simulator; prometheus.
# Usage: benchmarks/store-cost.sh BEFORE   (e.g. a worktree's target/release/collector)
#        SECTIONS=2 benchmarks/store-cost.sh BEFORE   (only the second part; BEFORE
#        is then any other build, e.g. the commit before a change to the store)
set -euo pipefail
cd "$(dirname "$0")/.."
before=$(realpath "$1")
after=$(realpath target/release/collector)
sim=target/release/simulator
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
busy_secs=${BUSY_SECS:-60}
sections=${SECTIONS:-12}

field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d=d[0] if isinstance(d,list) else d; print(d$2)" "$1"; }

if [[ $sections == *1* ]]; then
echo "== 1. listeners off: this build ($after) beside $before, alternating"
printf '%-6s %-7s %16s %14s %14s\n' round build "null dp/s" "busy CPU %" "busy RSS max"
for round in 1 2; do
  for build in before after; do
    bin=$before; [ "$build" = after ] && bin=$after
    "$sim" bench --sink null --connections 4 --seconds 10 --collector-bin "$bin" \
      --json "$work/sat.json" > /dev/null
    "$sim" bench --profile busy --busy-secs "$busy_secs" --collector-bin "$bin" \
      --json "$work/busy.json" > /dev/null
    printf '%-6s %-7s %16.0f %14.3f %14.1f\n' "$round" "$build" \
      "$(field "$work/sat.json" "['datapoints_per_sec']")" \
      "$(field "$work/busy.json" "['cpu_percent']")" \
      "$(field "$work/busy.json" "['rss_max_mib']")"
  done
done

fi

if [[ $sections == *2* ]]; then
echo "== 2. the store on, scraped every 15 s by Prometheus: this build beside $before, alternating"
cat > "$work/prometheus.yml" <<YML
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: collector
    static_configs:
      - targets: ['127.0.0.1:61091']
YML
query() {
  curl -s -G --data-urlencode "query=$1" http://127.0.0.1:19090/api/v1/query \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'
}
printf '%-6s %-7s %14s %14s %15s %10s\n' round build "busy CPU %" "RSS max MiB" "RSS mean MiB" series
for round in $(seq "${ROUNDS:-2}"); do
  # This build with the listeners off, for what the store adds.
  "$sim" bench --profile busy --busy-secs 120 --collector-bin "$after" --json "$work/off.json" > /dev/null
  printf '%-6s %-7s %14.3f %14.1f %15.1f %10s\n' "$round" "off" \
    "$(field "$work/off.json" "['cpu_percent']")" \
    "$(field "$work/off.json" "['rss_max_mib']")" \
    "$(field "$work/off.json" "['rss_mean_mib']")" "-"
  for build in before after; do
    bin=$before; [ "$build" = after ] && bin=$after
    rm -rf "$work/tsdb"
    prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
      --web.listen-address=127.0.0.1:19090 2> "$work/prometheus.log" &
    prom=$!
    "$sim" bench --profile busy --busy-secs 120 --collector-bin "$bin" \
      --collector-env PROMETHEUS_LISTEN=127.0.0.1:61091 --collector-env STORE_DROP_TAGS=sim_seq \
      --json "$work/store.json" > /dev/null &
    bench=$!
    sleep 60
    series=$(query scrape_samples_scraped)
    wait "$bench"
    kill "$prom"; wait "$prom" 2>/dev/null || true
    printf '%-6s %-7s %14.3f %14.1f %15.1f %10s\n' "$round" "$build" \
      "$(field "$work/store.json" "['cpu_percent']")" \
      "$(field "$work/store.json" "['rss_max_mib']")" \
      "$(field "$work/store.json" "['rss_mean_mib']")" "$series"
  done
done
fi
