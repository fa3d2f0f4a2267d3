#!/usr/bin/env bash
# The collector beside other node agents (BENCHMARKS.md section 8), side
# by side in one run, each with its native input:
#  1. idle, all at once against one mock cluster (`simulator kafka`):
#     the collector with its defaults (Kafka connected; agent polling and
#     node metrics off, as Fluent Bit's tcp → kafka pipeline has neither),
#     the collector with Prometheus, the v0 API and statsd on, Fluent Bit
#     (tcp input, kafka output), Debian's collectd (cpu, memory, load,
#     interface, df and statsd inputs, csv output) and Debian's
#     prometheus-node-exporter (its defaults, not scraped): CPU over
#     IDLE_SECS, RSS at its end;
#  2. a busy node, one receiver after the other: 200 connections at 50
#     datapoints/s each (10,000 in all, one write a second each), to Kafka.
#     The collector gets an Avro stream that fastavro encodes; Fluent Bit
#     gets the same datapoints as JSON lines, one a datapoint with its
#     tags: CPU and highest RSS (sampled every second);
#  3. saturation, null output (the collector with `--kafka=false`): 4
#     connections sending as fast as they go for SAT_SECS; datapoints/s
#     through, and the receiver's CPU.
# Fluent Bit runs only when FLUENT_BIT names its binary. The minimal build
# measured in BENCHMARKS.md: `cmake -DFLB_MINIMAL=On -DFLB_IN_TCP=On
# -DFLB_OUT_KAFKA=On -DFLB_OUT_NULL=On -DFLB_RELEASE=On -DFLB_DEBUG=Off
# -DFLB_PREFER_SYSTEM_LIB_SQLITE=On` (Debian's libsqlite3-dev, cmake, flex,
# bison), then `make fluent-bit-bin`.
# Needs: cargo build --release -p collector -p simulator; python3 with
# fastavro (scripts/requirements-test.txt); curl; Debian's collectd-core,
# prometheus-node-exporter and bc (installed here when missing).
# Usage: [FLUENT_BIT=...] [IDLE_SECS=120] [BUSY_SECS=60] [SAT_SECS=10] benchmarks/peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/collector
sim=target/release/simulator
for b in "$bin" "$sim"; do
  [ -x "$b" ] || { echo "build first: cargo build --release -p collector -p simulator" >&2; exit 1; }
done
if ! command -v collectd >/dev/null || ! command -v bc >/dev/null || ! command -v prometheus-node-exporter >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    collectd-core bc prometheus-node-exporter
fi
fluent_bit=${FLUENT_BIT:-}
idle_secs=${IDLE_SECS:-120}
busy_secs=${BUSY_SECS:-60}
sat_secs=${SAT_SECS:-10}

# shellcheck source=benchmarks/common.sh
. benchmarks/common.sh
mib() { printf '%.1f' "$(echo "$1 / 1024" | bc -l)"; }
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The sender. `busy FORMAT HOST:PORT CONNECTIONS PER_SECOND SECS`: every
# connection writes once a second PER_SECOND datapoints (a record with
# that many); `flood FORMAT HOST:PORT CONNECTIONS SECS`: each connection
# writes ~1 MiB buffers of records (10 a block, 30 datapoints each) as fast
# as the receiver takes them. FORMAT avro: an Avro object container stream
# (fastavro, schema/avro/metrics.avsc, null codec); json: one JSON object
# a line per datapoint, its record's topic and tags beside its name, time
# and value. Prints the datapoints written, the seconds it wrote for, and
# the bytes.
cat > "$work/send.py" <<'EOF'
import io, json, random, socket, sys, threading, time
import fastavro
from fastavro.write import Writer

mode, fmt, addr = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = addr.rsplit(":", 1)
connections = int(sys.argv[4])
schema = fastavro.parse_schema(json.load(open("schema/avro/metrics.avsc")))

def record(c, i, n, now):
    return {
        "topic": "bench",
        "tags": [
            {"key": "framework_id", "value": "5349f49b-68b3-4638-aab2-fc4ec845f993-0001"},
            {"key": "executor_id", "value": f"bench-executor-{c}"},
            {"key": "container_id", "value": f"c7b0ab1f-5e4a-4a0e-9f8d-{i:012x}"},
        ],
        "datapoints": [
            {"name": f"usage.cpus_user_time_secs_{j}", "time_ms": now, "value": random.random() * 1000}
            for j in range(n)
        ],
    }

class Encoder:
    """One connection's stream: the Avro header first, then blocks."""
    def __init__(self):
        self.buf = io.BytesIO()
        self.writer = Writer(self.buf, schema, codec="null") if fmt == "avro" else None
    def encode(self, records):
        if fmt == "json":
            return "".join(
                json.dumps({"topic": r["topic"], **{t["key"]: t["value"] for t in r["tags"]}, **d},
                           separators=(",", ":")) + "\n"
                for r in records for d in r["datapoints"]
            ).encode()
        for r in records:
            self.writer.write(r)
        self.writer.flush()
        out = self.buf.getvalue()
        self.buf.seek(0)
        self.buf.truncate()
        return out

