#!/usr/bin/env bash
# statsd beside collectd (BENCHMARKS.md section 7): the release collector
# with 100 containers registered on its registration API (one UDP port
# each, as on a DC/OS 1.12 agent) against Debian's collectd with its statsd
# input and csv output (one port), fed the same packets by the same sender,
# one after the other in one run:
#  1. a steady 10,000 lines/s over 100 containers (20 counter lines a
#     packet, a container's packets to its own port): CPU and RSS;
#  2. saturation: the sender as fast as it goes for SAT_SECS: lines counted
#     per CPU-second of the receiver.
# Lines counted: the collector's collector_statsd_lines_total; collectd's
# counters as its csv files have them (each counter's cumulative value).
# Packets lost in the kernel: /proc/net/udp's drops of the receiver's ports.
# The collector's pace between quiet looks follows the receive buffer the
# kernel grants (net.core.rmem_max, printed): 50 ms with Linux's default,
# 200 ms from 832 KiB.
# Needs: cargo build --release -p collector; Debian's collectd-core and bc
# (installed here when missing); python3, curl.
# Usage: [SECS=60] [SAT_SECS=10] benchmarks/statsd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/collector
[ -x "$bin" ] || { echo "build first: cargo build --release -p collector" >&2; exit 1; }
if ! command -v collectd >/dev/null || ! command -v bc >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends collectd-core bc
fi
secs=${SECS:-60}
sat_secs=${SAT_SECS:-10}
containers=100
lines_per_packet=20
rate=10000

# shellcheck source=benchmarks/common.sh
. benchmarks/common.sh
mib() { echo "$1 / 1024" | bc -l; }
# Kernel drops of the UDP sockets bound to these ports (/proc/net/udp).
kernel_drops() {
  python3 - "$@" <<'EOF'
import sys
ports = {int(p) for p in sys.argv[1:]}
drops = 0
for line in open("/proc/net/udp").readlines()[1:]:
    fields = line.split()
    if int(fields[1].split(":")[1], 16) in ports:
        drops += int(fields[-1])
print(drops)
EOF
}

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The sender: packet k (20 counter lines of container k) to port k mod the
# ports given. `rate LINES_PER_S SECS PORT...` paces; `flood SECS PORT...`
# sends as fast as one Python process can. Prints the packets sent.
cat > "$work/send.py" <<EOF
import socket, sys, time
mode = sys.argv[1]
packets = [
    "\n".join(f"bench.c{k:03d}.m{j:02d}:1|c" for j in range($lines_per_packet)).encode()
    for k in range($containers)
]
if mode == "rate":
    rate, secs, ports = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
else:
    rate, secs, ports = 0.0, float(sys.argv[2]), sys.argv[3:]
