"""`LesionLocator_segment` / `lesionlocator segment`: drop-in for the official segmentation command line.

Official flags: -i -p -o -t point|box -m -f -step_size --disable_tta -device --continue_prediction (and -npp -nps
--disable_progress_bar, accepted for compatibility). Files or folders (paired by name); outputs
`<stem>_lesion_<id>.nii.gz`. Existing outputs are never overwritten unless --overwrite is given, and an input never.
Exit status: 0 all done, 1 a lesion or case failed (each reported, the others done), 2 an input was refused.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LesionLocatorError, require_folder_path
from .image import ImageVolume, image_stem, is_image_file, read_image, write_mask, write_volume
from .intensity_check import expects_hounsfield_units, hu_warning
from .prompts import MaskPrompt, Prompt, lesions_from_label_image, load_prompt_json, prompt_kind

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
    parser.add_argument("--continue_prediction", action="store_true",
                        help="keep the lesions whose outputs exist and segment the others")
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
    if images.is_file() and not is_image_file(images):
        raise LesionLocatorError(f"-i {images} is not an image: give a .nii/.nii.gz, .nrrd or .mha/.mhd file, a DICOM "
                                 "series folder, or a folder of images.")
    if is_image_file(images) or _is_dicom_folder(images):
        if prompts.is_dir():
            raise LesionLocatorError("A single image needs a single prompt file (-p), not a folder.")
        if prompts.resolve() == images.resolve():
            raise LesionLocatorError(f"-p {prompts} is the image itself: give its prompt JSON file or lesion mask.")
        return [Case(images, prompts)]
    if not prompts.is_dir():
        raise LesionLocatorError("A folder of images (-i) needs a folder of prompts (-p) named like the images.")
    return paired_cases(images, prompts)


def by_stem(paths: list[Path]) -> dict[str, list[Path]]:
    """Files grouped by name without extension (`a.nii.gz` and `a.json` both 'a')."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(paths):
        groups.setdefault(image_stem(path) if is_image_file(path) else path.stem, []).append(path)
    return groups


def paired_cases(images: Path, prompts: Path) -> list[Case]:
    """Each image of a folder with the prompt file of its name. An image is never its own prompt (-i and -p may be
    one folder); two prompts for one image, or two images of one name, are refused: their outputs would mix."""
    image_groups = by_stem([p for p in images.iterdir() if is_image_file(p)])
    inputs = {p.resolve() for group in image_groups.values() for p in group}
    prompt_groups = by_stem([p for p in prompts.iterdir() if p.resolve() not in inputs
                             and (is_image_file(p) or (p.is_file() and p.suffix == ".json"))])
    cases, missing = [], []
    for stem, group in image_groups.items():
        candidates = prompt_groups.get(stem, [])
        if not candidates:
            missing += [p.name for p in group]
        elif len(candidates) > 1:
            raise LesionLocatorError(f"{' and '.join(p.name for p in candidates)} in {prompts} are both prompts for "
                                     f"'{stem}': keep one (a JSON file or a lesion mask) or move the other away.")
        elif len(group) > 1:
            raise LesionLocatorError(f"{' and '.join(p.name for p in group)} in {images} share the name '{stem}': their "
                                     "prompt and outputs would mix. Rename one, or move it to another folder.")
        else:
            cases.append(Case(group[0], candidates[0]))
    if missing:
        print(f"No prompt for {', '.join(missing)} in {prompts}: skipped.", file=sys.stderr)
    if not cases:
        raise LesionLocatorError(f"No image in {images} has a prompt in {prompts} with the same name.")
    return cases


def read_prompts(path: Path, image: ImageVolume) -> tuple[dict[int, Prompt], dict[int, str], str]:
    """Prompts, per-lesion errors and a note (a mask on another grid is resampled onto the image's)."""
    if path.suffix == ".json":
        return (*load_prompt_json(path), "")
    masks, errors, note = lesions_from_label_image(read_image(path), image, str(path))
    return {k: MaskPrompt(v) for k, v in masks.items()}, errors, note


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