sent = [0] * connections
sent_bytes = [0] * connections
if mode == "busy":
    per_second, secs = int(sys.argv[5]), float(sys.argv[6])
    socks = [socket.create_connection((host, int(port))) for _ in range(connections)]
    encoders = [Encoder() for _ in range(connections)]
    start = time.monotonic()
    began = start
    # Connection c writes at start + c/connections + k seconds.
    for k in range(int(secs)):
        for c in range(connections):
            due = start + k + c / connections
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = int(time.time() * 1000)
            data = encoders[c].encode([record(c, 0, per_second, now)])
            socks[c].sendall(data)
            sent[c] += per_second
            sent_bytes[c] += len(data)
    for s in socks:
        s.close()
else:
    secs = float(sys.argv[5])
    window = {}
    def go():
        # Once every connection is open and its buffer built.
        window["began"] = time.monotonic()
        window["end"] = window["began"] + secs
    ready = threading.Barrier(connections, action=go)
    failed = []
    def flood(c):
        try:
            encoder = Encoder()
            s = socket.create_connection((host, int(port)))
            now = int(time.time() * 1000)
            first = encoder.encode([])  # the header alone (avro), nothing (json)
            chunk, points = b"", 0
            while len(chunk) < 1 << 20:
                chunk += encoder.encode([record(c, i, 30, now) for i in range(10)])
                points += 300
            s.sendall(first)
            ready.wait(timeout=120)
            while time.monotonic() < window["end"]:
                s.sendall(chunk)
                sent[c] += points
                sent_bytes[c] += len(chunk)
            s.close()
        except Exception as e:
            failed.append(repr(e))
            ready.abort()
    threads = [threading.Thread(target=flood, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.exit(f"the sender failed: {failed[0]}")
    began = window["began"]
print(sum(sent), time.monotonic() - began, sum(sent_bytes))
EOF

"$sim" kafka --brokers 3 > "$work/kafka.log" 2>&1 &
for _ in $(seq 100); do
  boot=$(sed -n 's/^bootstrap servers: \([^ ]*\).*/\1/p' "$work/kafka.log")
  [ -n "$boot" ] && break
  sleep 0.1
done
[ -n "$boot" ] || { echo "no bootstrap servers from simulator kafka" >&2; cat "$work/kafka.log" >&2; exit 1; }

common=(--listen-endpoint=127.0.0.1:0 --api-listen=127.0.0.1:0 --partner-listen=127.0.0.1:0
  --agent-polling=false --node-metrics=false)
start_collector() { # name args...: starts a collector logging to $work/NAME.log; sets $pid
  local name=$1
  shift
  "${exe:-$bin}" "${common[@]}" "$@" 2> "$work/$name.log" &
  pid=$!
  port_of "$work/$name.log" input > /dev/null
}
start_fluent_bit() { # name port output-args...: sets $pid
  local name=$1 port=$2
  shift 2
  "$fluent_bit" -q -i tcp -p listen=127.0.0.1 -p "port=$port" -p format=json -p tag=bench "$@" \
    > "$work/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port)).close()" 2>/dev/null && return
    sleep 0.1
  done
  echo "Fluent Bit did not listen on $port" >&2; cat "$work/$name.log" >&2; exit 1
}
fb_kafka=(-o kafka -p match=bench -p "brokers=$boot" -p topics=bench)

echo "== 1. idle, side by side for $idle_secs s (Kafka: $boot)"
declare -A pids
start_collector idle-defaults "--kafka-brokers=$boot"
pids[collector]=$pid
# Its own copy of the binary, written back to disk: the kernel pages out
# neither what two processes map nor what is not yet written (BENCHMARKS.md
# section 1).
cp "$bin" "$work/collector"
sync "$work/collector"
exe=$work/collector start_collector idle-served "--kafka-brokers=$boot" --prometheus-listen=127.0.0.1:0 \
  --metrics-api-listen=127.0.0.1:0 --statsd-listen=127.0.0.1:0 --statsd-control-listen=127.0.0.1:0
pids[collector-served]=$pid
names=(collector collector-served)
if [ -n "$fluent_bit" ]; then
  start_fluent_bit idle-fb "$(free_port)" "${fb_kafka[@]}"
  pids[fluent-bit]=$pid
  names+=(fluent-bit)
fi
mkdir -p "$work/csv"
{ collectd_head "$work"; cat <<EOF
LoadPlugin cpu
LoadPlugin memory
LoadPlugin load
LoadPlugin interface
LoadPlugin df
LoadPlugin statsd
LoadPlugin csv
<Plugin statsd>
  Host "127.0.0.1"
  Port "$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
</Plugin>
<Plugin csv>
  DataDir "$work/csv"
</Plugin>
EOF
} > "$work/collectd.conf"
collectd -f -C "$work/collectd.conf" > "$work/collectd.log" 2>&1 &
pids[collectd]=$!
prometheus-node-exporter --web.listen-address=127.0.0.1:0 > "$work/ne.log" 2>&1 &
pids[node-exporter]=$!
names+=(collectd node-exporter)
# The collector pages its start's code out after 10 s (BENCHMARKS.md
# section 1): the window starts after that.
sleep 15
declare -A before
for n in "${names[@]}"; do before[$n]=$(cpu_ms "${pids[$n]}"); done
sleep "$idle_secs"
printf '%-18s %12s %10s\n' "" "idle CPU" "idle RSS"
for n in "${names[@]}"; do
  printf '%-18s %10.3f %% %6s MiB\n' "$n" \
    "$(echo "($(cpu_ms "${pids[$n]}") - ${before[$n]}) / 10 / $idle_secs" | bc -l)" \
    "$(mib "$(rss_kib "${pids[$n]}")")"
done
for n in "${names[@]}"; do kill "${pids[$n]}" 2>/dev/null || true; done
for n in "${names[@]}"; do wait "${pids[$n]}" 2>/dev/null || true; done

# Runs the sender against a receiver, sampling its RSS each second (so the
# highest is a lower bound). Writes to $work/load: datapoints sent, the
# receiver's CPU in percent of a core over the seconds the sender wrote
# (its CPU counted until 2 s after, for what the sockets and batches still
# held), highest RSS KiB, those seconds, MiB/s written.
load() { # pid sender-args...
  local pid=$1 cpu0 cpu1 sender highest=0 rss sent secs bytes
  shift
  cpu0=$(cpu_ms "$pid")
  python3 "$work/send.py" "$@" > "$work/sent" &
  sender=$!
  while kill -0 "$sender" 2>/dev/null; do
    rss=$(rss_kib "$pid") || { echo "the receiver died under load" >&2; exit 1; }
    [ "$rss" -gt "$highest" ] && highest=$rss
    sleep 1
  done
  wait "$sender" || { echo "the sender failed" >&2; exit 1; }
  sleep 2
  cpu1=$(cpu_ms "$pid") || { echo "the receiver died under load" >&2; exit 1; }
  read -r sent secs bytes < "$work/sent"
  echo "$sent $(echo "($cpu1 - $cpu0) / 10 / $secs" | bc -l) $highest $secs $(echo "$bytes / $secs / 1048576" | bc -l)" > "$work/load"
}
received() { # api: the collector's datapoints received
  curl -s "http://$1/metrics" | awk '/^collector_received_datapoints_total/ { n += $2 } END { print n }'
}

stop() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }

echo "== 2. busy: 200 connections at 50 datapoints/s each, to Kafka, $busy_secs s each"
printf '%-12s %12s %10s %12s %10s\n' "" "datapoints" "CPU" "highest RSS" "input"
start_collector busy "--kafka-brokers=$boot"
api=$(port_of "$work/busy.log" api)
sleep 12
load "$pid" busy avro "$(port_of "$work/busy.log" input)" 200 50 "$busy_secs"
read -r sent cpu hwm _ mibs < "$work/load"
printf '%-12s %12s %8.3f %% %8s MiB %6.2f MiB/s (received %s)\n' collector "$sent" "$cpu" "$(mib "$hwm")" "$mibs" "$(received "$api")"
stop
if [ -n "$fluent_bit" ]; then
  port=$(free_port)
  start_fluent_bit busy-fb "$port" "${fb_kafka[@]}"
  sleep 12
  load "$pid" busy json "127.0.0.1:$port" 200 50 "$busy_secs"
  read -r sent cpu hwm _ mibs < "$work/load"
  printf '%-12s %12s %8.3f %% %8s MiB %6.2f MiB/s\n' fluent-bit "$sent" "$cpu" "$(mib "$hwm")" "$mibs"
  stop
fi

# Each receiver settles first: the collector pages its code out 10 s after
# its start.
echo "== 3. saturation, null output: 4 connections for $sat_secs s"
printf '%-12s %14s %10s %12s %10s\n' "" "datapoints/s" "CPU" "highest RSS" "input"
start_collector sat --kafka=false --input-limit-amount-kbytes=0 --global-limit-amount-kbytes=0
api=$(port_of "$work/sat.log" api)
sleep 12
load "$pid" flood avro "$(port_of "$work/sat.log" input)" 4 "$sat_secs"
read -r sent cpu hwm secs mibs < "$work/load"
printf '%-12s %12.2f M %8.1f %% %8s MiB %6.0f MiB/s (received %s of %s)\n' collector \
  "$(echo "$sent / $secs / 1000000" | bc -l)" "$cpu" "$(mib "$hwm")" "$mibs" "$(received "$api")" "$sent"
stop
if [ -n "$fluent_bit" ]; then
  port=$(free_port)
  start_fluent_bit sat-fb "$port" -o null -p match=bench
  sleep 12
  load "$pid" flood json "127.0.0.1:$port" 4 "$sat_secs"
  read -r sent cpu hwm secs mibs < "$work/load"
  printf '%-12s %12.2f M %8.1f %% %8s MiB %6.0f MiB/s (what its sockets took; not counted by it)\n' fluent-bit \
    "$(echo "$sent / $secs / 1000000" | bc -l)" "$cpu" "$(mib "$hwm")" "$mibs"
  stop
fi
