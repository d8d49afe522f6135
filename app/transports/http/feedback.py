"""``POST /v1/feedback``: a reader's finding on a recorded prediction (README, "Readers' feedback").
Parses and shapes; the rule (one reading per prediction and reader) is ``app.engine.records.feedback``'s."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.core.decode import instance_uid_sha256
from app.core.errors import FeedbackOff
from app.engine.records.feedback import Finding, SavedFeedback, record_feedback
from app.engine.records.writer import RecordWriter
from app.transports.http import openapi_docs as docs
from app.transports.http.problems import request_id_of
from app.transports.http.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter()


def response_of(saved: SavedFeedback) -> FeedbackResponse:
    return FeedbackResponse(
        feedback_id=saved.feedback_id, outcome=saved.outcome, request_id=saved.request_id, item=saved.item,
        model={"name": saved.model_name, "version": saved.model_version},
        prediction={"label": saved.predicted_label, "tumour_detected": saved.predicted_tumour},
        reader_id=saved.reader_id, label=saved.finding.label, tumour_present=saved.finding.tumour_present,
        created_at=saved.created_at, updated_at=saved.updated_at)


@router.post("/v1/feedback", operation_id="postFeedback", summary="A reader's finding on a recorded prediction",
             response_model=FeedbackResponse, responses=docs.FEEDBACK_RESPONSES, openapi_extra=docs.KEY_SECURITY)
async def post_feedback(body: FeedbackRequest, request: Request) -> JSONResponse:
    records: RecordWriter | None = getattr(request.app.state, "records", None)
    if records is None:
        raise FeedbackOff("readers' feedback joins the prediction records, and they are off: set BTD_RECORDS=true")
    instance = instance_uid_sha256(body.sop_instance_uid) if body.sop_instance_uid is not None else None
    where = {"instance_sha256": instance} if instance is not None else {"request_id": body.request_id,
                                                                          "item": body.item}
    saved = await asyncio.to_thread(record_feedback, records, Finding(body.label, body.tumour_present),
                                    reader_id=body.reader_id, **where)
    # Who stored or changed a reading, and of which answer (an audit line; the pseudonym, no finding text).
    request.app.state.audit.write(
        "feedback", request_id=request_id_of(request), key=getattr(request.state, "api_key", None),
        client=request.client.host if request.client else None, route="/v1/feedback",
        prediction_request_id=saved.request_id, item=saved.item, feedback_id=saved.feedback_id,
        outcome=saved.outcome, reader_id=saved.reader_id, model={"name": saved.model_name,
                                                                  "version": saved.model_version})
    return JSONResponse(response_of(saved).model_dump(mode="json"), status_code=201 if saved.outcome == "created" else 200)
