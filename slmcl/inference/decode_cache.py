"""A preallocated KV cache for batched greedy decoding: every key and value written once, in place.

``DynamicCache`` grows by concatenation: each decode step copies every layer's whole cache
into a new tensor (one fresh allocation per layer per step), and batching chunks together
or dropping finished rows copies it again. On a CPU those copies and the page faults of
the new allocations cost as much as the matmuls at batch 32. Here each layer's keys and
values live in one buffer of ``rows x heads x capacity x head_dim`` allocated once per
``greedy_generate`` call: a forward writes its new positions into the buffer and attends
over a view of the filled columns, a prefill chunk writes straight into its rows of the
decode batch (so chunks need no joining), and dropping rows moves the survivors to the
front of the same buffer.

Only plain full-attention stacks use it (``supports_slots``): sliding-window and
linear-attention layers keep state of another shape, and use the model's own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


def _text_config(model: Any) -> Any:
    config: Any = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: Any) -> int:
    return int(_text_config(model).num_hidden_layers)


def supports_slots(model: Any) -> bool:
    """True when every attention layer attends over all past positions (Llama, SmolLM2, Qwen2/3)."""
    config = _text_config(model)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


class KVSlots:
    """Per-layer key/value buffers and the attention mask of one decode batch, reused by every batch.

    A buffer is allocated at its layer's first write, zero-filled, so a masked slot never
    holds a NaN (softmax weight 0 times NaN is still NaN); later batches reuse the memory,
    and their masked slots hold finite stale values, which the mask zeroes out exactly.
    """

    def __init__(self, n_layers: int, rows: int, capacity: int, device: torch.device) -> None:
        self.n_layers, self.rows, self.capacity, self.device = n_layers, rows, capacity, device
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.mask = torch.zeros((rows, capacity), dtype=torch.long, device=device)

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            keys = self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            values = self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return keys, values

    def cache(self, rows: slice, length: int) -> Cache:
        """A cache over ``rows`` whose next write lands at column ``length`` (columns before it are the past)."""
        return Cache(layers=[_SlotLayer(self, i, rows, length) for i in range(self.n_layers)])

    def copy_head(self, head: KVSlots, rows: slice, columns: int) -> None:
        """Write ``head``'s first ``columns`` slots (its row 0: a shared prompt head) into ``rows``."""
        for layer in range(self.n_layers):
            src_k, src_v = head.keys[layer], head.values[layer]
            if src_k is None or src_v is None:
                continue
            keys, values = self.buffers(layer, src_k)
            keys[rows, :, :columns] = src_k[0:1, :, :columns]
            values[rows, :, :columns] = src_v[0:1, :, :columns]

    def compact(self, keep: Sequence[int], length: int) -> None:
        """Move rows ``keep`` (in that order) to the front: finished rows stop costing work."""
        idx = torch.tensor(list(keep), device=self.device)
        n = len(keep)
        for buf in (*self.keys, *self.values):
            if buf is not None:
                buf[:n, :, :length] = buf[idx, :, :length]
        self.mask[:n, :length] = self.mask[idx, :length]


class _SlotLayer(DynamicLayer):
    """One layer's cache as a window on ``KVSlots``: writes in place, returns views of the filled part."""

    def __init__(self, slots: KVSlots, layer: int, rows: slice, length: int) -> None:
        super().__init__()
        self.slots, self.layer, self.rows, self.length = slots, layer, rows, length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.slots.buffers(self.layer, key_states)
        end = self.length + key_states.shape[-2]
        if end > self.slots.capacity:
            raise RuntimeError(f"KV slots hold {self.slots.capacity} positions, {end} needed")
        keys[self.rows, :, self.length:end] = key_states
        values[self.rows, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = keys[self.rows, :, :end], values[self.rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KV slots are laid out by greedy_generate")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("use KVSlots.compact")
