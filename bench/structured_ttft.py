#!/usr/bin/env python3
"""Time to first token of a JSON-schema request whose schema is new (its grammar compiles before the
request can start) next to one whose schema is cached, against a running server. Each new schema gets a
unique property name, so no cache entry can serve it. Prints one JSON object with the medians.

usage: structured_ttft.py BASE_URL [N]
"""
import json
import statistics
import sys
import time
import uuid

import httpx


def schema(extra_field):
    props = {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
             extra_field: {"type": "boolean"}}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def ttft(client, url, sch):
    body = {"prompt": "Describe a person as JSON:", "max_tokens": 8, "temperature": 0, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": sch}}}
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    return time.perf_counter() - t0
    return float("nan")


def main():
    url = sys.argv[1].rstrip("/")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    with httpx.Client(timeout=120) as c:
        ttft(c, url, schema("warmup"))  # first request of the server: not counted
        new = [ttft(c, url, schema("f_" + uuid.uuid4().hex[:12])) for _ in range(n)]
        cached_schema = schema("cached_field")
        ttft(c, url, cached_schema)
        cached = [ttft(c, url, cached_schema) for _ in range(n)]
    print(json.dumps({"new_schema_ttft_ms_median": 1e3 * statistics.median(new),
                      "cached_schema_ttft_ms_median": 1e3 * statistics.median(cached),
                      "new_ms": [round(1e3 * x, 1) for x in new], "cached_ms": [round(1e3 * x, 1) for x in cached]}))


if __name__ == "__main__":
    main()
