"""``lsms export``: a trained model as one deployable file (ONNX or TorchScript) that runs without lsms's
training config, with its text encoder inside (the file takes token ids, not embeddings).

    lsms export RUN_OR_CHECKPOINT --format onnx --out lsms.onnx [--image-size N] [--max-tokens T]
                [--dynamic-batch | --batch N] [--quantize int8 --calibration DATA]
    lsms predict lsms.onnx images/ --text "..." --out preds/            # ONNX Runtime, picked from the suffix
    lsms evaluate lsms.onnx DATA --split test                           # same metrics as the checkpoint

The file carries what prediction needs as :class:`ExportMetadata` (JSON; ONNX: the model's metadata entry
``lsms``; TorchScript: the archive's extra file ``lsms.json``): the preprocessing (intensity window or
scaling, image size, channels), the tokenizer (name and maximum tokens), the probability threshold, the
model config and where it came from. Graph inputs: ``image`` float32 (B, C, H, W) at the exported size and,
for a text model, ``input_ids`` / ``attention_mask`` int64 (B, T) with T <= max tokens; outputs ``logits``
(B, 1, H, W) and, for a model with an existence head, ``existence`` (B,) (its logits). The batch is fixed (``--batch``, default 1; the backends split larger batches) unless
``--dynamic-batch``.

``--quantize int8`` (ONNX only) quantises convolutions and matrix products statically (int8 weights per
channel, uint8 activations, QDQ format), with activation ranges calibrated on ``--calibration DATA`` (the
training split, ``--calibration-samples`` images). Check its accuracy with ``lsms evaluate`` before use.

After writing, the export is run once on an example and compared with the PyTorch model; the largest
logit difference is printed (an fp32 export differs by rounding: 1e-6 to 2e-4 of the logits seen).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lsms.export_metadata import ExportMetadata
from lsms.spec import ModelSpec

FORMATS = ("onnx", "torchscript")
QUANTIZE = ("int8",)
EXAMPLE_SENTENCE = "a hypodense lesion in segment VI of the right lobe"


# --------------------------------------------------------------------------- exporting


def example_inputs(model: nn.Module, spec: ModelSpec, batch: int) -> tuple[Tensor, ...]:
    """Inputs to trace with: random images at the spec's size and a sentence padded to its ``max_tokens``."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, spec.in_channels, *spec.image_size, generator=generator)
    if not spec.model.use_text:
        return (image,)
    enc = model.tokenizer.hf([EXAMPLE_SENTENCE] * batch, padding="max_length", truncation=True,
                             max_length=spec.max_tokens, return_tensors="pt")
    return image, enc["input_ids"], enc["attention_mask"]


def export_model(model_path: str | Path, out: str | Path, export_format: str = "onnx",
                 image_size: int | None = None, max_tokens: int | None = None, batch: int | None = 1,
                 quantize: str | None = None, calibration: str | Path | None = None,
                 calibration_samples: int = 32, prefer: str = "best") -> tuple[Path, ExportMetadata, float]:
    """Export a run folder or checkpoint to ``out``.

    Args:
        model_path: run folder or checkpoint.
        out: the file to write (atomically).
        export_format: ``onnx`` or ``torchscript``.
        image_size: square input size (multiple of 32); default the checkpoint's.
        max_tokens: maximum tokens per sentence; default the model's.
        batch: fixed batch size, or None for any batch.
        quantize: None or ``int8`` (ONNX only; needs ``calibration``).
        calibration: dataset whose training split calibrates int8 activation ranges.
        calibration_samples: how many of its images.

    Returns:
        (path written, its metadata, largest |logit difference| to the PyTorch model on an example).
    """
    from lsms.checkpoint import load_trained

    if quantize and calibration is None:
        raise ValueError("--quantize int8 needs --calibration DATA: a few training images set the activation ranges")
    model, spec, checkpoint = load_trained(model_path, "cpu", prefer=prefer, image_size=image_size, batch=batch or 2)
    spec = exported_spec(model, spec, image_size, max_tokens)
    feeds = calibration_feeds(Path(calibration), spec, batch or 1, calibration_samples) if quantize else None
    return export_network(model, spec, out, export_format, batch, quantize, feeds,
                          source=str(checkpoint["path"]), epoch=checkpoint.get("epoch"))