targets = [("127.0.0.1", int(ports[k % len(ports)])) for k in range($containers)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
sent, start = 0, time.monotonic()
if mode == "rate":
    due = 0.0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= secs:
            break
        due = elapsed * rate / $lines_per_packet
        while sent < due:
            s.sendto(packets[sent % $containers], targets[sent % $containers])
            sent += 1
        time.sleep(0.01)
else:
    end = start + secs
    while True:
        for _ in range(1000):
            k = sent % $containers
            try:
                s.sendto(packets[k], targets[k])
            except BlockingIOError:
                pass
            sent += 1
        if time.monotonic() >= end:
            break
print(sent)
EOF

# One receiver through both phases. Globals in: pid, ports (space-separated),
# counted (a command printing lines counted so far), settle (seconds until
# what was sent is counted). Prints one result line.
measure() {
  local name=$1
  sleep 5
  local idle before after sent drops0 counted0 counted1 hwm rss
  idle=$(rss_kib "$pid")
  drops0=$(kernel_drops $ports)
  counted0=$($counted)
  before=$(cpu_ms "$pid")
  # shellcheck disable=SC2086
  sent=$(python3 "$work/send.py" rate "$rate" "$secs" $ports)
  after=$(cpu_ms "$pid")
  rss=$(rss_kib "$pid")
  sleep "$settle"
  counted1=$($counted)
  local steady_cpu steady_lost
  steady_cpu=$(echo "($after - $before) / 10 / $secs" | bc -l)
  steady_lost=$(echo "$sent * $lines_per_packet - ($counted1 - $counted0)" | bc)
  local drops1
  drops1=$(kernel_drops $ports)
  printf '%s steady: %d lines/s offered for %d s, CPU %.3f %% of a core, RSS idle %.1f MiB, busy %.1f MiB, lines not counted %s, kernel drops %s packets\n' \
    "$name" "$rate" "$secs" "$steady_cpu" "$(mib "$idle")" "$(mib "$rss")" "$steady_lost" "$((drops1 - drops0))"
  # Saturation.
  before=$(cpu_ms "$pid")
  # shellcheck disable=SC2086
  sent=$(python3 "$work/send.py" flood "$sat_secs" $ports)
  sleep "$settle"
  after=$(cpu_ms "$pid")
  local counted2 drops2
  counted2=$($counted)
  drops2=$(kernel_drops $ports)
  hwm=$(hwm_kib "$pid")
  local cpu_s lines
  cpu_s=$(echo "($after - $before) / 1000" | bc -l)
  lines=$((counted2 - counted1))
  printf '%s saturation: %.2f M lines/s offered, %.2f M lines/s counted (%.0f %%), %.2f CPU-s, %.2f M lines per CPU-second (%.0f ns a line), kernel drops %s packets, peak RSS %.1f MiB\n' \
    "$name" "$(echo "$sent * $lines_per_packet / $sat_secs / 1000000" | bc -l)" \
    "$(echo "$lines / $sat_secs / 1000000" | bc -l)" "$(echo "100 * $lines / ($sent * $lines_per_packet)" | bc -l)" \
    "$cpu_s" "$(echo "$lines / $cpu_s / 1000000" | bc -l)" "$(echo "$cpu_s * 1000000000 / $lines" | bc -l)" \
    "$((drops2 - drops1))" "$(mib "$hwm")"
}

echo "== collector: $containers containers registered, a port each"
"$bin" --kafka=false --agent-polling=false --node-metrics=false \
  --listen-endpoint=127.0.0.1:0 --api-listen=127.0.0.1:0 --partner-listen=127.0.0.1:0 \
  --statsd-control-listen=127.0.0.1:0 --statsd-container-limit-kbytes=0 \
  --input-limit-amount-kbytes=0 --global-limit-amount-kbytes=0 2> "$work/c.log" &
pid=$!
control=$(port_of "$work/c.log" statsd_control)
api=$(port_of "$work/c.log" api)
sleep 5
echo "collector idle, no container registered: RSS $(printf '%.1f' "$(mib "$(rss_kib "$pid")")") MiB"
ports=""
for k in $(seq 0 $((containers - 1))); do
  port=$(curl -s -X POST -H 'Content-Type: application/json' \
    -d "{\"container_id\":\"bench-$k\"}" "http://$control/container" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["statsd_port"])')
  ports="$ports $port"
done
# The quiet pace follows the receive buffer granted (docs/statsd.md).
echo "net.core.rmem_max $(cat /proc/sys/net/core/rmem_max); the collector's statsd looks:" \
  "$(grep -o 'receive_buffer_bytes=[0-9]* quiet_pace_ms=[0-9]*' "$work/c.log" | head -1)"
collector_counted() {
  curl -s "http://$api/metrics" | awk '/^collector_statsd_lines_total / { print $2 }'
}
counted=collector_counted
settle=2
measure collector
kill "$pid"; wait "$pid" 2>/dev/null || true

echo "== collectd $(collectd -h | awk '/^collectd /{sub(/,$/, "", $2); print $2; exit}'): statsd input, csv output, one port"
mkdir -p "$work/csv"
cport=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
{ collectd_head "$work"; cat <<EOF
LoadPlugin statsd
LoadPlugin csv
<Plugin statsd>
  Host "127.0.0.1"
  Port "$cport"
</Plugin>
<Plugin csv>
  DataDir "$work/csv"
  StoreRates false
</Plugin>
EOF
} > "$work/collectd.conf"
collectd -f -C "$work/collectd.conf" > "$work/collectd.log" 2>&1 &
pid=$!
ports=$cport
# Each counter's latest cumulative value, summed: lines counted.
collectd_counted() {
  local total=0 f
  for f in "$work"/csv/bench/statsd/derive-*; do
    [ -e "$f" ] || continue
    total=$((total + $(tail -1 "$f" | cut -d, -f2 | cut -d. -f1)))
  done
  echo "$total"
}
counted=collectd_counted
settle=12
measure collectd
kill "$pid"; wait "$pid" 2>/dev/null || true
