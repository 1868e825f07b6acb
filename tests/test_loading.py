"""Loading without mapping weight files (issue #10): models built on the meta device, their weights read with
plain file reads (models.reader, models.direct), swapped blocks read straight into the swapper's exact-size
host packs (models.host_packs, models.pinned), and fp8 host copies of swapped blocks (models.fp8_rows)."""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from sd3booth.adapters import lora
from sd3booth.config import DEFAULT_LORA_LAYERS
from sd3booth.errors import UserError
from sd3booth.models import direct, fp8_rows, loaders, pinned, reader
from sd3booth.models.offload import BlockSwapper
from sd3booth.models.placement import DeviceInfo, decide
from sd3booth.models.source import ModelSource, resolve_model
from sd3booth.plan.choose import Plan

COMPONENTS = [
    (CLIPTextModelWithProjection, "text_encoder"),
    (T5EncoderModel, "text_encoder_3"),
    (SD3Transformer2DModel, "transformer"),
    (AutoencoderKL, "vae"),
]


def _reference(cls, folder, dtype, **kw):
    key = "torch_dtype" if hasattr(cls, "load_config") else "dtype"
    return cls.from_pretrained(folder, **{key: dtype}, **kw)


def _assert_identical(ref: torch.nn.Module, new: torch.nn.Module) -> None:
    a, b = ref.state_dict(), new.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (n, x), (m, y) in zip(ref.named_buffers(), new.named_buffers()):
        assert n == m and x.dtype == y.dtype and torch.equal(x, y), n
    assert not new.training


@pytest.fixture
def no_library_loading(monkeypatch):
    """Every library path that maps a weight file fails: the loader under test must not take one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a library loader (which maps the file) was used")

    import safetensors
    import safetensors.torch

    for mod, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "safe_open")):
        monkeypatch.setattr(mod, name, refuse)
    for cls, _ in COMPONENTS:
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


@pytest.fixture(scope="module")
def references(tiny_model):
    """Each component as from_pretrained loads it, in each dtype."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return {(sub, d): _reference(cls, tiny_model / sub, d) for cls, sub in COMPONENTS for d in dtypes}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_components_load_bit_identically_to_from_pretrained(tiny_model, dtype, references, no_library_loading):
    for cls, sub in COMPONENTS:
        new = direct.load_model(cls, tiny_model / sub, None, dtype, torch.device("cpu"))
        _assert_identical(references[(sub, dtype)], new)
        if sub == "text_encoder_3":  # tied again; in fp16 transformers keeps T5's FFN output layers in fp32
            assert new.shared.weight is new.encoder.embed_tokens.weight
            wo = new.encoder.block[0].layer[1].DenseReluDense.wo.weight
            assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)


@pytest.fixture
def tiny_src(tiny_model):
    return resolve_model(str(tiny_model))  # (checks the files' headers with safetensors)


def test_the_loader_reads_files_without_any_library_loader(tiny_src, no_library_loading):
    place = decide(DeviceInfo(), "no", Plan())
    src = tiny_src
    for index in (1, 2, 3):
        assert loaders.load_text_encoder(src, index, place)[1] is not None
    assert loaders.load_vae(src, place) is not None
    assert loaders.load_transformer(src, place) is not None


def test_reads_go_through_a_small_staging_buffer_in_chunks(tiny_model):
    files = reader.weight_files(tiny_model / "transformer")
    name = "transformer_blocks.0.ff.net.0.proj.weight"
    want = load_file(str(files[0]))[name]
    with reader.open_reader(files, pin=False) as r:
        r.staging_bytes = 4096  # far smaller than the tensor: many chunks of whole rows
        out = torch.empty(want.shape, dtype=torch.bfloat16)
        r.read_into(name, out)
        assert torch.equal(out, want.to(torch.bfloat16))
        same = torch.empty(want.shape, dtype=want.dtype)
        before = r.bytes_read
        r.read_into(name, same)  # same dtype into host memory: straight from the file, no staging
        assert torch.equal(same, want) and r.bytes_read - before == want.numel() * want.element_size()
        assert r._staging.numel() == 4096


