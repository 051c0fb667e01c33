"""Inference backends: one interface over a checkpoint run in PyTorch and an ``lsms export`` file run in
ONNX Runtime or TorchScript. ``lsms predict`` and ``lsms evaluate`` use it, so every backend gives the same
masks and the same metrics.

    backend = load_backend("runs/demo")                        # a run folder or checkpoint: PyTorch
    backend = load_backend("lsms-tiny.onnx")                   # an exported file: ONNX Runtime
    tokens = backend.tokenize(["the larger cyst in segment VI"])
    logits = backend(image, tokens["input_ids"], tokens["attention_mask"])  # (B, 1, H, W), CPU float32
    logits, existence = backend.answer(image, tokens["input_ids"], tokens["attention_mask"])  # + (B,) or None

Every backend holds the model's :class:`~lsms.spec.ModelSpec` (``backend.spec``: model config, preprocessing,
tokenizer settings, thresholds), read from the checkpoint or from the exported file's metadata
(:class:`lsms.export_metadata.ExportMetadata`), so an exported file runs without the training config. Only the PyTorch backend
returns the encoder's stage features (``forward_features``), which the feature heat maps need.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lsms.metrics import check_threshold
from lsms.model.fuse import fuse_conv_bn
from lsms.optim import autocast, inference_dtype
from lsms.spec import ModelSpec, WithSpec

BACKENDS = ("torch", "onnxruntime", "torchscript")
TEXT_CACHE_SIZE = 256  # sentences whose text features the PyTorch backend keeps


class Backend(WithSpec):
    """A trained model with what prediction needs: its ``spec`` (:class:`~lsms.spec.ModelSpec`; ``config``,
    ``preprocessing``, ``threshold`` (probability above which a pixel is lesion), ``existence_threshold`` (the
    existence score below which the described lesion is "not found"; None: never) and ``max_prob_threshold``
    (with an existence head: the threshold of the highest-probability score, for comparison) read from it),
    ``tokenizer`` (None without text), ``source`` (the checkpoint it came from) and ``epoch``. Calling it maps
    image (B, C, H, W) float32 and ids/mask (B, T) to logits (B, 1, H, W) on the CPU; :meth:`answer` adds the
    existence head's logits (B,) (None for a model without the head).
    """

    name = ""

    def __init__(self, spec: ModelSpec, tokenizer: Any | None, source: str, epoch: int | None):
        self.spec, self.tokenizer, self.source, self.epoch = spec, tokenizer, source, epoch

    @property
    def uses_text(self) -> bool:
        return self.tokenizer is not None

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        if self.tokenizer is None:
            raise ValueError("this model was trained without text (use_text=False); it takes images only")
        return self.tokenizer(texts)

    def __call__(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """image (B, C, H, W), input_ids/attention_mask (B, T) -> logits (B, 1, H, W), float32 on the CPU."""
        return self.answer(image, input_ids, attention_mask)[0]

    def answer(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
        """As calling it, plus the existence head's logits (B,) float32 on the CPU (None without the head)."""
        raise NotImplementedError

    def check_features(self) -> None:
        """Refuse, before any input is read, to give stage feature maps where this backend has none."""
        raise ValueError(
            f"the {self.name} backend returns logits only; the stage feature maps (--features) need the "
            "PyTorch model: give the run folder or checkpoint with --backend torch"
        )

    def forward_features(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None):
        self.check_features()


