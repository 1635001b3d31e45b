"""Encodes Trading Grid events with fastavro, an Avro implementation gridtalk does not share code
with, the way a producer outside gridtalk would: Avro single-object encoding (C3 01, then
fastavro's own CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form) or the Confluent
framing (magic byte 0, a 4-byte schema id).

    fastavro_encode.py SCHEMA.avsc REQUESTS.json   -> one line per request: hex bytes
    fastavro_encode.py --fingerprint SCHEMA.avsc   -> "<canonical form>\t<fingerprint hex>"

REQUESTS.json is a list of {"format": "single" | "confluent", "schema_id": N, "event": {...}},
each event as gridtalk's JSON view writes it (the payload union as {"Branch": value}, other
unions as plain values, decimals as strings).
"""

import decimal
import io
import json
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def full_name(name, namespace):
    if "." in name or not namespace:
        return name
    return namespace + "." + name


class Converter:
    """Avro JSON encoding -> the Python values fastavro writes, walking the schema."""

    def __init__(self, schema):
        self.names = {}
        self.register(schema, None)

    def register(self, schema, namespace):
        if isinstance(schema, list):
            for branch in schema:
                self.register(branch, namespace)
        elif isinstance(schema, dict):
            kind = schema.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                name = full_name(schema["name"], schema.get("namespace", namespace))
                self.names[name] = schema
                inner = name.rsplit(".", 1)[0] if "." in name else None
                for field in schema.get("fields", []):
                    self.register(field["type"], inner)
                schema["_full_name"] = name
                schema["_namespace"] = inner
            elif kind == "array":
                self.register(schema["items"], namespace)
            elif kind == "map":
                self.register(schema["values"], namespace)
            elif isinstance(kind, (dict, list)):
                self.register(kind, namespace)

    def resolve(self, schema, namespace):
        if isinstance(schema, str) and schema not in PRIMITIVES:
            return self.names[full_name(schema, namespace)]
        return schema

    def branch_name(self, schema, namespace):
        schema = self.resolve(schema, namespace)
        if isinstance(schema, str):
            return schema
        kind = schema["type"]
        if kind in ("record", "error", "enum", "fixed"):
            return schema["_full_name"]
        return kind

    def fits(self, schema, value, namespace):
        schema = self.resolve(schema, namespace)
        kind = schema if isinstance(schema, str) else schema["type"]
        if kind == "null":
            return value is None
        if isinstance(value, bool):
            return kind == "boolean"
        if isinstance(value, int):
            return kind in ("int", "long", "float", "double")
        if isinstance(value, float):
            return kind in ("float", "double")
        if isinstance(value, str):
            return kind in ("string", "enum", "bytes", "fixed")
        if isinstance(value, list):
            return kind == "array"
        if isinstance(value, dict):
            return kind in ("record", "error", "map")
        return False

    def convert(self, schema, value, namespace):
        schema = self.resolve(schema, namespace)
        if isinstance(schema, list):
            if value is None:
                return None
            if not (isinstance(value, dict) and len(value) == 1):
                # A plain value: the first branch of its kind (gridtalk's JSON view of an event
                # writes unions this way except where a branch name is needed).
                for branch in schema:
                    if self.fits(branch, value, namespace):
                        return self.convert(branch, value, namespace)
                raise ValueError("no branch of %r fits %r" % (schema, value))
            (label, inner), = value.items()
            for branch in schema:
                name = self.branch_name(branch, namespace)
                if name == label or name.rsplit(".", 1)[-1] == label:
                    converted = self.convert(branch, inner, namespace)
                    resolved = self.resolve(branch, namespace)
                    if isinstance(resolved, dict) and resolved["type"] == "record":
                        # fastavro's hint for which record branch of a union to write.
                        converted["-type"] = name
                    return converted
            raise ValueError("no branch %r in %r" % (label, schema))
        if isinstance(schema, str):
            return value
        kind = schema["type"]
        if kind in ("record", "error"):
            inner = schema["_namespace"]
            return {
                f["name"]: self.convert(f["type"], value[f["name"]], inner)
                for f in schema["fields"]
                if f["name"] in value
            }
        if kind == "array":
            return [self.convert(schema["items"], v, namespace) for v in value]
        if kind == "map":
            return {k: self.convert(schema["values"], v, namespace) for k, v in value.items()}
        if schema.get("logicalType") == "decimal":
            return decimal.Decimal(value).quantize(decimal.Decimal(1).scaleb(-schema.get("scale", 0)))
        if isinstance(kind, (dict, list)):
            return self.convert(kind, value, namespace)
        return value


def main():
    if sys.argv[1] == "--fingerprint":
        with open(sys.argv[2]) as f:
            parsed = fastavro.parse_schema(json.load(f))
        form = to_parsing_canonical_form(parsed)
        print(form + "\t" + fingerprint(form, "CRC-64-AVRO"))
        return
    with open(sys.argv[1]) as f:
        raw = json.load(f)
    with open(sys.argv[1]) as f:
        parsed = fastavro.parse_schema(json.load(f))
    header = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    converter = Converter(raw)
    with open(sys.argv[2]) as f:
        requests = json.load(f)
    for request in requests:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, parsed, converter.convert(raw, request["event"], None))
        if request["format"] == "single":
            framed = b"\xc3\x01" + header + body.getvalue()
        else:
            framed = b"\x00" + request["schema_id"].to_bytes(4, "big") + body.getvalue()
        print(framed.hex())


if __name__ == "__main__":
    main()
