#!/usr/bin/env python3
"""Validates v0 metrics API answers against dcos-metrics' swagger file
(fixtures/dcos/dcos-metrics-v0-HTTP_API.yml, a copy of the reference), with what its code
added to the swagger's definitions: a datapoint's `tags`, the dimensions
`task_name` and `task_id`, and string values ("NaN"). Fields the code did
not have are refused (additionalProperties: false), and the fields it
always wrote are required.

Usage: v0_swagger.py SWAGGER < answers.jsonl
Each input line: {"definition": "MetricsMessage" | "Containers" | "Ping",
"body": <the answer>}. Prints "ok N" or the first failure, exit 1.
"""
import json
import sys

import jsonschema
import yaml

swagger = yaml.safe_load(open(sys.argv[1]))
definitions = swagger["definitions"]
point = definitions["Datapoint"]
point["properties"]["tags"] = {"type": "object", "additionalProperties": {"type": "string"}}
point["properties"]["value"] = {"type": ["number", "string"]}
point["required"] = ["name", "value", "unit", "timestamp"]
point["additionalProperties"] = False
dims = definitions["Dimensions"]
dims["properties"]["task_name"] = {"type": "string"}
dims["properties"]["task_id"] = {"type": "string"}
dims["required"] = ["mesos_id", "hostname"]
dims["additionalProperties"] = False
definitions["MetricsMessage"]["required"] = ["datapoints", "dimensions"]
definitions["MetricsMessage"]["additionalProperties"] = False
definitions["Ping"]["required"] = ["ok", "timestamp"]

count = 0
for line in sys.stdin:
    answer = json.loads(line)
    schema = {"$ref": "#/definitions/" + answer["definition"], "definitions": definitions}
    try:
        jsonschema.validate(answer["body"], schema)
    except jsonschema.ValidationError as error:
        print(f"{answer['definition']}: {error.message} at {list(error.absolute_path)}")
        sys.exit(1)
    count += 1
print(f"ok {count}")
