"""What the commands that fit a small network into a model's manifest share (`fit-point-search`,
`fit-box-refinement`): the fitting data (synthetic lesions on training backgrounds, never the validation ones, plus
your annotated lesions), the common options, and writing the manifest without losing the entry it replaces."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import LesionLocatorError, require_at_least
from ..image import ImageVolume

# Training backgrounds with phantom seeds of their own (the validation phantoms are 90001-90003).
FITTING_BACKGROUNDS = ("abdomen_ct", "cranium_ct", "body_phantom:6101", "body_phantom:6102", "body_phantom:6103",
                       "head_phantom:6104", "head_phantom:6105")
DEFAULT_SEED = 777
PREVIOUS_MANIFEST = "lesionlocator_model.previous.json"


def add_data_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-m", "--model", required=True,
                        help=f"model root or name (the bundled one: lesionlocator-lite); its manifest gets the {what}")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the synthetic fitting set")
    parser.add_argument("--backgrounds", nargs="+", default=list(FITTING_BACKGROUNDS),
                        help="training backgrounds (never the validation ones)")
    parser.add_argument("--cases-per-background", type=int, default=16, help="0: no synthetic lesions")
    parser.add_argument("--lesions-per-case", type=int, default=3)
    parser.add_argument("--own-data", type=Path, metavar="DATASET",
                        help="also fit on your annotated CTs (nnU-Net raw dataset, imagesTr/labelsTr; see "
                             "`lesionlocator train --own-data`)")
    parser.add_argument("--dry-run", action="store_true", help="report, but leave the manifest as it is")
    parser.add_argument("-device", "--device", default="cpu")


def check_backgrounds(backgrounds: Sequence[str]) -> None:
    from ..synthetic.backgrounds import check_background_name
    from ..synthetic.cases import VALIDATION_BACKGROUNDS

    for name in backgrounds:
        check_background_name(name)
    held_out = sorted(set(backgrounds) & set(VALIDATION_BACKGROUNDS))
    if held_out:
        raise LesionLocatorError(f"{held_out} are validation backgrounds; fitting on them would leak into "
                                 "`lesionlocator evaluate`. Use training backgrounds (default: "
                                 f"{FITTING_BACKGROUNDS}).")


def check_fit_settings(args: argparse.Namespace, at_least_one: dict[str, int]) -> None:
    """Before minutes of fitting data: the shared data options (`add_data_arguments`) and a command's own counts,
    named by their options, that must be at least 1."""
    require_at_least(0, {"--seed": args.seed, "--cases-per-background": args.cases_per_background})
    require_at_least(1, {"--lesions-per-case": args.lesions_per_case, **at_least_one})
    check_backgrounds(args.backgrounds)


def synthetic_cases(args: argparse.Namespace) -> list:
    """The validation-style synthetic cases (with their jittered boxes and clicks) that the options ask for."""
    from ..synthetic.cases import make_validation_set

    if args.cases_per_background <= 0:
        return []
    return make_validation_set(args.seed, args.backgrounds, args.cases_per_background, args.lesions_per_case)


def own_lesions(dataset: Path) -> Iterator[tuple[ImageVolume, np.ndarray]]:
    """(image, one lesion's mask) for each lesion of an annotated nnU-Net raw dataset's training split."""
    from .own_data import dataset_cases, read_case

    for _, image_path, label_path in dataset_cases(dataset, "Tr"):
        image, masks = read_case(image_path, label_path)
        for mask in masks:
            yield image, mask


def write_manifest(root: Path, manifest: dict, replaces: bool) -> str:
    """Write a model root's manifest; when it `replaces` a fitted entry, the manifest that held it is kept as
    PREVIOUS_MANIFEST. Returns what was done, for the user."""
    from ..models.layout import MODEL_MANIFEST

    path = root / MODEL_MANIFEST
    kept = ""
    if replaces:
        previous = path.with_name(PREVIOUS_MANIFEST)
        previous.write_text(path.read_text())
        kept = f"; the manifest it replaces is kept as {previous}"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return f"wrote {path}{kept}"


def progress_printer(what: str) -> Callable[[int], None]:
    """A progress callback that rewrites one stderr line: `what`, how many are done, seconds since it was made."""
    started = time.perf_counter()
    return lambda done: print(f"\r{what}: {done} ({time.perf_counter() - started:.0f} s)", end="", file=sys.stderr)
