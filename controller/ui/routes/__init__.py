"""The dashboard's routes: thin, like the REST API's — parse, authorise (the app-wide `principal`
dependency and `controller.access`), call the same functions the REST routes call, render.

Reads use the REST route functions where one exists (so a page shows what the API returns) and
the queries of `controller.ui` where a page needs more (the fleet, the audit search). Every
action calls the REST route function of its twin in `access.UI_SAME_AS` — the same service
functions, the same checks, the same audit entry — and is behind a confirmation page when it
changes what sites run or who may do what.
"""

from __future__ import annotations

from fastapi import APIRouter

from controller.ui.routes import audit, fleet, jobs, people, releases, rollouts, signin

router = APIRouter(include_in_schema=False)
for module in (signin, fleet, releases, rollouts, jobs, audit, people):
    router.include_router(module.router)

__all__ = ["router"]
