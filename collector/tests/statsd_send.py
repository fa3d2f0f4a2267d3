#!/usr/bin/env python3
"""Sends statsd to HOST PORT as a task would, with clients we did not
write: PyPI's `statsd` (Etsy-style lines, some batched several to a packet
by its pipeline) and `datadog`'s DogStatsd (DogStatsD tags). Then a few
raw packets: several values on one line, sample rates, and malformed lines
among good ones.

Prints one JSON object: what each series must total, by its Prometheus
name and labels, and how many lines were sent and how many were malformed.

With --env, the address is the task's STATSD_UDP_HOST and
STATSD_UDP_PORT, as DC/OS 1.12+'s module gives them. EXPECT_LABELS (a JSON
object) names labels every series has besides its own (a container's id).

Usage: statsd_send.py HOST PORT ROUNDS
       statsd_send.py --env ROUNDS
"""
import json
import os
import socket
import sys

import statsd
from datadog import DogStatsd

if sys.argv[1] == "--env":
    host, port = os.environ["STATSD_UDP_HOST"], int(os.environ["STATSD_UDP_PORT"])
    rounds = int(sys.argv[2])
else:
    host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
extra = json.loads(os.environ.get("EXPECT_LABELS", "{}"))


expected = {}
expected_kafka = []


def expect(name, value, only_in_prometheus=(), **labels):
    """A series' total: by its Prometheus name and labels as the collector's
    endpoint spells them, and as its datapoint's name and tags in Kafka.
    `only_in_prometheus` names labels a scrape gives the series (empty, as
    its family's other series have them) that its record has not."""
    tags = {k: v for k, v in labels.items() if k not in only_in_prometheus}
    expected_kafka.append({"name": name, "tags": tags, "value": value})
    labels.update(extra)
    series = name.replace(".", "_") + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    expected[series] = value


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
expect("app.requests", 3 * n, metric_type="counter")
expect("app.temperature", 20 + n - 1, metric_type="gauge")
expect("app.latency.count", n, metric_type="timing")
expect("app.latency.sum", sum(10 * (i + 1) for i in range(n)), metric_type="timing")
expect("app.latency.upper", 10 * n, metric_type="timing")
expect("app.latency.lower", 10, metric_type="timing")
expect("app.users", min(n, 7), metric_type="set")
expect("app.batched", 2 * n, metric_type="counter")
expect("app.level", n, metric_type="gauge")
expect("dd.hits", 2 * n, env="prod", metric_type="counter", shard="")
expect("dd.hits", n, only_in_prometheus=("shard",), env="dev", metric_type="counter", shard="")
expect("dd.size.count", n, env="prod", metric_type="histogram")
expect("dd.size.sum", sum(4 * (i + 1) for i in range(n)), env="prod", metric_type="histogram")
expect("raw.multi", 7, metric_type="counter")
expect("raw.rated", 20, metric_type="counter")
expect("raw.good", 2, metric_type="counter")
print(json.dumps({"expected": expected, "expected_kafka": expected_kafka, "lines": lines, "malformed": malformed}))
