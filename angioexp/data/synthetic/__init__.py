"""Synthetic coronary angiography in the researcher's index.csv layout (``angioexp synth``).

Physically motivated: a 3D SYNTAX-labelled coronary tree per patient (:mod:`.anatomy`), C-arm
perspective projection at the standard views (:mod:`.projection`), Beer–Lambert rendering of
tubes and thorax with quantum/detector noise (:mod:`.raster`, :mod:`.render`), a cine with
contrast wash-in/out and cardiac/respiratory motion (:mod:`.motion`), and clean, per-segment
and DeepSA-like pseudo-labels (:mod:`.labels`).
"""

from angioexp.data.synthetic.generator import (
    GENERATOR_VERSION,
    generate,
    knob_names,
    measure_throughput,
    plan_study,
)

__all__ = ["GENERATOR_VERSION", "generate", "knob_names", "measure_throughput", "plan_study"]
