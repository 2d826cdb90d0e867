"""Mixtral: softmax scores, top-k weights always renormalised over the picks."""

from ..routing.scores import FamilyScoring
from .spec import FamilySpec

SPEC = FamilySpec(
    model_type="mixtral",
    block_classes=("MixtralSparseMoeBlock",),
    scoring=lambda router: FamilyScoring(kind="softmax", normalize=True),
)
