# Shared by the benchmark scripts (sourced): a process's CPU and memory
# from /proc, and the address it logged.
ticks=$(getconf CLK_TCK)
# CPU time, user and system, in ms.
cpu_ms() { awk -v t="$ticks" '{ print ($14 + $15) * 1000 / t }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
port_of() { # the address a process logged as KEY=ADDR ("Listening on", "Collector started")
  local log=$1 key=$2 addr
  for _ in $(seq 100); do
    addr=$(grep -o "$key=\"\?[0-9.:]*" "$log" | head -1 | sed 's/.*=\"\?//') || true
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "no $key in $log" >&2; exit 1
}
# The head of a collectd configuration: its files under DIR, no name
# lookups, a 10 s interval, only the plugins loaded by name after it.
collectd_head() { # DIR
  cat <<HEAD
Hostname "bench"
FQDNLookup false
BaseDir "$1"
PIDFile "$1/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
Interval 10
AutoLoadPlugin false
HEAD
}