class TorchBackend(Backend):
    """The PyTorch model in eval mode, made fast where it is cheap: inference mode, a cache of text features for repeated
    sentences (one image with many sentences, or many images with one sentence, encode each sentence once) and,
    with ``optimize``, Conv+BatchNorm folded (:func:`fuse_conv_bn`) and channels-last memory layout.

    Args:
        model: an LSMS model or baseline.
        spec: its :class:`~lsms.spec.ModelSpec` (the preprocessing it was trained with, the thresholds).
        device: where to run it.
        optimize: fold Conv+BatchNorm and switch to channels-last (changes the module tree: only for a model
            that is not trained or saved afterwards).
        text_cache: how many sentences' text features to keep (0: none).
        dtype: autocast dtype (None: fp32); :func:`load_backend` takes the training's choice
            (:func:`lsms.optim.inference_dtype`).
    """

    name = "torch"

    def __init__(self, model: nn.Module, spec: ModelSpec, device: torch.device | str = "cpu", source: str = "",
                 epoch: int | None = None, optimize: bool = False, text_cache: int = TEXT_CACHE_SIZE,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        self.channels_last = optimize
        if optimize:
            fuse_conv_bn(self.model).to(memory_format=torch.channels_last)
        super().__init__(spec, getattr(model, "tokenizer", None), source, epoch)
        self.text_cache_size = text_cache
        self._text_cache: OrderedDict[bytes, tuple[Tensor, ...]] = OrderedDict()

    @torch.inference_mode()
    def answer(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
        with autocast(self.device, self.dtype):  # the text features of _inputs too
            image, input_ids, attention_mask, text = self._inputs(image, input_ids, attention_mask)
            out = self.model.forward_features(image, input_ids, attention_mask, text=text)
        existence = out.existence.float().cpu() if out.existence is not None else None
        return out.logits.float().cpu(), existence

    def check_features(self) -> None:
        """The PyTorch model gives its stage feature maps."""

    @torch.inference_mode()
    def forward_features(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None):
        with autocast(self.device, self.dtype):
            image, input_ids, attention_mask, text = self._inputs(image, input_ids, attention_mask)
            return self.model.forward_features(image, input_ids, attention_mask, text=text)

    def _inputs(self, image: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None) -> tuple:
        """On the device, with the text features from the cache: the model's (image, ids, mask, text)."""
        image = image.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if input_ids is None or attention_mask is None or not self.uses_text:
            return image, input_ids, attention_mask, None
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if not self.text_cache_size:
            return image, input_ids, attention_mask, None
        return image, input_ids, attention_mask, self.encode_text(input_ids, attention_mask)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        """The model's ``encode_text`` per sentence, from the cache where the same (ids, mask) row was seen."""
        keys = [ids.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes()
                for ids, mask in zip(input_ids, attention_mask, strict=True)]
        todo = sorted({i for i, k in enumerate(keys) if k not in self._text_cache})
        if todo:
            new = self.model.encode_text(input_ids[todo], attention_mask[todo])  # each (len(todo), ...)
            for j, i in enumerate(todo):
                self._text_cache[keys[i]] = tuple(t[j:j + 1] for t in new)
                if len(self._text_cache) > self.text_cache_size:
                    self._text_cache.popitem(last=False)
        for k in keys:
            self._text_cache.move_to_end(k)
        rows = [self._text_cache[k] for k in keys]
        return tuple(torch.cat(parts) for parts in zip(*rows, strict=True))


class ExportedBackend(Backend):
    """Common part of the exported-file backends: the file's metadata, input checks, fixed-batch chunking."""

    def __init__(self, path: Path, metadata: Any, batch: int = 1):
        from lsms.model.build import tokenizer_for

        self.path, self.metadata = path, metadata
        spec = metadata.spec
        spec.check_text_source(str(path))
        batch = metadata.batch or batch  # a fixed-batch graph runs its batch whatever it is given
        spec.check_memory(batch, source=f"{path}: its image size with batch {batch}", fix="use a smaller batch; if "
                          "the file is genuine, export the model again at a smaller size (lsms export --image-size N)")
        super().__init__(spec, tokenizer_for(spec.model.text) if spec.model.use_text else None, metadata.source,
                         metadata.epoch)

    def _check(self, image: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None) -> None:
        C, (H, W) = self.spec.in_channels, self.spec.image_size
        if image.ndim != 4 or tuple(image.shape[1:]) != (C, H, W):
            raise ValueError(f"{self.path}: the exported model takes images (B, {C}, {H}, {W}), got "
                             f"{tuple(image.shape)}; export again with --image-size for another size")
        if not self.uses_text:
            return
        if input_ids is None or attention_mask is None:
            raise ValueError("this model uses text: pass input_ids and attention_mask (see backend.tokenize)")
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2 or input_ids.shape[0] != image.shape[0]:
            raise ValueError(f"input_ids and attention_mask must both be (B, T) with B = {image.shape[0]} images, "
                             f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if input_ids.shape[1] > self.spec.max_tokens:
            raise ValueError(f"{self.path}: at most {self.spec.max_tokens} tokens per sentence (the export's "
                             f"--max-tokens), got {input_ids.shape[1]}")
        if not bool(attention_mask[:, 0].all()):
            raise ValueError("every expression needs at least one real token (attention_mask[:, 0] must be 1)")

    def answer(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
        self._check(image, input_ids, attention_mask)
        inputs = [image.float()] + ([input_ids.long(), attention_mask.long()] if self.uses_text else [])
        fixed = self.metadata.batch
        if fixed is None or image.shape[0] == fixed:
            outputs = self._run(inputs)
        else:  # a fixed-batch export: run in chunks of its batch, the last one padded by repeating its final sample
            chunks = []
            for start in range(0, image.shape[0], fixed):
                chunk = [x[start:start + fixed] for x in inputs]
                n = chunk[0].shape[0]
                if n < fixed:
                    chunk = [torch.cat([x, x[-1:].expand(fixed - n, *x.shape[1:])]) for x in chunk]
                chunks.append([y[:n] for y in self._run(chunk)])
            outputs = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def _run(self, inputs: list[Tensor]) -> list[Tensor]:
        """The graph's outputs (``metadata.outputs``: logits, and existence logits with the head), float32."""
        raise NotImplementedError


class OnnxRuntimeBackend(ExportedBackend):
    """An ``lsms export --format onnx`` file in ONNX Runtime (CPU).

    Args:
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
    """

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, batch: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError("the onnxruntime backend needs ONNX Runtime: pip install 'lsms[export]'") from None
        import onnx

        from lsms.export_metadata import ExportMetadata

        try:  # the metadata first: a file lsms did not write is named as such, whatever ONNX Runtime makes of it
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as err:  # onnx raises protobuf's and its own exception types for damaged files
            raise ValueError(f"{path}: not a readable ONNX file ({type(err).__name__})") from None
        metadata = ExportMetadata.from_json(props.get(ExportMetadata.KEY), path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for damaged files
            raise ValueError(f"{path}: ONNX Runtime cannot load this file ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
        super().__init__(path, metadata, batch)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _run(self, inputs: list[Tensor]) -> list[Tensor]:
        feed = {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, inputs, strict=True)}
        return [torch.from_numpy(np.asarray(y, dtype=np.float32)) for y in self.session.run(None, feed)]


class TorchScriptBackend(ExportedBackend):
    """An ``lsms export --format torchscript`` file, run by ``torch.jit``."""

    name = "torchscript"

    def __init__(self, path: Path, device: torch.device | str = "cpu", batch: int = 1):
        from lsms.export_metadata import ExportMetadata

        self.device = torch.device(device)
        extra = {ExportMetadata.FILE: ""}
        try:
            self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra).eval()
        except Exception as err:  # RuntimeError for damaged or foreign archives
            raise ValueError(f"{path}: not a loadable TorchScript file ({type(err).__name__})") from None
        super().__init__(path, ExportMetadata.from_json(extra[ExportMetadata.FILE] or None, path), batch)

    @torch.inference_mode()
    def _run(self, inputs: list[Tensor]) -> list[Tensor]:
        outputs = self.module(*(x.to(self.device) for x in inputs))
        return [y.float().cpu() for y in (outputs if isinstance(outputs, (tuple, list)) else [outputs])]


def file_backend(path: Path) -> str:
    """The backend a file is meant for: ``onnxruntime`` (ONNX), ``torchscript`` (a TorchScript archive) or
    ``torch`` (an lsms checkpoint, or a run folder)."""
    if path.is_dir():
        return "torch"
    if path.suffix.lower() == ".onnx":
        return "onnxruntime"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "torch"  # not a zip archive: the checkpoint loader gives the precise error
    return "torchscript" if any(n.split("/")[1:2] == ["code"] for n in names) else "torch"


def load_backend(model: str | Path, backend: str | None = None, device: str = "auto", prefer: str = "best",
                 threads: int | None = None, threshold: float | None = None, batch: int = 1) -> Backend:
    """A backend for a run folder, checkpoint or exported file.

    Args:
        model: run folder or ``.pt`` checkpoint (backend ``torch``), ``.onnx`` file (``onnxruntime``) or
            TorchScript file from ``lsms export`` (``torchscript``).
        backend: one of :data:`BACKENDS`; None picks the one the file is for.
        device: for the PyTorch backends (ONNX Runtime runs on the CPU).
        prefer: which checkpoint of a run folder (``best`` or ``last``).
        threads: ONNX Runtime intra-op threads.
        threshold: override the model's probability threshold.
        batch: images per forward the caller will give: inference on that many images at the model's image size is
            checked against the memory limit before the model is built (:func:`lsms.spec.check_memory`).
    """
    from lsms.distributed import pick_device

    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist (a run folder, a checkpoint or an exported file)")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kind = file_backend(path)
    backend = backend or kind
    if backend != kind:
        what = {"torch": "a checkpoint (or run folder)", "onnxruntime": "an ONNX file",
                "torchscript": "a TorchScript file"}[kind]
        raise ValueError(f"{path} is {what}: use --backend {kind}, or export it with 'lsms export' for {backend}")
    if threshold is not None:
        check_threshold(threshold)
    if backend == "onnxruntime":
        loaded: Backend = OnnxRuntimeBackend(path, threads, batch)
    elif backend == "torchscript":
        loaded = TorchScriptBackend(path, pick_device(device), batch)
    else:
        from lsms.checkpoint import load_trained

        dev = pick_device(device)
        net, spec, checkpoint = load_trained(path, dev, prefer=prefer, batch=batch)
        trained = (checkpoint.get("amp") or {}).get("dtype", "fp32")
        loaded = TorchBackend(net, spec, dev, source=checkpoint["path"], epoch=checkpoint.get("epoch"),
                              optimize=True, dtype=inference_dtype(trained, dev))
    if threshold is not None:
        loaded.spec = loaded.spec.with_input(threshold=threshold)
    return loaded


def add_backend_argument(p: Any) -> None:
    """The ``--backend`` option of ``lsms predict`` and ``lsms evaluate``."""
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch (a run folder or checkpoint), onnxruntime (.onnx) or torchscript (files from "
                        "'lsms export'); default: the one the file is for")


__all__ = ["BACKENDS", "Backend", "OnnxRuntimeBackend", "TorchBackend", "TorchScriptBackend", "add_backend_argument",
           "load_backend"]
