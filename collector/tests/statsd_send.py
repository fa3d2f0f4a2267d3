#!/usr/bin/env python3
"""Sends statsd to HOST PORT as a task would, with clients we did not
write: PyPI's `statsd` (Etsy-style lines, some batched several to a packet
by its pipeline) and `datadog`'s DogStatsd (DogStatsD tags). Then a few
raw packets: several values on one line, sample rates, and malformed lines
among good ones.

Prints one JSON object: what each series must total, by its Prometheus
name and labels, and how many lines were sent and how many were malformed.

Usage: statsd_send.py HOST PORT ROUNDS
"""
import json
import socket
import sys

import statsd
from datadog import DogStatsd

host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = 0
malformed = 0

client = statsd.StatsClient(host, port, prefix="app")
for i in range(rounds):
    client.incr("requests", 3)
    client.gauge("temperature", 20 + i)
    client.timing("latency", 10 * (i + 1))
    client.set("users", f"user-{i % 7}")
    lines += 4
    # Batched: the pipeline sends several lines in one packet.
    with client.pipeline() as pipe:
        pipe.incr("batched")
        pipe.incr("batched", 2)
        pipe.decr("batched")
        pipe.gauge("level", 1, delta=True)
    lines += 4

dog = DogStatsd(host=host, port=port, disable_telemetry=True)
for i in range(rounds):
    dog.increment("dd.hits", 2, tags=["env:prod", "shard"])
    dog.increment("dd.hits", 1, tags=["env:dev"])
    dog.histogram("dd.size", 4 * (i + 1), tags=["env:prod"])
    lines += 3
dog.flush()
dog.close_socket()

raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
packets = [
    # Several values on one line, and a sample rate on a counter (10 / 0.5).
    b"raw.multi:1|c:2|c:4|c\nraw.rated:10|c|@0.5",
    # Malformed lines among good ones: the good ones count.
    b"raw.good:1|c\nnot a line\nraw.bad:x|g\nraw.good:1|c\n\xff\xfe:1|c",
]
for packet in packets:
    raw.sendto(packet, (host, port))
lines += 2 + 2
malformed += 3
raw.close()

n = rounds
expected = {
    # name{labels} as the collector's Prometheus endpoint spells them.
    'app_requests{metric_type="counter"}': 3 * n,
    'app_temperature{metric_type="gauge"}': 20 + n - 1,
    'app_latency_count{metric_type="timing"}': n,
    'app_latency_sum{metric_type="timing"}': sum(10 * (i + 1) for i in range(n)),
    'app_latency_upper{metric_type="timing"}': 10 * n,
    'app_latency_lower{metric_type="timing"}': 10,
    'app_users{metric_type="set"}': min(n, 7),
    'app_batched{metric_type="counter"}': 2 * n,
    'app_level{metric_type="gauge"}': n,
    'dd_hits{env="prod",metric_type="counter",shard=""}': 2 * n,
    'dd_hits{env="dev",metric_type="counter",shard=""}': n,
    'dd_size_count{env="prod",metric_type="histogram"}': n,
    'dd_size_sum{env="prod",metric_type="histogram"}': sum(4 * (i + 1) for i in range(n)),
    'raw_multi{metric_type="counter"}': 7,
    'raw_rated{metric_type="counter"}': 20,
    'raw_good{metric_type="counter"}': 2,
}
print(json.dumps({"expected": expected, "lines": lines, "malformed": malformed}))
