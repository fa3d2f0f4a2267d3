#!/usr/bin/env python3
"""Reads a Kafka topic of statsd records, from the beginning to its end as
of the start, with clients we did not write (confluent-kafka, with its own
librdkafka build; fastavro decoding each message as an Avro OCF file), and
prints each series' latest value: one JSON list of
{"name", "tags", "value", "time_ms"}, a series being a datapoint's name
and its record's tags (values are cumulative, so a later flush repeats a
series with its new total).

    python3 read_statsd_kafka.py BOOTSTRAP TOPIC TIMEOUT_SECS
"""

import io
import json
import sys
import time

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

bootstrap, topic, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
consumer = Consumer(
    {"bootstrap.servers": bootstrap, "group.id": "independent-statsd-reader", "enable.auto.commit": False}
)
deadline = time.monotonic() + timeout
partitions = None
while partitions is None and time.monotonic() < deadline:
    topics = consumer.list_topics(topic, timeout=5).topics
    if topic in topics and topics[topic].partitions:
        partitions = topics[topic].partitions
    else:
        time.sleep(0.5)
if partitions is None:
    sys.exit(f"topic {topic} never appeared")
ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
latest = {}
read_to = {p: 0 for p in partitions}
while time.monotonic() < deadline and any(read_to[p] < ends[p] for p in partitions):
    message = consumer.poll(0.5)
    if message is None:
        continue
    if message.error():
        print("error:", message.error(), file=sys.stderr)
        continue
    read_to[message.partition()] = message.offset() + 1
    for record in fastavro.reader(io.BytesIO(message.value())):
        tags = {t["key"]: t["value"] for t in record["tags"]}
        for point in record["datapoints"]:
            key = (point["name"], json.dumps(tags, sort_keys=True))
            if key not in latest or latest[key]["time_ms"] <= point["time_ms"]:
                latest[key] = {"name": point["name"], "tags": tags, "value": point["value"], "time_ms": point["time_ms"]}
consumer.close()
print(json.dumps(list(latest.values())))
