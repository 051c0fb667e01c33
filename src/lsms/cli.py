"""The ``lsms`` command line: one sub-command per module, each with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from lsms import __version__
from lsms.text import HUB_OPT_IN_ENV, allowing_hub_models

# sub-command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("lsms.check", "integrity report of a dataset (missing files, sizes, masks, text, split leaks)"),
    "convert": ("lsms.convert", "convert an LViT or images/+masks/ dataset to the manifest format"),
    "profile": ("lsms.profile", "count parameters and FLOPs, time a CPU forward"),
    "synth": ("lsms.synth.cli", "generate a RefLiver-Synth referring liver-lesion CT dataset"),
    "train": ("lsms.train", "train LSMS on a dataset (one process, or many under torchrun)"),
    "evaluate": ("lsms.evaluate", "metrics of a trained model on a dataset split"),
    "predict": ("lsms.predict", "segment the lesion a sentence refers to in images, NIfTI volumes or DICOM series"),
    "serve": ("lsms.serve.cli", "a local web viewer: open an image, type sentences, see and download the masks"),
    "export": ("lsms.export", "export a trained model to ONNX or TorchScript (one file, runs without the training config)"),
    "demo": ("lsms.demo", "generate RefLiver-Synth, train tiny, evaluate and write a report (the main job)"),
}
MODEL_FILE_COMMANDS = ("train", "evaluate", "predict", "serve", "export", "demo")  # they load checkpoints or exported files


def plain_text(doc: str) -> str:
    """A docstring as help text: reStructuredText roles and literals (``:class:`X```, ````lsms````) as plain words."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return re.sub(r"``([^`]+)``", r"\1", doc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsms",
        description="Referring lesion segmentation with LSMS (Language-guided Scale-aware MedSegmentor).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"lsms {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        if name in MODEL_FILE_COMMANDS:
            p.add_argument("--allow-hub-model", action="store_true",
                           help="load a text encoder that a checkpoint or exported file names by HuggingFace hub id "
                                f"(from the local cache, else downloaded); the same as {HUB_OPT_IN_ENV}=1. Without "
                                "it such a file is refused before any network access")
        p.description = plain_text(p.description or "")  # a module docstring given as the description
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with allowing_hub_models(getattr(args, "allow_hub_model", False)):
            return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, OSError, TypeError, RuntimeError) as err:
        # User-facing errors carry their own fix (OSError: the path and the reason); no deep traceback unless asked.
        if args.verbose:
            raise
        print(f"lsms {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failure nobody foresaw: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"lsms {args.command}: unexpected error: {type(err).__name__}: {err} (rerun with -v for the traceback "
              "and report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
