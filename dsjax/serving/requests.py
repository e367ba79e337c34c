"""A serving request's state on the host and what a step reports of it."""

from __future__ import annotations

import dataclasses

import numpy as np

from dsjax import settings as st
from dsjax.serving.detokenize import IncrementalText
from dsjax.serving.scheduler import Sequence


class RequestOutput:
    """A request after a step: new_token_ids are the step's; token_ids (every token generated
    so far), logprobs (log p of each under the model) and top_logprobs (per token, the
    request's top_logprobs most likely (token, log p), most likely first; None unless asked)
    are its whole output so far, sliced from the request's own lists when read (a step costs
    nothing per token generated before it). finish_reason: "stop" (a stop token or string),
    "length", "abort"; stop_string: the one that ended it (OpenAI's and vLLM's semantics: found
    in the decoded text; the text returned ends before it)."""

    __slots__ = ("request_id", "prompt_token_ids", "new_token_ids", "finished", "finish_reason",
                 "stop_string", "_req", "_n")
    FIELDS = ("request_id", "prompt_token_ids", "token_ids", "logprobs", "new_token_ids",
              "finished", "finish_reason", "stop_string", "top_logprobs")

    def __init__(self, req: Request, new: list[int], reason: str | None):
        self.request_id, self.prompt_token_ids, self.new_token_ids = req.seq.id, req.seq.prompt, new
        self.finished, self.finish_reason = reason is not None, reason
        self.stop_string, self._req, self._n = req.stop_string, req, len(req.logprobs)

    token_ids = property(lambda self: self._req.seq.out[:self._n])
    logprobs = property(lambda self: self._req.logprobs[:self._n])
    top_logprobs = property(lambda self: self._req.top[:self._n] if self._req.top_n else None)

    def __eq__(self, other) -> bool:
        return isinstance(other, RequestOutput) and all(
            getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    def __repr__(self) -> str:
        return "RequestOutput(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS) + ")"


@dataclasses.dataclass
class Request:
    seq: Sequence
    settings: st.GenerationSettings
    seed: int
    replica: int  # the replica (scheduler and blocks) that runs it
    record: np.ndarray  # its row of a step's buffer (dsjax.serving.batch)
    top_n: int = 0  # top log-probabilities to report per token
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    text: IncrementalText | None = None  # its output's text, with stop strings to search
    searched: int = 0  # characters of text already searched for stop strings
    stop_string: str | None = None
