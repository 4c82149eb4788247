"""Does a sequence's last sampled token end it? Token-level stop conditions only.

Stop *strings* need text, which the scheduler never sees: the layer that detokenizes
checks them and reports a hit with ``Scheduler.finish_request(id, stop_reason=the_string)``.

Order: below ``min_tokens`` outputs nothing but a length limit stops a sequence; then EOS
(unless ``ignore_eos``) and ``stop_token_ids`` (``"stop"``, ``stop_reason`` = the token id,
None for EOS) take precedence over ``max_tokens`` and ``max_model_len`` (``"length"``).
"""

from __future__ import annotations

from ligerjax.engine.request import Request, RequestStatus

StopDecision = tuple[RequestStatus, int | None]


def check_stop(request: Request, max_model_len: int) -> StopDecision | None:
    """The status and stop reason if ``request``'s last output token ends it, else None."""
    sp = request.sampling_params
    last = request.output_token_ids[-1]
    if request.num_output_tokens >= sp.min_tokens:
        if not sp.ignore_eos and request.eos_token_id is not None and last == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED, None
        if last in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, last
    if sp.max_tokens is not None and request.num_output_tokens >= sp.max_tokens:
        return RequestStatus.FINISHED_LENGTH, None
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None
