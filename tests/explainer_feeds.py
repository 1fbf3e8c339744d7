"""Feeds for running an explainer session directly: ``target`` is a required input (format 2)."""
from __future__ import annotations

import numpy as np


def with_target(sess, feeds: dict, target=None) -> dict:
    """``feeds`` plus ``target`` (-1 per sample = the argmax, or the given classes) when the
    session takes a ``target`` input that is not fed yet."""
    if "target" in feeds or "target" not in {i.name for i in sess.get_inputs()}:
        return feeds
    batch = np.asarray(next(iter(feeds.values()))).shape[0]
    t = np.full([batch], -1, np.int64) if target is None else np.asarray(target, np.int64).reshape(-1)
    return {**feeds, "target": t}