def test_sharded_and_variant_checkpoints(tiny_model, tmp_path):
    t5 = _reference(T5EncoderModel, tiny_model / "text_encoder_3", torch.float32)
    t5.save_pretrained(tmp_path / "t5", max_shard_size="50KB", variant="fp16")
    tr = _reference(SD3Transformer2DModel, tiny_model / "transformer", torch.float32)
    tr.save_pretrained(tmp_path / "tr", max_shard_size="1MB", variant="fp16")
    for cls, folder in ((T5EncoderModel, tmp_path / "t5"), (SD3Transformer2DModel, tmp_path / "tr")):
        files = reader.weight_files(folder, "fp16")
        assert len(files) > 1 and all(".fp16" in f.name for f in files)
        ref = _reference(cls, folder, torch.bfloat16, variant="fp16")
        _assert_identical(ref, direct.load_model(cls, folder, "fp16", torch.bfloat16, torch.device("cpu")))
    assert reader.weight_files(tmp_path) is None  # no weights: the caller falls back to from_pretrained


def test_missing_or_unexpected_keys_are_one_line_naming_the_file(tiny_model, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "vae" / "config.json").read_text())
    state = load_file(str(tiny_model / "vae" / "diffusion_pytorch_model.safetensors"))
    removed = sorted(state)[0]
    del state[removed]
    state["decoder.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError) as e:
        direct.load_model(AutoencoderKL, folder, None, torch.float32, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "diffusion_pytorch_model.safetensors") in msg
    assert f"1 missing ({removed})" in msg and "1 unexpected (decoder.extra.weight)" in msg


# ---- swapped blocks straight from the file ---------------------------------------------------------------


def _model_on_disk(tiny_model, tmp_path, layers=4):
    """A 4-block transformer written to disk (the session's tiny model has 2), and its folder."""
    cfg = SD3Transformer2DModel.load_config(tiny_model / "transformer")
    torch.manual_seed(0)
    net = SD3Transformer2DModel.from_config({**cfg, "num_layers": layers})
    (tmp_path / "m").mkdir()
    net.save_pretrained(tmp_path / "m" / "transformer")
    return tmp_path / "m"


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 20, 64, generator=g),
                pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.tensor([300.0, 700.0]))  # fmt: skip


def _with_lora(net):
    torch.manual_seed(0)
    params = lora.add_lora(net, 4, 4, 0.0, lora.resolve_targets(net, list(DEFAULT_LORA_LAYERS), None))
    for p in params:
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return params


def _step(net, params):
    for p in params:
        p.grad = None
    out = net(**_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _swapped(root, swap_dtype="bf16", swap=3):
    place = decide(DeviceInfo(), "no", Plan(checkpoint_blocks=4, swap_blocks=swap, swap_dtype=swap_dtype))
    net = loaders.load_transformer(ModelSource(root, "disk"), place)
    params = _with_lora(net)
    return net, params, place


def test_swapper_from_the_file_equals_the_current_path(tiny_model, tmp_path):
    root = _model_on_disk(tiny_model, tmp_path)
    net, params, place = _swapped(root)
    packs = net.swap_packs
    # before the swapper: the swapped blocks' Linear weights are views of their exact-size packs (no other copy)
    q = net.transformer_blocks[0].attn.to_q.base_layer.weight
    flat = packs[0].flats[0]
    assert q.untyped_storage().data_ptr() == flat.host.untyped_storage().data_ptr()
    assert flat.host.untyped_storage().nbytes() == flat.host.numel() * flat.host.element_size()
    swapper = loaders.attach_memory_savers(net, place)
    assert swapper.from_file == 3 and not hasattr(net, "swap_packs")
    assert q.numel() == 0  # between calls the weight lives in the pack only
    # the current path: the model loaded whole by diffusers, its blocks packed by copying
    ref = SD3Transformer2DModel.from_pretrained(root / "transformer").requires_grad_(False)
    ref_params = _with_lora(ref)
    ref.enable_gradient_checkpointing()
    ref_swapper = BlockSwapper(ref.transformer_blocks, range(3), "cpu")
    assert ref_swapper.from_file == 0
    for _ in range(2):
        out, grads = _step(net, params)
        ref_out, ref_grads = _step(ref, ref_params)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp8_host_copies_from_the_file_equal_those_packed_in_memory(tiny_model, tmp_path):
    root = _model_on_disk(tiny_model, tmp_path)
    net, params, place = _swapped(root, "fp8")
    assert [f.host.dtype for f in net.swap_packs[0].flats] == [fp8_rows.FP8, torch.float32]  # weights, biases
    with pytest.raises(RuntimeError, match="attach the block swapper"):  # placeholders never run by accident
        net(**_inputs(), return_dict=False)
    swapper = loaders.attach_memory_savers(net, place)
    assert swapper.from_file == 3
    full = loaders.load_transformer(ModelSource(root, "disk"), decide(DeviceInfo(), "no", Plan()))
    ref_params = _with_lora(full)
    full.enable_gradient_checkpointing()
    BlockSwapper(full.transformer_blocks, range(3), "cpu", fp8=True)  # packed from the loaded weights
    out, grads = _step(net, params)
    ref_out, ref_grads = _step(full, ref_params)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp8_rows_numerics():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64)[:, None]).to(torch.bfloat16)
    s = fp8_rows.row_scales(w)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    q = fp8_rows.quantize_rows(w, s)
    assert q.float().abs().max() <= fp8_rows.FP8_MAX
    out = fp8_rows.dequantize_rows_(torch.empty_like(w), q, s)
    assert torch.equal(out, (q.float() * s[:, None]).to(torch.bfloat16))  # the upcast is exact
    rel = ((out.float() - w.float()).norm(dim=1) / w.float().norm(dim=1)).max()
    assert 0 < rel < 0.04  # e4m3's 3-bit mantissa, whatever the row's magnitude (rows span 4 decades)


