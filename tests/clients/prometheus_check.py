"""Parses a Prometheus exposition (stdin) with the official parser and prints a JSON summary.

Used by agent/tests/gateway.rs: the exposition must parse, and its counters must match what was sent.
Prints {"families": {name: type}, "requests": {status: total}, "duration_count": n, "in_flight_nodes": n}.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    text = sys.stdin.read()
    families = {}
    requests = {}
    duration_count = 0
    in_flight_nodes = 0
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            if sample.name == "sollol_requests_total":
                status = sample.labels["status"]
                requests[status] = requests.get(status, 0) + sample.value
            elif sample.name == "sollol_request_duration_seconds_count":
                duration_count += sample.value
            elif sample.name == "sollol_requests_in_flight":
                in_flight_nodes += 1
    print(
        json.dumps(
            {
                "families": families,
                "requests": requests,
                "duration_count": duration_count,
                "in_flight_nodes": in_flight_nodes,
            }
        )
    )


if __name__ == "__main__":
    main()
