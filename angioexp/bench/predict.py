"""``angioexp predict`` throughput on a 512² cine, beside the model's forward pass alone.

The model is the default core Stage 1 model (random weights: speed does not depend on training)
saved as a checkpoint and loaded by ``predict`` as a user's would be; the cine is a synthetic
512² uint16 one written as a DICOM XA file (``synth --dicom``), so reading and decoding the DICOM
is part of the measured path. Three timings, same process, same frames:

* the model's ``forward`` alone on the batches the evaluation's inference builds;
* ``predict`` end to end without the model load: read + window + inference (``predict_split``:
  image decode, resize, forward, upsampling, thresholding, RLE) + outputs (label maps, overlays,
  centreline table, overlay video, JSON);
* the outputs alone on realistic masks: random weights keep no mask at the default threshold
  (and every mask at threshold 0 — whole-frame blobs whose skeletons no vessel has), so the
  post-processing is also timed on the generator's true Stage 2 segment maps of the same cine
  (RLE results per segment → merge, label maps, PNGs, skeleton lengths, video).

Overhead = (end to end − forward − outputs on empty masks + outputs on real masks) / forward.
Wall time on ``torch.set_num_threads(2)``, best of 2 — a shared machine makes it noisy (the load
average is in the header).
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import time
from pathlib import Path

from angioexp.bench import Figure

TITLE = "Predict (issue 16): frames/s on a 512² cine, model + post-processing + writing vs forward alone"
GOAL_OVERHEAD = 0.20  # writing + post-processing ≤ 20 % of the forward time


def _forward_seconds(model, cfg, coco_dir: Path) -> tuple[float, int]:
    import torch

    from angioexp.model.build import resolved_num_views
    from angioexp.train.data import EvalSet

    data = EvalSet(coco_dir, cfg, "frames", num_views=resolved_num_views(cfg))
    batches = [batch for batch, _ in data.batches(cfg.scratch.val_batch_size)]
    seconds = 0.0
    with torch.no_grad():
        for batch in batches:
            t0 = time.perf_counter()
            model(batch.images, batch.queries)
            seconds += time.perf_counter() - t0
    return seconds, len(data)


@contextlib.contextmanager
def _forward_clock(model_class):
    """Seconds spent in ``model_class.forward`` (accumulated in the yielded dict's "s")."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    clock = {"s": 0.0, "t0": 0.0}

    def before(module, args):
        if type(module) is model_class:
            clock["t0"] = time.perf_counter()

    def after(module, args, output):
        if type(module) is model_class:
            clock["s"] += time.perf_counter() - clock["t0"]

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield clock
    finally:
        for handle in handles:
            handle.remove()


def _outputs_on_true_segments(root: Path, study: Path, case_id: str, grays, names, spacing) -> tuple[float, float]:
    """Seconds to write the outputs of ``grays`` when the results are the case's true segments
    (one RLE result per segment, score 0.9), and the labelled pixel fraction."""
    import numpy as np

    from angioexp.data.convert import encode_instance
    from angioexp.predict import write_frame
    from angioexp.predict.outputs import write_video

    segments = np.load(study / "segments" / f"{case_id}.npy")
    results = [{"image_id": 1, "category_id": int(label), "score": 0.9,
                "segmentation": encode_instance(segments == label, int(label))["segmentation"]}
               for label in np.unique(segments) if label]
    folder = root / "outputs-on-truth"
    (folder / "labels").mkdir(parents=True)
    (folder / "overlays").mkdir()
    t0 = time.perf_counter()
    video = [write_frame(folder, f"frame_{k:04d}", gray, results, 0.5, names, spacing)[0] for k, gray in enumerate(grays)]
    write_video(folder, video, 15.0)
    return time.perf_counter() - t0, float((segments > 0).mean())


def run(quick: bool) -> list[Figure]:
    import numpy as np
    import torch

    from angioexp.checkpoints import save_checkpoint
    from angioexp.config import load_config, to_dict
    from angioexp.data.convert import encode_png_gray8, to_uint8
    from angioexp.data.synthetic import generate
    from angioexp.data.synthetic.dicom import write_dicom_study
    from angioexp.model.build import build_model
    from angioexp.predict import _as_coco, _image_entry, categories_for, load_model, predict
    from angioexp.predict.inputs import read_inputs
    from angioexp.segments import stage2_categories

    torch.set_num_threads(2)
    frames = 4 if quick else 8
    with tempfile.TemporaryDirectory(prefix="angioexp-bench-predict-") as tmp:
        root = Path(tmp)
        study = root / "study"
        generate(study, cases=4, seed=0, size=512, frames=frames, workers=1, uint16_every=1)  # every cine 12-bit
        dicom = sorted(write_dicom_study(study).glob("*.dcm"))[0]
        cfg = load_config(None, ["init_from=none", "train.device=cpu"], stage=1)
        torch.manual_seed(0)
        save_checkpoint(root / "model.pt", {"model": build_model(cfg).state_dict(), "config": to_dict(cfg)})

        model, cfg, _ = load_model(str(root / "model.pt"))
        (source,) = read_inputs([dicom])
        grays = [to_uint8(np.asarray(source.frames[i])) for i in source.frame_indices]
        entries = [_image_entry(k + 1, source, i, g.shape) for k, (i, g) in enumerate(zip(source.frame_indices, grays))]
        coco = _as_coco(root / "coco", entries, grays, categories_for(cfg, None), encode_png_gray8)
        _forward_seconds(model, cfg, coco)  # warm-up (allocator, kernels)
        forward_s, n = min(_forward_seconds(model, cfg, coco) for _ in range(2))

        best = None
        with _forward_clock(type(model)) as clock:
            for attempt in range(2):  # best of 2: other jobs on the shared cores only ever slow a run down
                clock["s"] = 0.0
                t0 = time.perf_counter()
                summary = predict(str(root / "model.pt"), [dicom], root / f"out-{attempt}")
                total = time.perf_counter() - t0 - summary["timings_s"]["load_model"]
                best = min(best or (total, summary, clock["s"]), (total, summary, clock["s"]), key=lambda r: r[0])
        total, summary, forward_in_run = best
        names = {c["id"]: c["name"] for c in stage2_categories()}
        real_s, vessel_fraction = min(
            _outputs_on_true_segments(root / f"truth-{k}", study, dicom.stem, grays, names, source.pixel_spacing_mm)
            for k in range(2))

    video = "MP4 through imageio-ffmpeg" if importlib.util.find_spec("imageio_ffmpeg") else "animated PNG: no imageio-ffmpeg"
    size = f"{n} frames of 512² (uint16 DICOM XA), scratch.resolution {cfg.scratch.resolution}, 2 threads"
    empty_outputs_s = summary["timings_s"]["write"]
    # the forward timed inside the same predict run: other jobs slow both alike
    overhead = (total - forward_in_run - empty_outputs_s + real_s) / forward_in_run
    return [
        Figure("forward alone", n / forward_s, "frames/s", note=f"{size}; {1000 * forward_s / n:.0f} ms/frame"),
        Figure("predict end to end (random weights: no mask kept)", n / total, "frames/s",
               note=f"{1000 * total / n:.0f} ms/frame; inference phase {summary['timings_s']['predict']:.2f} s "
                    f"(of which forward {forward_in_run:.2f} s), outputs {empty_outputs_s:.2f} s"),
        Figure("outputs on the cine's true Stage 2 segments", 1000 * real_s / n, "ms/frame",
               note=f"{100 * vessel_fraction:.1f} % of pixels labelled; merge, label maps, PNGs, skeleton lengths, "
                    f"video ({video})"),
        Figure("writing + post-processing, share of the forward", f"{100 * overhead:.0f}", "%",
               goal=f"<= {100 * GOAL_OVERHEAD:.0f} %", met=overhead <= GOAL_OVERHEAD,
               note="(end to end − its forward − outputs on empty masks + outputs on true segments) / its forward"),
        Figure("predict end to end with real-mask outputs", n / (total - empty_outputs_s + real_s), "frames/s",
               note="the end-to-end time with the outputs of the true segments"),
    ]
