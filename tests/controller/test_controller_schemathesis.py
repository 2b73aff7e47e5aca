"""Schemathesis against the live controller's OpenAPI: generated requests to every operation must
never cause a server error, and every response must match the documented schema and status codes.

Schemathesis' pytest plugin (lazy fixtures) does not work with this pytest, so the test drives
Hypothesis itself: one strategy per operation, its cases sent to the live server.
"""

from __future__ import annotations

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.controller_server import ControllerServer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 12


def test_generated_requests_never_break_the_controller_and_match_the_schema(controller: ControllerServer) -> None:
    schema = schemathesis.openapi.from_url(f"{controller.url}/openapi.json", verify=str(controller.pki.ca_cert))
    session = requests.Session()
    session.verify = str(controller.pki.ca_cert)
    session.headers["Authorization"] = f"Bearer {controller.admin_token}"
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=controller.url, session=session, checks=CHECKS, verify=str(controller.pki.ca_cert)
            )

        try:
            exercise()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
