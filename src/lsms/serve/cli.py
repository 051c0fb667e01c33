"""``lsms serve RUN_OR_CHECKPOINT``: start the local viewer and print its address.

    lsms serve demo-report/run                 # http://127.0.0.1:7860/
    lsms serve runs/x/best.pt --port 8000 --open
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
import webbrowser

from lsms.predict import add_mismatch_argument
from lsms.serve.app import MAX_UPLOAD_MB

log = logging.getLogger("lsms.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder (best.pt, else last.pt) or a .pt file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other address is reachable "
                        "from the network, with no authentication, and is warned about)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run folder")
    p.add_argument("--max-megapixels", type=float, default=None,
                   help="largest image or slice accepted (default: lsms' reader limit, 33.5 megapixels, "
                        "environment variable LSMS_MAX_IMAGE_PIXELS)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest upload accepted (default {MAX_UPLOAD_MB})")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")
    add_mismatch_argument(p)


def run(args: argparse.Namespace) -> int:
    from lsms.checkpoint import resolve_checkpoint
    from lsms.predict import Predictor
    from lsms.serve.app import Viewer
    from lsms.serve.http import ViewerServer, is_loopback

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(args.model, prefer=args.checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, args.device, allow_modality_mismatch=args.allow_modality_mismatch)
    viewer = Viewer(predictor, model_name=str(args.model), checkpoint=checkpoint,
                    max_megapixels=args.max_megapixels, max_upload_mb=args.max_upload_mb)
    if not is_loopback(args.host):
        log.warning("bound to %s: anyone who can reach this machine can use the viewer and upload files to it "
                    "(no authentication, no encryption). Use the default --host 127.0.0.1 unless this network is "
                    "trusted.", args.host)
    try:
        server = ViewerServer(viewer, args.host, args.port)
    except OSError as err:
        viewer.close()
        raise RuntimeError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
                           "choose another --port (0 picks a free one)") from None
    print(f"lsms serve: {server.url}  (model {checkpoint}; ready in "
          f"{time.perf_counter() - started:.1f} s; Ctrl+C stops it and deletes every upload)", flush=True)
    if args.open:
        webbrowser.open(server.url)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` cleans up as Ctrl+C does
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
