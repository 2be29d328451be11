"""Each CPU shim of angioexp.backends.sam3.cpu: SAM3's code fails (or misbehaves) without it on a
machine without CUDA, and works with it; the shims are undone on exit."""

from __future__ import annotations

import warnings

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
import torch  # noqa: E402

from angioexp.backends.sam3.cpu import SHIMS, apply_cpu_shims, cpu_shims  # noqa: E402

pytestmark = [
    pytest.mark.sam3,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are no-ops where CUDA exists"),
]


def test_cuda_factories_position_encoding():
    from sam3.model.position_encoding import PositionEmbeddingSine

    with pytest.raises(RuntimeError):  # torch.zeros(..., device="cuda") inside SAM3
        PositionEmbeddingSine(num_pos_feats=8, normalize=True, precompute_resolution=64)
    with cpu_shims():
        enc = PositionEmbeddingSine(num_pos_feats=8, normalize=True, precompute_resolution=64)
    assert len(enc.cache) == 4 and all(t.device.type == "cpu" for t in enc.cache.values())


def test_cuda_factories_decoder_coordinates():
    from sam3.model.decoder import TransformerDecoder

    with pytest.raises(RuntimeError):
        TransformerDecoder._get_coords(72, 72, device="cuda")
    with cpu_shims():
        h, w = TransformerDecoder._get_coords(72, 72, device="cuda")
    assert h.shape == (72,) and h.device.type == "cpu"


def test_pin_memory_in_geometry_encoder_path():
    scale = torch.tensor([8.0, 8.0, 8.0, 8.0])
    with pytest.raises(RuntimeError):
        scale.pin_memory()  # SequenceGeometryEncoder._encode_boxes does exactly this
    with cpu_shims():
        assert torch.equal(scale.pin_memory().to("cpu", non_blocking=True), scale)


def test_focal_loss_uses_the_pytorch_path():
    from sam3.train.loss import loss_fns

    x, t = torch.randn(4, 16), (torch.rand(4, 16) > 0.5).float()
    expected = loss_fns.sigmoid_focal_loss(x, t, 1, triton=False)
    with pytest.raises(RuntimeError):  # triton kernel: no GPU driver
        loss_fns.sigmoid_focal_loss(x, t, 1)
    with cpu_shims():
        assert torch.allclose(loss_fns.sigmoid_focal_loss(x, t, 1), expected)
        # the losses call it through the module attribute, so they get the shim too
        masks = loss_fns.Masks(weight_dict={"loss_mask": 1.0, "loss_dice": 1.0})
        assert masks.focal_alpha == 0.25


def test_mem_meter_reports_host_memory():
    from sam3.train.utils.train_utils import MemMeter

    meter = MemMeter("Mem (GB)", torch.device("cpu"))
    with pytest.raises(RuntimeError):  # torch.cuda.reset_peak_memory_stats
        meter.update(reset_peak_usage=True)
    with cpu_shims():
        meter.update(reset_peak_usage=True)
    assert meter.val > 0.05  # this process holds at least 50 MB


def test_cuda_autocast_is_a_silent_noop():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.amp.autocast(device_type="cuda", enabled=True, dtype=torch.bfloat16):
            pass
    assert any("autocast" in str(w.message).lower() for w in caught)
    with cpu_shims(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.amp.autocast(device_type="cuda", enabled=True, dtype=torch.bfloat16):
            y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert not caught and y.dtype == torch.float32


def test_shims_are_undone_and_idempotent():
    originals = (torch.arange, torch.zeros, torch.Tensor.pin_memory, torch.amp.autocast)
    with cpu_shims() as names:
        assert set(names) == set(SHIMS)
        assert apply_cpu_shims() == names  # a second call changes nothing
        assert torch.arange is not originals[0]
    assert (torch.arange, torch.zeros, torch.Tensor.pin_memory, torch.amp.autocast) == originals
