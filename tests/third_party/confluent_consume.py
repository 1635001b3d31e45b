"""Reads topics as a Confluent-ecosystem consumer would: confluent-kafka's Consumer with the
schema-registry AvroDeserializer (fastavro underneath), against the registry at REGISTRY.

usage: confluent_consume.py BOOTSTRAP REGISTRY COUNT TOPIC [TOPIC ...]

Consumes every TOPIC from its start until COUNT records were read (or 60 s passed) and prints
one JSON line per record: topic, key, headers, the schema id of its framing and the value as
AvroDeserializer returns it, with union branches of records named (return_record_name) and
timestamps as milliseconds since the epoch.
A record the deserializer cannot read fails the script.
"""

import datetime
import json
import sys
import time
import uuid

from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def millis(value):
    """timestamp-millis values arrive as aware datetimes: back to milliseconds since the epoch."""
    if isinstance(value, datetime.datetime):
        return round(value.timestamp() * 1000)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def main():
    bootstrap, registry_url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    topics = sys.argv[4:]
    registry = SchemaRegistryClient({"url": registry_url})
    deserialize = AvroDeserializer(registry, return_record_name=True)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "confluent-consume-" + uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    read = 0
    deadline = time.monotonic() + 60
    try:
        while read < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                raise SystemExit(f"consumer error: {message.error()}")
            raw = message.value()
            if raw[0] != 0:
                raise SystemExit(
                    f"{message.topic()} offset {message.offset()}: not Confluent-framed (first byte {raw[0]:#04x})"
                )
            value = deserialize(
                raw, SerializationContext(message.topic(), MessageField.VALUE)
            )
            print(
                json.dumps(
                    {
                        "topic": message.topic(),
                        "key": (message.key() or b"").decode(),
                        "headers": {
                            k: (v or b"").decode() for k, v in (message.headers() or [])
                        },
                        "schema_id": int.from_bytes(raw[1:5], "big"),
                        "value": value,
                    },
                    default=millis,
                ),
                flush=True,
            )
            read += 1
    finally:
        consumer.close()
    if read < count:
        raise SystemExit(f"read {read} records of {count} within 60 s")


if __name__ == "__main__":
    main()
