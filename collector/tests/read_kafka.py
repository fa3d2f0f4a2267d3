"""Reads a Kafka topic with an independent client (confluent-kafka, which
carries its own librdkafka build) and decodes each message value as an
Avro OCF file with fastavro. Prints one JSON object: the codecs librdkafka's
fetch log reports for the topic's message sets, the number of messages,
and every datapoint's `time_ms`.

    python3 read_kafka.py BOOTSTRAP TOPIC MESSAGES TIMEOUT_SECS
"""

import io
import json
import logging
import re
import sys
import time

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

bootstrap, topic, want, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])


class Codecs(logging.Handler):
    """Collects the codec of each message set from librdkafka's fetch log:
    "Enqueue N message(s) ... on TOPIC [P] fetch queue (..., CODEC)"."""

    def __init__(self):
        super().__init__()
        self.codecs = set()

    def emit(self, record):
        line = record.getMessage()
        found = re.search(r"on " + re.escape(topic) + r" \[\d+\] fetch queue \(.*, (\w+)\)$", line)
        if found:
            self.codecs.add(found.group(1))


handler = Codecs()
logger = logging.getLogger("librdkafka")
logger.addHandler(handler)
logger.setLevel(logging.DEBUG)

consumer = Consumer(
    {
        "bootstrap.servers": bootstrap,
        "group.id": "independent-reader",
        "enable.auto.commit": False,
        "debug": "fetch",
    },
    logger=logger,
)
partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
messages, times = 0, []
deadline = time.monotonic() + timeout
while messages < want and time.monotonic() < deadline:
    message = consumer.poll(0.5)
    if message is None:
        continue
    if message.error():
        print("error:", message.error(), file=sys.stderr)
        continue
    messages += 1
    for record in fastavro.reader(io.BytesIO(message.value())):
        times.extend(d["time_ms"] for d in record["datapoints"])
# The log is delivered from poll(): one more round for the last lines.
consumer.poll(0.5)
consumer.close()
print(json.dumps({"codecs": sorted(handler.codecs), "messages": messages, "times": times}))
