"""``lsms check DATA``: integrity report of a dataset (any supported layout); exit status 1 on errors."""

from __future__ import annotations

import argparse
import json

from lsms.data.check import check_dataset
from lsms.data.layouts import scan_samples
from lsms.text import DEFAULT_MAX_TOKENS, DEFAULT_TEXT_ENCODER, Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="dataset folder: manifest.jsonl folder, LViT layout, or images/ + masks/")
    parser.add_argument("--split", choices=["train", "val", "test"], help="check one split only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (counts per split, all problems)")
    parser.add_argument("--text-encoder", help="tokenizer used to measure text length (default: the package's)")
    parser.add_argument("--max-tokens", type=int, help="token limit texts are checked against (default: the package's, 32)")
    parser.add_argument("--no-text-check", action="store_true", help="do not load a tokenizer (skip the length check)")
    parser.add_argument("--workers", type=int, default=0, help="processes reading files (0 = one per core, up to 8)")
    parser.add_argument("--strict", action="store_true", help="warnings also give a non-zero exit status")
    parser.add_argument("--limit", type=int, default=30, help="problems listed per kind in the text report")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="read files the dataset names outside its folder (absolute paths, .., links elsewhere); "
                             "off by default: they are errors and never opened")


def run(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 (one per core) or a positive number, got {args.workers}")
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    tokenizer = None
    if not args.no_text_check:
        _, records, _ = scan_samples(args.data, args.split, args.allow_outside_root)
        if any(r.text.strip() for r in records):
            tokenizer = Tokenizer(args.text_encoder or DEFAULT_TEXT_ENCODER, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS)
    report = check_dataset(args.data, split=args.split, tokenizer=tokenizer, workers=args.workers,
                           allow_outside_root=args.allow_outside_root)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text(limit=args.limit))
    return 0 if report.ok and not (args.strict and report.warnings) else 1
