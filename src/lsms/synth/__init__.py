"""RefLiver-Synth: procedural referring liver-lesion CT slices (spec: shared/spec/refliver-synth.md).

Public API:
    SynthConfig: the settings of a run.
    generate_dataset(cfg, out): writes a dataset folder in the lsms format (manifest.jsonl, card, ...).
    render_slice(cfg, patient, slice): re-renders one slice with its liver mask, segment map, lesions and texts.
    load_phrasing(path): the templates and synonyms (packaged ``phrasings.yaml`` by default).
"""

from lsms.synth.config import LESION_TYPES, SynthConfig
from lsms.synth.expressions import load_phrasing
from lsms.synth.generate import (
           SliceSample,
           generate_dataset,
           lesion_diameter_mm,
           render_slice,
           split_of_patients,
)

__all__ = ["LESION_TYPES", "SliceSample", "SynthConfig", "generate_dataset", "lesion_diameter_mm", "load_phrasing",
           "render_slice", "split_of_patients"]
