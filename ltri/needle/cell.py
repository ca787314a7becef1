"""One cell of the grid: a new Session for the method reads the context and answers the probe's question."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ltri.needle.haystack import Context
from ltri.needle.recall import fed_token_ids, needle_token_range, recall_fields, watch_needle
from ltri.needle.settings import NeedleRun
from ltri.needle.tasks import Probe
from ltri.session import Session
from ltri.timing import synchronize

BUNDLED_MODEL = "SmolLM2-135M-Instruct (bundled)"
# What a cell that ran out of memory records instead of an answer.
OOM_FIELDS = {
    "response": None,
    "score": None,
    "seconds": None,
    "feed_tok_s": None,
    "needle_span_retrieved": None,
    "needle_recall": None,
}


def read_and_answer(session: Session, context: Context, question: str, max_new_tokens: int) -> dict:
    """Feed the context, ask the question; timings, the answer and (ltri policy) the needle's coverage."""
    ids, offsets = fed_token_ids(session.tokenizer, session.chat_format, context.text)
    needle_start, needle_end = needle_token_range(offsets, context.needle_chars)
    synchronize(session.device)
    started = time.perf_counter()
    n_fed = session.feed(context.text)
    synchronize(session.device)
    fed = time.perf_counter()
    if n_fed != len(ids):
        raise RuntimeError(f"Session.feed fed {n_fed} tokens, the harness counted {len(ids)}: tokenization differs")
    with watch_needle(needle_start, needle_end) as coverage:
        response = session.ask(question, max_new_tokens=max_new_tokens)
    synchronize(session.device)
    answered = time.perf_counter()
    result = {
        "response": response,
        "seconds": answered - started,
        "feed_seconds": fed - started,
        "feed_tok_s": n_fed / (fed - started),
        "answer_tokens": len(session.last_answer_tokens),
        "needle_tokens": [needle_start, needle_end],
        "stats": asdict(session.stats()),
    }
    return result | recall_fields(session, coverage)


def run_cell(model, tokenizer, run: NeedleRun, method: str, context: Context, probe: Probe) -> dict:
    """One cell's record; a CUDA out-of-memory error becomes status "oom" (score null), others propagate."""
    config = run.ltri_config(method)
    record = {
        "model": run.model or BUNDLED_MODEL,
        "method": method,
        "task": run.task,
        "context_length": context.n_tokens,
        "target_length": None,  # filled by the caller
        "depth_percent": context.depth_percent,
        "actual_depth_percent": context.actual_depth_percent,
        "needle": probe.sentence,
        "question": probe.question,
        "answer_terms": list(probe.answer_terms),
        "haystack": str(run.haystack) if run.haystack else "filler",
        "config": asdict(config) | {"max_new_tokens": run.max_new_tokens},
    }
    session = Session(model, config, tokenizer=tokenizer)
    try:
        result = read_and_answer(session, context, probe.question, run.max_new_tokens)
    except torch.cuda.OutOfMemoryError as error:
        result = {"status": "oom", "error": str(error).split("\n")[0]}
    finally:
        session.close()
    if "status" in result:
        del session
        torch.cuda.empty_cache()
        return record | result | OOM_FIELDS
    return record | {"status": "ok", "score": probe.score(result["response"])} | result
