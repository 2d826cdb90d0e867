"""Errors of the expert-parallel path; every rank of a failed session raises one of them."""

from __future__ import annotations

from ..errors import MoePatchError


class ExpertParallelError(MoePatchError, RuntimeError):
    """An expert-parallel forward could not complete on this rank."""


class PeerFailedError(ExpertParallelError):
    """Another rank raised and told this rank so at the next MoE layer (see that rank's log for the cause)."""


class ProtocolError(ExpertParallelError):
    """The ranks disagree about the MoE layer they are running (different models or forward structure)."""


class CollectiveError(ExpertParallelError):
    """A collective failed or timed out (a peer died, or blocked elsewhere past the process-group timeout)."""
