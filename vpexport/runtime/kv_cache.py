"""Fixed-capacity KV caches for the decode graph (numpy, no torch).

Per layer l the cache is one preallocated (B, KV, static_l + C, hd) buffer per key and value:
[prefix][visual tokens kept at l][C text slots]. The C text slots hold the prompt's text (T
tokens, right-padded) and then one slot per generated token, so C = T + steps where `steps` is
the number of decode steps the request can run (max_new_tokens - 1: the first token comes from
prefill). `mask` (B, C) marks the slots that hold a valid token.

The prefill's caches are copied in once per request. A decode step reads the buffers in place
(ONNX Runtime and OpenVINO both take numpy inputs without copying them) and returns only the
step's own key/value per layer, which `append` writes into the next slot: per token, 2 x layers
small writes of (B, KV, 1, hd) instead of copying every cache out of the graph and back in.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, prefill_kv: list, text_mask: np.ndarray, steps: int, dtype=None):
        """`prefill_kv`: per layer [key, value] (B, KV, static_l + T, hd) from the prefill graph;
        `text_mask` (B, T) the prompt's text attention mask; `steps` >= 0 decode steps of room;
        `dtype`: the buffers' element type (default the prefill's; the decode graph's cache inputs,
        e.g. bf16 on OpenVINO, when caches from elsewhere are fed to it)."""
        b, t = text_mask.shape
        self.capacity = t + max(0, int(steps))
        self.used = t  # filled text slots (the same for every row: the batch steps together)
        self.mask = np.zeros((b, self.capacity), dtype=np.int64)
        self.mask[:, :t] = text_mask
        self.buffers: list[list[np.ndarray]] = []
        self.text_start: list[int] = []  # per layer: index of the first text slot
        for k, v in prefill_kv:
            start = k.shape[2] - t
            shape = (*k.shape[:2], start + self.capacity, k.shape[3])
            kb, vb = np.empty(shape, dtype=dtype or k.dtype), np.empty(shape, dtype=dtype or v.dtype)
            kb[:, :, : k.shape[2]], vb[:, :, : v.shape[2]] = k, v
            # Unwritten slots are masked out, but must hold finite numbers: 0 * NaN from
            # uninitialised memory would still poison the probability-weighted sum of values.
            kb[:, :, k.shape[2] :], vb[:, :, v.shape[2] :] = 0, 0
            self.buffers.append([kb, vb])
            self.text_start.append(start)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def feeds(self) -> dict:
        """The decode graph's cache inputs: text_mask and past.{i}.key / past.{i}.value."""
        f = {"text_mask": self.mask}
        for i, (k, v) in enumerate(self.buffers):
            f[f"past.{i}.key"], f[f"past.{i}.value"] = k, v
        return f

    def append(self, out: dict) -> None:
        """Write a decode step's new.{i}.key / new.{i}.value into the next slot and mark it valid."""
        if self.used >= self.capacity:
            raise ValueError(f"KV cache full ({self.capacity} text slots)")
        j = self.used
        for i, (k, v) in enumerate(self.buffers):
            s = self.text_start[i] + j
            k[:, :, s : s + 1] = out[f"new.{i}.key"]
            v[:, :, s : s + 1] = out[f"new.{i}.value"]
        self.mask[:, j] = 1
        self.used += 1

    def views(self) -> list:
        """Per layer [key, value] up to the last filled slot (views, no copy): what `decode`'s
        growing caches used to hold, for comparisons."""
        return [[k[:, :, : s + self.used], v[:, :, : s + self.used]] for (k, v), s in zip(self.buffers, self.text_start)]