def exported_spec(model: nn.Module, spec: ModelSpec, image_size: int | None, max_tokens: int | None) -> ModelSpec:
    """The spec of an export at another square ``image_size`` or ``max_tokens`` (None: the checkpoint's)."""
    if max_tokens is not None and spec.model.use_text:
        limit = int(model.text_encoder.backbone.config.max_position_embeddings)
        if not 3 <= max_tokens <= limit:
            raise ValueError(f"--max-tokens must lie in 3..{limit} (the text encoder's positions), got {max_tokens}")
    return spec.with_input(image_size=image_size, max_tokens=max_tokens)


def export_network(model: nn.Module, spec: ModelSpec, out: str | Path, export_format: str = "onnx",
                   batch: int | None = 1, quantize: str | None = None,
                   calibration: list[dict[str, Any]] | None = None, source: str = "", epoch: int | None = None
                   ) -> tuple[Path, ExportMetadata, float]:
    """Export an in-memory model (eval mode; its BatchNorms are folded in place) for the input ``spec`` (see
    :func:`exported_spec`; the file stores it as it is).

    ``calibration``: int8 calibration inputs, a list of {graph input name: array} (see :func:`calibration_feeds`).
    Other arguments and the result as in :func:`export_model`.
    """
    from lsms import __version__
    from lsms.backends import load_backend
    from lsms.model.fuse import fuse_conv_bn

    if export_format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize and export_format != "onnx":
        raise ValueError("--quantize int8 is offered for --format onnx only")
    if quantize and not calibration:
        raise ValueError("--quantize int8 needs calibration inputs (--calibration DATA)")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    fuse_conv_bn(model.eval())
    inputs = example_inputs(model, spec, batch or 2)
    graph = Graph(model)
    with torch.inference_mode():
        reference = graph(*inputs)
    metadata = ExportMetadata(
        export_format=export_format, spec=spec, batch=batch, quantize=quantize,
        inputs=("image", "input_ids", "attention_mask") if spec.model.use_text else ("image",),
        outputs=("logits", "existence") if graph.existence else ("logits",),
        source=source, epoch=epoch, lsms_version=__version__,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if export_format == "onnx":
            _export_onnx(graph, inputs, metadata, tmp)
            if quantize:
                quantize_int8(tmp, calibration)
        else:
            _export_torchscript(graph, inputs, metadata, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; an export is a file to share
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    got = [y for y in load_backend(out).answer(*inputs) if y is not None]
    diff = max(float((a - b).abs().max()) for a, b in zip(got, reference if graph.existence else [reference], strict=True))
    return out, metadata, diff


def _umask() -> int:
    """The process's file-creation mask (read by setting it, then put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Graph(nn.Module):
    """What an exported file computes: the network's logits, and its existence logits when it has the head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.existence = getattr(model, "existence", None) is not None

    def forward(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        out = self.model.forward_features(image, input_ids, attention_mask)
        return (out.logits, out.existence) if self.existence else out.logits


def calibration_feeds(data: Path, spec: ModelSpec, batch: int, samples: int) -> list[dict[str, Any]]:
    """Up to ``samples`` training images (and sentences) of ``data`` as inputs of the graph ``spec`` describes,
    ``batch`` per feed."""
    from lsms.data import Collator, SegmentationDataset, load_samples
    from lsms.model.build import tokenizer_for

    if samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {samples}")
    records = load_samples(data, split="train")[:samples]
    if len(records) < batch:
        raise ValueError(f"{data}: {len(records)} training samples are fewer than one batch of {batch} to calibrate with")
    dataset = SegmentationDataset(records, spec.preprocessing, augment=False)
    tokenizer = tokenizer_for(spec.model.text) if spec.model.use_text else None
    collate = Collator(tokenizer)
    feeds = []
    for start in range(0, len(dataset) - batch + 1, batch):
        items = collate([dataset[i] for i in range(start, start + batch)])
        feed = {"image": items["image"].numpy()}
        if tokenizer is not None:
            feed.update(input_ids=items["input_ids"].numpy(), attention_mask=items["attention_mask"].numpy())
        feeds.append(feed)
    return feeds


def _export_onnx(model: nn.Module, inputs: tuple[Tensor, ...], metadata: ExportMetadata, path: Path) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise RuntimeError("ONNX export needs onnx and onnxscript: pip install 'lsms[export]'") from None
    names = list(metadata.inputs)
    shapes: list[dict[int, Any]] = [{} for _ in names]
    if metadata.batch is None:
        batch_dim = torch.export.Dim("batch", min=1, max=1024)
        shapes = [{0: batch_dim} for _ in names]
    if len(names) == 3:  # sentences of any length up to max_tokens
        tokens = torch.export.Dim("tokens", min=2, max=metadata.spec.max_tokens)
        shapes[1][1] = shapes[2][1] = tokens
    with _quiet_exporter():
        program = torch.onnx.export(model, inputs, dynamo=True, input_names=names, output_names=list(metadata.outputs),
                                    dynamic_shapes=tuple(shapes), external_data=False, verbose=False)
        program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    _set_metadata(proto, metadata)
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines, pass reports and deprecation notes are not the user's business."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _set_metadata(proto: Any, metadata: ExportMetadata) -> None:
    for entry in list(proto.metadata_props):
        if entry.key == ExportMetadata.KEY:
            proto.metadata_props.remove(entry)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ExportMetadata.KEY, metadata.to_json()


def _export_torchscript(model: nn.Module, inputs: tuple[Tensor, ...], metadata: ExportMetadata, path: Path) -> None:
    with torch.no_grad(), _quiet_exporter():
        traced = torch.jit.trace(model, inputs, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={ExportMetadata.FILE: metadata.to_json()})


def quantize_int8(path: Path, feeds: list[dict[str, Any]]) -> None:
    """Static int8 quantisation of the fp32 ``lsms export`` ONNX file at ``path``, in place (QDQ, per-channel
    weights), calibrated on ``feeds`` (see :func:`calibration_feeds`); its metadata says ``quantize: int8``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    proto = onnx.load(str(path))
    entry = {e.key: e.value for e in proto.metadata_props}.get(ExportMetadata.KEY)
    metadata = dataclasses.replace(ExportMetadata.from_json(entry, path), quantize="int8")
    del proto
    pre = path.with_name(path.name + ".pre.onnx")
    try:
        with _quiet_exporter():
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul"])
    finally:
        pre.unlink(missing_ok=True)
    proto = onnx.load(str(path))
    _set_metadata(proto, metadata)
    onnx.save(proto, str(path))


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder (uses best.pt, else last.pt) or a .pt file")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (ONNX Runtime) or torchscript (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write, e.g. lsms-tiny.onnx")
    p.add_argument("--image-size", type=int, metavar="N", help="square input size, multiple of 32 (default: the training size)")
    p.add_argument("--max-tokens", type=int, metavar="T", help="maximum tokens per sentence (default: the model's)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, metavar="N", help="fixed batch size of the graph (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="a graph that takes any batch size")
    p.add_argument("--quantize", choices=QUANTIZE, help="int8: static int8 quantisation (ONNX only; needs --calibration)")
    p.add_argument("--calibration", metavar="DATA", help="dataset whose training split calibrates --quantize int8")
    p.add_argument("--calibration-samples", type=int, default=32, metavar="N", help="images used to calibrate (default 32)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run folder")


def run(args: argparse.Namespace) -> int:
    path, metadata, diff = export_model(
        args.model, args.out, args.format, args.image_size, args.max_tokens,
        None if args.dynamic_batch else args.batch, args.quantize, args.calibration, args.calibration_samples,
        prefer=args.checkpoint,
    )
    size_mb = path.stat().st_size / 2**20
    batch = "any batch" if metadata.batch is None else f"batch {metadata.batch}"
    (h, w), tokens = metadata.spec.image_size, metadata.spec.max_tokens
    print(f"wrote {path} ({size_mb:.1f} MB, {metadata.export_format}"
          f"{', ' + metadata.quantize if metadata.quantize else ''}; {h}x{w}, {batch}"
          f"{f', up to {tokens} tokens' if tokens else ''})")
    print(f"largest |logit difference| to the PyTorch model on an example: {diff:.2e}")
    print(f"use it: lsms predict {path} IMAGES --text \"...\" --out DIR   |   lsms evaluate {path} DATA --split test")
    return 0