def test_fp8_swapped_block_output_stays_close_to_bf16(tiny_model, tmp_path):
    """A whole block computed from fp8 host copies (upcast to bf16) against the same block in bf16."""
    root = _model_on_disk(tiny_model, tmp_path, layers=1)
    place = decide(DeviceInfo(), "bf16", Plan(checkpoint_blocks=1, swap_blocks=1))
    ref = loaders.load_transformer(ModelSource(root, "disk"), decide(DeviceInfo(), "bf16", Plan()))
    net = loaders.load_transformer(ModelSource(root, "disk"), place)
    del net.swap_packs
    BlockSwapper(net.transformer_blocks, [0], "cpu", fp8=True)
    with torch.no_grad():
        x = {k: v.to(torch.bfloat16) for k, v in _inputs().items()}
        a, b = ref(**x, return_dict=False)[0].float(), net(**x, return_dict=False)[0].float()
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.02, rel  # measured 0.004


# ---- exact-size pinned memory -------------------------------------------------------------------------------


class _FakeCudart:
    def __init__(self):
        self.calls = []

    def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 - CUDA's name
        self.calls.append(("register", ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0


def test_pinned_buffers_are_exact_size_and_unregistered_when_freed(monkeypatch):
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    before = pinned.registered_bytes()
    n = 426_000_001  # an SD3.5 Large block's bytes, not a power of two
    buf = pinned.host_tensor(n, torch.uint8, pin=True)
    ptr = buf.data_ptr()
    assert buf.untyped_storage().nbytes() == n and ptr % 4096 == 0
    assert fake.calls == [("register", ptr, n)] and pinned.registered_bytes() - before == n
    view = buf[10:20]
    del buf
    gc.collect()
    assert len(fake.calls) == 1  # a view still holds it: still registered
    del view
    gc.collect()
    assert fake.calls[-1] == ("unregister", ptr) and pinned.registered_bytes() == before


def test_a_refused_page_lock_is_one_line_naming_what_to_do(monkeypatch):
    class Refusing(_FakeCudart):
        def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 - CUDA's name
            return 2  # cudaErrorMemoryAllocation, as with a low locked-memory limit

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Refusing())
    before = pinned.registered_bytes()
    with pytest.raises(UserError, match=r"could not page-lock 0\.50 GiB .* cudaError 2\).* --swap_dtype fp8"):
        pinned.host_tensor(2**29, torch.uint8, pin=True)
    assert pinned.registered_bytes() == before
