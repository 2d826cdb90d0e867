"""Shared check of the routing tests: two routing results are the same, field by field, bit for bit."""

import torch

FIELDS = ("topk_ids_TW", "topk_weights_TW", "load_before_E", "load_after_E", "tokens_G", "capacity_G",
          "routed_pairs", "dropped_pairs", "rerouted_pairs", "added_pairs")


def assert_same_routing(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(x, y), (name, x, y)
