"""`LesionLocator_segment` / `lesionlocator segment`: drop-in for the official segmentation command line.

Official flags: -i -p -o -t point|box -m -f -step_size --disable_tta -device --continue_prediction (and -npp -nps
--disable_progress_bar, accepted for compatibility). Files or folders (paired by name); outputs
`<stem>_lesion_<id>.nii.gz`. Existing outputs are never overwritten unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LesionLocatorError, PromptError
from .image import ImageVolume, image_stem, is_image_file, read_image, write_mask, write_volume
from .intensity_check import expects_hounsfield_units, hu_warning
from .prompts import MaskPrompt, Prompt, load_prompt_json, prompt_kind, split_instance_mask

@dataclass
class Case:
    image_path: Path
    prompt_path: Path

    @property
    def stem(self) -> str:
        return image_stem(self.image_path)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None,
                        help="checkpoint root folder (official layout: LesionLocatorSeg/..., LesionLocatorTrack) or a "
                             "registered model name (see `lesionlocator models list`); default: bundled LesionLocator-Lite")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=None, help="folds to ensemble (default: preset)")
    parser.add_argument("-device", "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--preset", choices=("fast", "accurate"), default="accurate",
                        help="fast = fold 0 without TTA; accurate = all folds with TTA (official default)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on the CPU (faster, less exact)")
    parser.add_argument("--disable_point_search", action="store_true",
                        help="answer points with the point network alone, even where the model asks for a point "
                             "search (the bundled Lite model does: its box network on cubes around the click)")
    parser.add_argument("--disable_point_extent", action="store_true",
                        help="within the point search, answer every click by its cubes, even where the model holds "
                             "an extent network (the bundled Lite model does: it predicts the clicked lesion's box)")
    parser.add_argument("--disable_box_refinement", action="store_true",
                        help="answer boxes (and, when tracking, follow-ups) with the network alone, even where the "
                             "model holds a box refinement (the bundled Lite model does: a fitted correction from the "
                             "image in the box)")
    parser.add_argument("--disable_box_fine_grid", action="store_true",
                        help="answer small boxes on the box network's planned grid, even where the model asks for a "
                             "finer one (the bundled Lite model does, for boxes under 16 mm)")
    parser.add_argument("-npp", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-nps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress on stderr")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="image file, DICOM series folder, or folder of images")
    parser.add_argument("-p", "--prompt", required=True,
                        help="prompt JSON or lesion mask (file), or a folder of them paired with the images by name")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("-t", "--prompt_type", choices=("point", "box"), required=True,
                        help="model to use; a mask prompt becomes boxes (box) or centroids (point)")
    parser.add_argument("-step_size", "--step_size", type=float, default=0.5, help="sliding-window step (fraction)")
    parser.add_argument("--continue_prediction", action="store_true", help="skip cases whose outputs exist")
    parser.add_argument("--mode", choices=("roi", "exact"), default="roi",
                        help="roi: preprocess only around each prompt (fast); exact: whole image, as official")
    parser.add_argument("--probabilities", action="store_true", help="also write <stem>_lesion_<id>_prob.nii.gz")
    add_model_options(parser)


def resolve_model_root(model: str | None) -> Path:
    """A registered model name, a folder, or (default) the bundled LesionLocator-Lite model."""
    from .models.registry import model_root

    return model_root(model or "lesionlocator-lite")


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and not any(is_image_file(p) for p in path.iterdir())


def find_cases(image_arg: str, prompt_arg: str) -> list[Case]:
    images, prompts = Path(image_arg), Path(prompt_arg)
    if not images.exists():
        raise LesionLocatorError(f"Input not found: {images}")
    if not prompts.exists():
        raise LesionLocatorError(f"Prompt not found: {prompts}")
    if is_image_file(images) or _is_dicom_folder(images):
        if prompts.is_dir():
            raise LesionLocatorError("A single image needs a single prompt file (-p), not a folder.")
        return [Case(images, prompts)]
    if not prompts.is_dir():
        raise LesionLocatorError("A folder of images (-i) needs a folder of prompts (-p) named like the images.")
    by_stem = {image_stem(p) if is_image_file(p) else p.stem: p for p in prompts.iterdir()
               if p.suffix == ".json" or is_image_file(p)}
    cases, missing = [], []
    for image in sorted(p for p in images.iterdir() if is_image_file(p)):
        prompt = by_stem.get(image_stem(image))
        if prompt is None:
            missing.append(image.name)
        else:
            cases.append(Case(image, prompt))
    if missing:
        print(f"No prompt for {', '.join(missing)} in {prompts}: skipped.", file=sys.stderr)
    if not cases:
        raise LesionLocatorError(f"No image in {images} has a prompt in {prompts} with the same name.")
    return cases


def read_prompts(path: Path, image: ImageVolume) -> tuple[dict[int, Prompt], dict[int, str]]:
    if path.suffix == ".json":
        return load_prompt_json(path)
    labels = read_image(path)
    if labels.shape_zyx != image.shape_zyx:
        raise PromptError(f"Mask {path} has shape {labels.shape_zyx}, the image {image.shape_zyx}: use the image grid.")
    return {k: MaskPrompt(v) for k, v in split_instance_mask(labels.array).items()}, {}


def prompt_type_note(stem: str, prompts: dict[int, Prompt], prompt_type: str) -> str | None:
    """A note for the point or box prompts of a file that -t names the other kind: each is answered by the model for
    its own kind, where the official LesionLocator_segment runs every prompt through the -t model."""
    kind = "box" if prompt_type == "point" else "point"
    ids = sorted(i for i, prompt in prompts.items() if prompt_kind(prompt) == kind)
    if not ids:
        return None
    return (f"{stem}: lesion(s) {', '.join(map(str, ids))} have {kind} prompts although -t is {prompt_type}: they are "
            f"answered by the model for {kind}s (the official LesionLocator_segment would run its {prompt_type} model "
            f"on them). Give -t {kind}, or a file of {prompt_type} prompts, to silence this.")


def stderr_progress(enabled: bool):
    def report(fraction: float, stage: str) -> None:
        print(f"\r[{fraction * 100:5.1f}%] {stage:60s}", end="" if fraction < 1 else "\n", file=sys.stderr, flush=True)

    return report if enabled else None


def output_paths(output: Path, stem: str, lesion_ids, probabilities: bool) -> list[Path]:
    paths = [output / f"{stem}_lesion_{i}.nii.gz" for i in lesion_ids]
    return paths + ([output / f"{stem}_lesion_{i}_prob.nii.gz" for i in lesion_ids] if probabilities else [])


def run(args: argparse.Namespace) -> int:
    from .segmentation import Segmenter

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model_root = resolve_model_root(args.model)
    check_hu = expects_hounsfield_units(model_root)
    segmenter = Segmenter.from_folder(
        model_root, device=args.device, preset=args.preset, folds=args.folds,
        use_tta=False if args.disable_tta else None, mode=args.mode, step_size=args.step_size,
        cpu_bf16=args.bf16, mask_prompt_as=args.prompt_type, point_search=not args.disable_point_search,
        box_refinement=not args.disable_box_refinement, point_extent=not args.disable_point_extent,
        box_fine_grid=not args.disable_box_fine_grid,
    )
    failures = 0
    for case in find_cases(args.input, args.prompt):
        image = read_image(case.image_path)
        prompts, errors = read_prompts(case.prompt_path, image)
        targets = output_paths(output, case.stem, prompts, args.probabilities)
        existing = [p for p in targets if p.exists()]
        if existing and args.continue_prediction:
            print(f"{case.stem}: outputs exist, skipped (--continue_prediction).", file=sys.stderr)
            continue
        if existing and not args.overwrite:
            raise LesionLocatorError(
                f"{existing[0]} already exists; nothing was overwritten. Use another -o folder, --overwrite to "
                "replace, or --continue_prediction to skip finished cases."
            )
        print(f"{case.stem}: {len(prompts)} lesion(s)", file=sys.stderr)
        notes = [prompt_type_note(case.stem, prompts, args.prompt_type),
                 hu_warning(image.array, case.stem) if check_hu else ""]
        for note in filter(None, notes):
            print(note, file=sys.stderr)
        result = segmenter.segment(image, prompts, progress=stderr_progress(not args.disable_progress_bar),
                                   return_probabilities=args.probabilities)
        for lesion_id, mask in result.masks.items():
            write_mask(mask, image, output / f"{case.stem}_lesion_{lesion_id}.nii.gz")
            if args.probabilities:
                write_volume(result.probabilities[lesion_id], image, output / f"{case.stem}_lesion_{lesion_id}_prob.nii.gz")
        for lesion_id, message in {**errors, **result.errors}.items():
            failures += 1
            print(f"{case.stem}: lesion {lesion_id} skipped: {message}", file=sys.stderr)
    return 1 if failures else 0

