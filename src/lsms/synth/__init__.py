"""RefLiver-Synth: procedural referring liver-lesion CT slices (spec: shared/spec/refliver-synth.md).

Public API:
    SynthConfig: the settings of a run.
    generate_dataset(cfg, out): writes a dataset folder in the lsms format (manifest.jsonl, card, ...).
    render_slice(cfg, patient, slice): re-renders one slice with its liver mask, segment map, lesions and texts.
    load_phrasing(path): the templates and synonyms (packaged ``phrasings.yaml`` by default).
    VolumeConfig, generate_volume_dataset(cfg, vcfg, out), render_volume: one CT volume per patient with 3D
        lesions and volume-level expressions, and its slices as the 2D dataset (docs/refliver-synth.md, "Volumes").
"""

from lsms.synth.config import LESION_TYPES, SynthConfig, VolumeConfig
from lsms.synth.expressions import load_phrasing
from lsms.synth.generate import (
           SliceSample,
           generate_dataset,
           lesion_diameter_mm,
           render_slice,
           split_of_patients,
)
from lsms.synth.volumes import VolumeSample, generate_volume_dataset, render_volume

__all__ = ["LESION_TYPES", "SliceSample", "SynthConfig", "VolumeConfig", "VolumeSample", "generate_dataset",
           "generate_volume_dataset", "lesion_diameter_mm", "load_phrasing", "render_slice", "render_volume",
           "split_of_patients"]
