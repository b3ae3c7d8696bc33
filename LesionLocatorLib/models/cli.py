"""`lesionlocator models list|download|path|clear`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Cancelled, LesionLocatorError
from .cache import clear_cache, user_cache_dir
from .download import download_model
from .registry import DOWNLOAD, REGISTRY, ModelStatus, get_source, list_models, model_root

MB = 1e6
DOWNLOADABLE = sorted(name for name, source in REGISTRY.items() if source.kind == DOWNLOAD)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="model cache folder (default: $LESIONLOCATOR_CACHE_DIR or the user cache)")
    commands = parser.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="show known models, their licence and whether they are installed")
    listing.add_argument("folders", nargs="*", help="local model folders to check as well")
    download = commands.add_parser("download", help="download, verify and install a model into the cache")
    download.add_argument("name", choices=DOWNLOADABLE)
    download.add_argument("--accept-licence", action="store_true", help="accept the model's licence (required)")
    download.add_argument("--force", action="store_true", help="download again even if it is installed")
    path = commands.add_parser("path", help="print the folder to pass as the model root")
    path.add_argument("model", help="a registered model name or a local model folder")
    clear = commands.add_parser("clear", help="delete downloaded models and their partial downloads (nothing else "
                                              "in the cache folder)")
    clear.add_argument("name", nargs="?", choices=DOWNLOADABLE, help="only this model (default: all)")


def run(args: argparse.Namespace) -> int:
    handlers = {"list": _list, "download": _download, "path": _path, "clear": _clear}
    try:
        return handlers[args.models_command](args)
    except (Cancelled, KeyboardInterrupt):
        print("Interrupted. Run the same command again to resume the download.", file=sys.stderr)
        return 130
    except LesionLocatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    rows = [("NAME", "KIND", "SIZE", "STATUS", "LICENCE")]
    rows += [_row(status) for status in list_models(args.cache_dir, tuple(args.folders))]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _row(status: ModelStatus) -> tuple[str, str, str, str, str]:
    source = status.source
    state = f"installed: {status.root}" if status.installed else status.problem
    return source.name, source.kind, _size(status), state, source.licence


def _size(status: ModelStatus) -> str:
    if status.installed:
        return f"{_folder_bytes(status.root) / MB:.1f} MB"
    if status.source.size_bytes:
        return f"{status.source.size_bytes / MB:.1f} MB (download)"
    return "unknown"


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _download(args: argparse.Namespace) -> int:
    reported = {"percent": -1}

    def progress(fraction: float, stage: str) -> None:
        percent = int(fraction * 100)
        if percent != reported["percent"]:
            reported["percent"] = percent
            print(f"\r{percent:3d}%  {stage[:100]:<100}", end="", file=sys.stderr, flush=True)

    root = download_model(args.name, args.cache_dir, accept_licence=args.accept_licence, progress=progress,
                          force=args.force)
    print(file=sys.stderr)
    print(root)
    return 0


def _path(args: argparse.Namespace) -> int:
    print(model_root(args.model, args.cache_dir))
    return 0


def _clear(args: argparse.Namespace) -> int:
    cache = user_cache_dir(args.cache_dir)
    archive_name = get_source(args.name).archive_name if args.name else None
    removed = clear_cache(cache, args.name, archive_name)
    for path in removed:
        print(f"deleted {path}")
    if not removed:
        print(f"nothing to delete in {cache}")
    return 0