def lesion_outputs(output: Path, stem: str, lesion_id: int, probabilities: bool) -> list[Path]:
    """The mask and, with --probabilities, the probability map of one lesion."""
    name = f"{stem}_lesion_{lesion_id}"
    return [output / f"{name}.nii.gz"] + ([output / f"{name}_prob.nii.gz"] if probabilities else [])


def refuse_inputs_as_outputs(targets: list[Path], inputs: list[Path]) -> None:
    """Even --overwrite never writes over a file that this run reads."""
    resolved = {Path(p).resolve() for p in inputs}
    clash = next((t for t in targets if t.resolve() in resolved), None)
    if clash is not None:
        raise LesionLocatorError(f"{clash} is an input of this run and would be overwritten by an output: nothing was "
                                 "written. Give another -o folder, or move the input.")


def pending_lesions(case: Case, prompts: dict[int, Prompt], output: Path, args: argparse.Namespace) -> list[int]:
    """The lesions to segment: all, or with --continue_prediction those missing an output. Refuses to replace an
    existing output without --overwrite or --continue_prediction."""
    outputs = {k: lesion_outputs(output, case.stem, k, args.probabilities) for k in prompts}
    refuse_inputs_as_outputs([p for paths in outputs.values() for p in paths], [case.image_path, case.prompt_path])
    if args.continue_prediction:
        return [k for k, paths in outputs.items() if not all(p.exists() for p in paths)]
    existing = [p for paths in outputs.values() for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise LesionLocatorError(
            f"{existing[0]} already exists; nothing was overwritten. Use another -o folder, --overwrite to "
            "replace, or --continue_prediction to skip finished lesions."
        )
    return list(prompts)


def segment_case(case: Case, segmenter, output: Path, args: argparse.Namespace, check_hu: bool) -> int:
    """Segment one image's pending lesions and write them; returns the number of failures (reported)."""
    image = read_image(case.image_path)
    prompts, errors, note = read_prompts(case.prompt_path, image)
    if not prompts and not errors:
        print(f'{case.stem}: no prompt in file {case.prompt_path}; give lesions as {{"1": {{"point": [z, y, x]}}}}.',
              file=sys.stderr)
        return 1
    pending = pending_lesions(case, prompts, output, args)
    kept = [str(k) for k in prompts if k not in pending]
    if kept:
        print(f"{case.stem}: lesion(s) {', '.join(kept)} already segmented, kept (--continue_prediction).",
              file=sys.stderr)
    if pending:
        print(f"{case.stem}: {len(pending)} lesion(s)", file=sys.stderr)
        prompts = {k: prompts[k] for k in pending}
        notes = [note, prompt_type_note(case.stem, prompts, args.prompt_type),
                 hu_warning(image.array, case.stem) if check_hu else ""]
        for text in filter(None, notes):
            print(text, file=sys.stderr)
        result = segmenter.segment(image, prompts,
                                   progress=stderr_progress(not args.disable_progress_bar),
                                   return_probabilities=args.probabilities)
        for lesion_id, mask in result.masks.items():
            arrays = (mask, result.probabilities[lesion_id] if args.probabilities else None)
            for path, array, write in zip(lesion_outputs(output, case.stem, lesion_id, args.probabilities), arrays,
                                          (write_mask, write_volume)):
                if args.overwrite or not path.exists():  # continuing: a lesion's existing file is kept
                    write(array, image, path)
        errors = {**errors, **result.errors}
    for lesion_id, message in errors.items():
        print(f"{case.stem}: lesion {lesion_id} skipped: {message}", file=sys.stderr)
    return len(errors)


def run(args: argparse.Namespace) -> int:
    from .segmentation import Segmenter

    output = Path(args.output)
    require_folder_path(output, "-o")
    cases = find_cases(args.input, args.prompt)
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
    failures = sum(segment_case(case, segmenter, output, args, check_hu) for case in cases)
    return 1 if failures else 0
