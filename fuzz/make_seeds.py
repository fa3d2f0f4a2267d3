#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/seeds/TARGET/) from the
project's fixtures (fixtures/), so that every target starts from real input.

Run from the repository root:  python3 fuzz/make_seeds.py
Needs: pip install -r scripts/requirements-test.txt  (fastavro)

  ocf_stream            every fixtures/wire/*.avro file and the module's
                        header, each after one byte that picks the chunk size
  raw_scan              single records of fixtures/wire/current-sample-records.json,
                        encoded by fastavro.schemaless_writer
  writer_schema         each schema in schema/avro/, a zero byte, a few records
  agent_entries         fixtures/mesos/*containers*.json and the
                        /monitor/statistics example
  agent_state           fixtures/mesos/mesos-agent-state-response.json and
                        mesos-agent-state-with-tasks-testdata.json
  agent_snapshot        fixtures/mesos/mesos-agent-metrics-snapshot-response.json
  scheduler_connection  fixtures/kafka/*.json
  config_toml           small configuration files, as docs/configuration.md shows them
  config_patch          the patches the API tests send
  partner_line          the partner lines docs/http-api.md documents
  spool_scan            fixtures/spool/segment.seg's frames, whole and cut,
                        after the byte that says whether more follow
  spool_cursor          cursor slots (an empty one, one with bitmaps), whole
                        (first byte 0) and without their CRC (first byte 1)
  statsd_packet         packets of the statsd lines docs/statsd.md shows (every
                        type, rates, several values, DogStatsD and bucket tags),
                        and malformed ones
  statsd_registration   the bodies DC/OS 1.12's module sends and the state files
                        DC/OS's Telegraf wrote, and ones the registry refuses
  prometheus_render     fixtures/wire/current.expected.jsonl's datapoints as
                        `name|key=value|...|value` lines, and lines that meet
                        the rendering's rules (collisions, reserved names)
"""
import io
import json
import shutil
import struct
from pathlib import Path

import fastavro

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"


def put(target, name, data):
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def cursor_body(generation, watermark, last_read, chunks):
    """A cursor slot without its CRC (collector/src/spool/ledger.rs)."""
    out = b"MCCURSR2" + struct.pack("<QQQI", generation, watermark, last_read, len(chunks))
    for first, last, words in chunks:
        out += struct.pack("<QQI", first, last, len(words))
        out += b"".join(struct.pack("<Q", w) for w in words)
    return out


def concatenated_json(path):
    text = path.read_text()
    decoder = json.JSONDecoder()
    pos, out = 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)


def main():
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    wire = ROOT / "fixtures" / "wire"
    for i, path in enumerate(sorted(wire.glob("*.avro"))):
        put("ocf_stream", path.stem, bytes([i * 7 % 64]) + path.read_bytes())
    put("ocf_stream", "module-header", b"\x00" + (wire / "mesos-module-ocf-header.bin").read_bytes())

    schema = fastavro.parse_schema(json.loads((ROOT / "schema/avro/metrics.avsc").read_text()))
    records = concatenated_json(wire / "current-sample-records.json")
    encoded = []
    for i, record in enumerate(records):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, record)
        encoded.append(buf.getvalue())
        put("raw_scan", f"record-{i}", buf.getvalue())

    for name in ["metrics.avsc", "metrics-seed.avsc"]:
        text = (ROOT / "schema" / "avro" / name).read_text()
        put("writer_schema", name, text.encode() + b"\x00" + bytes([len(encoded)]) + b"".join(encoded))

    mesos = ROOT / "fixtures" / "mesos"
    for path in sorted(mesos.glob("*containers*.json")) + [mesos / "mesos-monitor-statistics-doc-example.json"]:
        put("agent_entries", path.stem, path.read_bytes())
    put("agent_state", "state", (mesos / "mesos-agent-state-response.json").read_bytes())
    put("agent_state", "state-with-tasks", (mesos / "mesos-agent-state-with-tasks-testdata.json").read_bytes())
    put("agent_snapshot", "snapshot", (mesos / "mesos-agent-metrics-snapshot-response.json").read_bytes())

    for path in sorted((ROOT / "fixtures" / "kafka").glob("*.json")):
        put("scheduler_connection", path.stem, path.read_bytes())

    put("config_toml", "small", 'kafka_topic_prefix = "file-"\nkafka_produce_count = 7\n')
    put("config_toml", "tags", 'kafka_brokers = ["b:9092"]\n[static_tags]\ndc = "eu"\n[librdkafka]\n"linger.ms" = "7"\n')
    put("config_toml", "policy", 'buffer_full_policy = "drop_oldest"\nshutdown_grace_secs = 5\n')

    for i, patch in enumerate([
        {"kafka_topic_prefix": "new-", "static_tags": {"dc": "eu"}},
        {"kafka_produce_count": 0},
        {"kafka_single_topic": "bad topic", "kafka_topic_prefix": "other-"},
        {"kafka_brokers": ["not a broker :::"]},
        {"listen_endpoint": "127.0.0.1:9"},
        {"static_tags": None, "log_level": "debug"},
    ]):
        put("config_patch", f"patch-{i}", json.dumps(patch))

    for i, line in enumerate(["topics=metrics-a,metrics-b", "topics=metrics-.*-prod", "", "topics=(", "hello"]):
        put("partner_line", f"line-{i}", line)

    frames = (ROOT / "fixtures" / "spool" / "segment.seg").read_bytes()[8:]
    put("spool_scan", "fixture-segment", b"\x00" + frames)
    put("spool_scan", "fixture-segment-cut", b"\x01" + frames[:300])
    for name, body in [
        ("empty", cursor_body(1, 0, 0, [])),
        ("bitmaps", cursor_body(7, 90, 180, [(100, 170, [0b1011, 1 << 6]), (200, 210, [1])])),
    ]:
        put("spool_cursor", name, b"\x00" + body + struct.pack("<I", crc32c(body)))
        put("spool_cursor", name + "-body", b"\x01" + body)

    lines = []
    for record in (ROOT / "fixtures" / "wire" / "current.expected.jsonl").read_text().splitlines():
        record = json.loads(record)
        tags = "".join(f"|{t['key']}={t['value']}" for t in record["tags"])
        for point in record["datapoints"]:
            value = str(point["value"]).lower().replace("infinity", "inf")
            lines.append(f"{point['name']}{tags}|{value}")
    put("prometheus_render", "fixture", b"\x07" + "\n".join(lines).encode())
    put("prometheus_render", "rules", b"\x00" + "\n".join([
        "cpus.user.time|container_id=c1|source=s|1.5",
        "cpus.user.time|container_id=c2|task_name=t|2.5",
        "mem|task.name=dotted|task_name=exact|1",
        "disk|a-b=dash|a.b=dot|nan",
        "123abc|__name__=x|inf",
        "a.b|-1",
        "a_b|2",
        'collector_x|k:1=v"\\|3',
    ]).encode())

    put("statsd_packet", "types", "\n".join([
        "hits:1|c", "hits:2|c:3|c|@0.5", "temp:20|g", "temp:+5|g", "temp:-1|g",
        "users:alice|s", "lat:12.5|ms|@0.25", "size:4|h",
        "page.views,region=eu:1|c|@0.5|#env:prod,shard|c:abc|T1656581400",
    ]).encode())
    put("statsd_packet", "malformed", b"a\n:1|c\na:1\na:1|x\na:x|g\na:+1|ms\n\xff:1|c\n  b:2|g \r\n")

    put("statsd_registration", "module", b'{"container_id":"3f1e6b0e-1c4b-4a47-9e1e-7c0e5c4f1f1a"}')
    put("statsd_registration", "state", b'{"container_id":"abc","statsd_host":"198.51.100.1","statsd_port":37211}')
    put("statsd_registration", "asked", b'{"container_id":"c","statsd_host":"127.0.0.1","statsd_port":8125}')
    put("statsd_registration", "path", b'{"container_id":"../../etc/passwd","statsd_host":"h","statsd_port":1}')
    put("statsd_registration", "port0", b'{"container_id":"c","statsd_host":"h","statsd_port":0}')


if __name__ == "__main__":
    main()
