"""The routes of the operator API (``docs/operator-api.md``): each one checks who asks, calls one
read (:mod:`~sipis.operator_api.queries`, :mod:`~sipis.operator_api.pages`) or one operation
(:class:`~sipis.operations.Operations`, which checks the role again and audits), and encodes the
contract's document it gets back."""

from __future__ import annotations

import re

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from contract.codec import to_json
from contract.documents import ActionResult, AlarmList, PushResult, Whoami
from sipis.instance import Instance
from sipis.operations import Forbidden, Operator
from sipis.operator_api import health as peer_health
from sipis.operator_api import queries
from sipis.operator_api.auth import LISTENER_KEY
from sipis.operator_api.context import OperatorContext
from sipis.operator_api.errors import OperatorApiError, install_error_handlers
from sipis.operator_api.index import SORTS
from sipis.operator_api.pages import instance_list
from sipis.operator_api.responses import NDJSON, json_response
from sipis.operator_api.stream import event_stream


def create_operator_app(ctx: OperatorContext) -> FastAPI:
    app = FastAPI(title="SIPIS operator API", version="1", docs_url=None, redoc_url=None,
                  description="See docs/operator-api.md")
    install_error_handlers(app)
    ops = ctx.operations

    async def operator(request: Request) -> Operator:
        return ctx.auth.identify(request.headers.get("authorization"), request.headers.get("x-operator"),
                                 str(request.scope.get(LISTENER_KEY, "tcp")))

    async def viewer(who: Operator = Depends(operator)) -> Operator:
        if not who.may("viewer"):
            raise Forbidden(f"{who.name} has no role that may read")
        return who

    def instance_or_404(selector: str) -> Instance:
        instance = ctx.service.get(selector)
        if instance is None:
            raise OperatorApiError(404, f"no instance {selector}")
        return instance

    # ------------------------------------------------------------------ reads

    @app.get("/v1/whoami")
    async def whoami(who: Operator = Depends(operator)) -> Response:
        return json_response(Whoami(who.name, who.role))

    @app.get("/v1/summary")
    async def summary(_: Operator = Depends(viewer)) -> Response:
        return json_response(await queries.summary(ctx))

    @app.get("/v1/health/targets")
    async def health_targets(_: Operator = Depends(viewer)) -> Response:
        return json_response(peer_health.health_targets(ctx.targets, ctx.service.instances.values()))

    @app.get("/v1/alarms")
    async def alarms(_: Operator = Depends(viewer)) -> Response:
        return json_response(AlarmList(*ops.alarms.records()))

    @app.get("/v1/nodes")
    async def nodes(_: Operator = Depends(viewer)) -> Response:
        return json_response(await queries.nodes(ctx))

    @app.get("/v1/instances")
    async def instances(
        request: Request,
        _: Operator = Depends(viewer),
        offset: int = Query(0, ge=0),
        limit: int = Query(200, ge=0, le=1_000_000),
        q: str = Query("", max_length=200),
        state: str = Query("", pattern="^(|active|inactive|proxied|off)$"),
        sort: str = Query("aor"),
        desc: bool = Query(False),
    ) -> Response:
        if sort not in SORTS:
            raise OperatorApiError(422, f"sort: one of {', '.join(SORTS)}")
        if ctx.cluster is not None:
            await ctx.cluster.refresh_owners()
        return instance_list(ctx.index, ndjson=NDJSON in request.headers.get("accept", ""), q=q, state=state,
                             sort=sort, desc=desc, offset=offset, limit=limit)

    @app.get("/v1/instances/{selector}")
    async def instance_detail(selector: str, _: Operator = Depends(viewer)) -> Response:
        return json_response(await queries.instance_detail(ctx, instance_or_404(selector)))

    @app.get("/v1/calls")
    async def calls(_: Operator = Depends(viewer)) -> Response:
        return json_response(queries.calls(ctx))

    @app.get("/v1/calls/{call_id:path}/trace.txt", response_class=PlainTextResponse)
    async def call_trace_text(call_id: str, _: Operator = Depends(viewer)) -> Response:
        text = ctx.trace.text_ladder(call_id, to_json(await queries.call_pushes(ctx, call_id)))
        return PlainTextResponse(text, headers={
            "Content-Disposition": f'attachment; filename="{_file_name(call_id)}.txt"'})

    @app.get("/v1/calls/{call_id:path}/trace.pcap")
    async def call_trace_pcap(call_id: str, _: Operator = Depends(viewer)) -> Response:
        return Response(ctx.trace.pcap(call_id), media_type="application/vnd.tcpdump.pcap", headers={
            "Content-Disposition": f'attachment; filename="{_file_name(call_id)}.pcap"'})

    @app.get("/v1/calls/{call_id:path}/trace")
    async def call_trace(call_id: str, _: Operator = Depends(viewer)) -> Response:
        return json_response(await queries.call_trace(ctx, call_id))

    @app.get("/v1/pushes")
    async def pushes(_: Operator = Depends(viewer), limit: int = Query(200, ge=1, le=10_000),
                     selector: str = Query("", max_length=200)) -> Response:
        return json_response(await queries.recent_pushes(ctx, limit, selector or None))

    @app.get("/v1/audit")
    async def audit(_: Operator = Depends(viewer), limit: int = Query(200, ge=1, le=10_000)) -> Response:
        return json_response(await queries.audit(ctx, limit))

    @app.get("/v1/events")
    async def events(_: Operator = Depends(viewer), since: int | None = Query(None, ge=0)) -> Response:
        return StreamingResponse(event_stream(ctx, since), media_type=NDJSON,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ actions

    def action_answer(instance: Instance) -> Response:
        return json_response(ActionResult(instance.view(), ctx.index.instance_row(instance)))

    @app.post("/v1/instances/{selector}/actions/take-over")
    async def take_over(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.take_over(selector, who))

    @app.post("/v1/instances/{selector}/actions/hand-back")
    async def hand_back(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.hand_back(selector, who))

    @app.post("/v1/instances/{selector}/actions/re-register")
    async def re_register(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.re_register(selector, who))

    @app.post("/v1/instances/{selector}/actions/disable")
    async def disable(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.disable(selector, who))

    @app.post("/v1/instances/{selector}/actions/test-push")
    async def test_push(selector: str, who: Operator = Depends(operator)) -> Response:
        return json_response(PushResult((await ops.test_push(selector, who)).record()))

    @app.post("/v1/alarms/{alarm_id}/acknowledge")
    async def acknowledge_alarm(alarm_id: str, who: Operator = Depends(operator)) -> Response:
        return json_response(ops.acknowledge_alarm(alarm_id, who))

    @app.post("/v1/nodes/{name}/drain")
    async def drain(name: str, who: Operator = Depends(operator)) -> Response:
        await ops.drain_node(name, who)
        return json_response(await queries.nodes(ctx))

    @app.post("/v1/pushes/{push_id}/replay")
    async def replay(push_id: str, who: Operator = Depends(operator)) -> Response:
        return json_response(PushResult((await ops.replay_push(push_id, who)).record()))

    return app


def _file_name(call_id: str) -> str:
    return "call-" + (re.sub(r"[^A-Za-z0-9._-]", "_", call_id)[:80] or "unknown")
