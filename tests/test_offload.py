"""Block swapper and selective checkpointing on the CPU (device moves are CPU->CPU copies)."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel

from sd3booth.adapters import lora
from sd3booth.config import DEFAULT_LORA_LAYERS
from sd3booth.models.offload import BlockSwapper, selective_checkpointing


def _model(tiny_model, layers=4):
    torch.manual_seed(0)
    cfg = SD3Transformer2DModel.load_config(tiny_model / "transformer")
    net = SD3Transformer2DModel.from_config({**cfg, "num_layers": layers})
    net.requires_grad_(False)
    lora.add_lora(net, 4, 4, 0.0, lora.resolve_targets(net, list(DEFAULT_LORA_LAYERS), None))
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return net


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 20, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g),
                timestep=torch.tensor([300.0, 700.0][:batch]))  # fmt: skip


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def _step(net):
    net.zero_grad(set_to_none=True)
    out = net(**_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), _grads(net)


def test_swapped_training_step_equals_resident_one(tiny_model):
    ref = _model(tiny_model)
    ref.enable_gradient_checkpointing()
    ref_out, ref_grads = _step(ref)
    net = copy.deepcopy(ref)
    swapper = BlockSwapper(net.transformer_blocks, [0, 1, 2, 3], "cpu", record_calls=True)
    assert swapper.resident_bytes_saved() > 0
    for _ in range(2):  # two steps: the second starts from the state the first left
        out, grads = _step(net)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0)
    # forward 0..3, checkpoint recompute 3..0, twice
    assert swapper.stats.calls == [0, 1, 2, 3, 3, 2, 1, 0] * 2
    # only the very first block is fetched on demand; the rest were prefetched one ahead
    assert swapper.stats.synchronous == 1 and swapper.stats.prefetched == 15


def test_weights_between_calls_are_placeholders_and_lora_stays(tiny_model):
    net = _model(tiny_model)
    swapper = BlockSwapper(net.transformer_blocks, [1, 2], "cpu")
    q = net.transformer_blocks[1].attn.to_q
    assert q.base_layer.weight.numel() == 0  # the frozen weight lives on the host only
    assert q.lora_A["default"].weight.numel() > 0 and q.lora_A["default"].weight.requires_grad
    assert net.transformer_blocks[0].attn.to_q.base_layer.weight.numel() > 0  # block 0 not swapped
    with torch.no_grad():
        net(**_inputs(), return_dict=False)
    assert q.base_layer.weight.numel() == 0
    swapper.remove()
    assert q.base_layer.weight.numel() > 0


def test_sampling_loop_predicts_the_restart(tiny_model):
    net = _model(tiny_model, layers=3)
    ref = copy.deepcopy(net)
    swapper = BlockSwapper(net.transformer_blocks, [0, 1, 2], "cpu", record_calls=True)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(net(**_inputs(), return_dict=False)[0], ref(**_inputs(), return_dict=False)[0])
    assert swapper.stats.synchronous == 1  # only the first call of all


def test_quantised_or_trainable_weights_are_left_alone(tiny_model):
    net = _model(tiny_model)
    lora_before = {n: p.clone() for n, p in net.named_parameters() if p.requires_grad}
    BlockSwapper(net.transformer_blocks, [0], "cpu")
    for n, p in net.named_parameters():
        if n in lora_before:
            assert torch.equal(p, lora_before[n])


@pytest.mark.parametrize("chosen", [[], [1], [0, 2, 3]])
def test_selective_checkpointing_changes_nothing_but_memory(tiny_model, chosen):
    ref = _model(tiny_model)
    _, ref_grads = _step(ref)
    net = copy.deepcopy(ref)
    calls = []
    func = selective_checkpointing(chosen, net.transformer_blocks)

    def counting(module, *args):
        calls.append(module)
        return func(module, *args)

    net.enable_gradient_checkpointing(gradient_checkpointing_func=counting)
    _, grads = _step(net)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7)
    assert len(calls) == 4


def test_at_most_one_block_resident_and_one_in_flight(tiny_model):
    net = _model(tiny_model, layers=6)
    net.enable_gradient_checkpointing()
    swapper = BlockSwapper(net.transformer_blocks, range(6), "cpu")
    seen = []

    def count(module, args):
        loaded = [b.attn.to_q.base_layer.weight.numel() > 0 for b in net.transformer_blocks]
        seen.append((sum(loaded), len(swapper.ready)))

    for b in net.transformer_blocks:
        b.register_forward_pre_hook(count)  # runs after the swapper's own pre-hook
    _step(net)
    _step(net)
    assert len(seen) == 24 and max(r for r, _ in seen) == 1 and max(f for _, f in seen) <= 1


def test_one_packed_copy_per_block_with_aligned_views(tiny_model):
    net = _model(tiny_model, layers=2)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    swapper = BlockSwapper(net.transformer_blocks, [0, 1], "cpu")
    assert all(len(flats) == 1 for flats in swapper.slots.values())  # one dtype: one buffer, one copy
    with torch.no_grad():
        net(**_inputs(), return_dict=False)
    size = {i: sum(f.host.numel() * f.host.element_size() for f in flats) for i, flats in swapper.slots.items()}
    # blocks 0 and 1, then block 0 again, prefetched for the next call (sampling starts over)
    assert swapper.stats.bytes_copied == 2 * size[0] + size[1]
    swapper._fetch(1)
    swapper._before(1, net.transformer_blocks[1], ())
    for n, p in net.transformer_blocks[1].named_parameters():
        if not p.requires_grad and p.numel():
            assert p.storage_offset() % 64 == 0
            torch.testing.assert_close(p, before[f"transformer_blocks.1.{n}"], rtol=0, atol=0)
    swapper.remove()
    for n, p in net.named_parameters():
        if n in before:
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # its own storage again
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_copies_land_in_a_fixed_ring_of_buffers(tiny_model):
    """No allocation per fetch (issue #10's fragmentation): every swapped weight, while its block runs, is a view
    of one of two buffers allocated once, for the whole run."""
    net = _model(tiny_model, layers=4)
    net.enable_gradient_checkpointing()
    swapper = BlockSwapper(net.transformer_blocks, range(4), "cpu")
    pointers = set()

    def where(module, args):
        w = module.attn.to_q.base_layer.weight
        pointers.add(w.untyped_storage().data_ptr())

    for b in net.transformer_blocks:
        b.register_forward_pre_hook(where)  # after the swapper's own pre-hook: the weights are in place
    _step(net)
    ring = {buf.tensors[torch.float32].untyped_storage().data_ptr() for buf in swapper.ring}
    _step(net)
    assert len(swapper.ring) == 2
    assert pointers <= ring and len(ring) == 2  # every block ran from one of the two buffers, across two steps


def test_generate_with_a_swap_plan_streams_blocks_and_draws_the_same_image(tiny_model, tmp_path):
    """``generate`` (and class-image generation, same loader) on a plan that swaps blocks attaches the swapper:
    the image equals the all-resident plan's, pixel for pixel."""
    import numpy as np
    from PIL import Image

    from sd3booth.models import loaders, placement, source
    from sd3booth.plan.choose import Plan
    from sd3booth.sample import generate_with_lora

    src = source.resolve_model(str(tiny_model))
    swapped = placement.decide(placement.DeviceInfo(), None, Plan(swap_blocks=2, checkpoint_blocks=2))
    net = loaders.load_for_sampling(src, swapped)
    assert all(lin.weight.numel() == 0 for lin in net.transformer_blocks[0].modules() if type(lin) is torch.nn.Linear)
    images = {}
    for name, memory in (("resident", Plan()), ("swapped", swapped.memory)):
        place = placement.decide(placement.DeviceInfo(), None, memory)
        (path,) = generate_with_lora(src, [], "a toy", "", tmp_path / name, 1, 0, 2, 3.0, (64, 64), 77, place,
                                     tmp_path / "cache", log=lambda _m: None)  # fmt: skip
        images[name] = np.asarray(Image.open(path))
    assert np.array_equal(images["resident"], images["swapped"])
