"""The sampler's reserved KV cache layer against transformers' DynamicLayer: the same
keys and values through prefill, decode steps, row selection, trimming and reassignment,
and decode steps that write in place once room is reserved."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from tunemesh_sampler.engine.kv_cache import ReservedLayer, reserve, reserved_cache


def _states(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 2, length, 4, generator=torch.Generator().manual_seed(seed))


def _same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.get_seq_length() == b.get_seq_length()


def test_reserved_layer_matches_dynamic_layer():
    dynamic, reserved = DynamicLayer(), ReservedLayer()
    assert reserved.keys is None and reserved.get_seq_length() == 0
    for layer in (dynamic, reserved):
        layer.update(_states(3, 5, 1), _states(3, 5, 2))  # prefill
    _same(dynamic, reserved)
    reserved.reserve(12)
    for step in range(4):
        for layer in (dynamic, reserved):
            out = layer.update(_states(3, 1, 10 + step), _states(3, 1, 20 + step))
        assert torch.equal(out[0], dynamic.keys)
    _same(dynamic, reserved)
    index = torch.tensor([2, 0])
    for layer in (dynamic, reserved):  # rows leave, then leading positions are trimmed
        layer.batch_select_indices(index)
        layer.keys, layer.values = layer.keys[..., 2:, :], layer.values[..., 2:, :]
    _same(dynamic, reserved)
    for step in range(7):  # past the reserved room: the buffers grow
        for layer in (dynamic, reserved):
            layer.update(_states(2, 1, 30 + step), _states(2, 1, 40 + step))
    _same(dynamic, reserved)


def test_decode_steps_write_in_place_once_room_is_reserved():
    layer = ReservedLayer()
    layer.update(_states(4, 6, 1), _states(4, 6, 2))
    layer.reserve(6 + 16)
    buffers = layer.keys.data_ptr(), layer.values.data_ptr()
    for step in range(16):
        layer.update(_states(4, 1, step), _states(4, 1, 100 + step))
    assert (layer.keys.data_ptr(), layer.values.data_ptr()) == buffers
    assert layer.get_seq_length() == 22 and layer.capacity == 22


def test_reserved_cache_for_a_full_attention_model(model_dir):
    from transformers import AutoConfig

    cache = reserved_cache(AutoConfig.from_pretrained(model_dir))
    assert cache.layers and all(isinstance(layer, ReservedLayer) for layer in cache.layers)
    reserve(cache, 10)  # nothing cached yet: nothing to reserve, no error


def test_decode_writes_each_row_at_its_own_length():
    """Rows of different lengths (all from index 0): row b's new position lands at lengths[b]."""
    from tunemesh_sampler.engine.kv_cache import write_at

    cache = reserved_cache(_tiny_config())
    layer = cache.layers[0]
    keys, values = _states(2, 5, 1), _states(2, 5, 2)
    layer.update(keys, values)
    write_at(cache, torch.tensor([3, 5]))
    new_k, new_v = _states(2, 1, 3), _states(2, 1, 4)
    out_k, out_v = layer.update(new_k, new_v)
    assert out_k.shape[-2] == 6
    assert torch.equal(out_k[0, :, 3], new_k[0, :, 0]) and torch.equal(out_k[1, :, 5], new_k[1, :, 0])
    assert torch.equal(out_v[0, :, :3], values[0, :, :3]) and torch.equal(out_v[1, :, :5], values[1])
    assert torch.equal(out_k[0, :, 4], keys[0, :, 4])  # past row 0's new token: its padding, masked later


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                       intermediate_size=16, vocab_size=32)
