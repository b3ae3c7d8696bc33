"""`LesionLocator_track` / `lesionlocator track`: drop-in for the official tracking command line.

`-bl baseline -fu follow-up... -p prompt(s) -t point|box|prev_mask -o out -m model -f folds -device`. Writes the
official file names (`<stem>_lesion_<id>.nii.gz`, with the baseline masks too for point/box prompts) and
`lesions.json`: for every lesion and timepoint found/not found, mask file, volume and centre.
Lesion ids are kept along the chain (the official code renumbers them after the first follow-up).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from natsort import natsorted

from .errors import LesionLocatorError, PromptError, require_folder_path
from .image import ImageVolume, image_stem, read_image, write_mask
from .intensity_check import expects_hounsfield_units, hu_warning
from .prompts import (
    MaskPrompt, Prompt, grid_difference, lesions_from_label_image, load_prompt_json, prompt_kind, resample_labels,
    validate_prompt,
)
from .segment_cli import (
    add_model_options, refuse_inputs_as_outputs, resolve_model_root, stderr_progress,
)

TRACKING_FORMAT = "lesionlocator-tracking/1"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-bl", "--baseline", required=True, help="baseline image (file or DICOM folder)")
    parser.add_argument("-fu", "--followups", nargs="+", required=True, help="follow-up images, in time order")
    parser.add_argument("-p", "--prompt", nargs="+", required=True,
                        help="point/box JSON, a lesion instance map, or one binary mask file per lesion")
    parser.add_argument("-t", "--prompt_type", choices=("point", "box", "prev_mask"), required=True)
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--registration", choices=("auto", "gradicon", "classical"), default="auto",
                        help="auto: the model's network if it has one, else classical (SimpleITK)")
    parser.add_argument("--official_list_prompts", action="store_true",
                        help="reproduce the official outputs where it reads lesions from per-lesion mask files "
                             "(lists, point/box, later follow-ups): the area outside the body then enters the prompt "
                             "and shifts the U-Net patch; off: the patch is centred on the lesion")
    add_model_options(parser)


def read_track_prompts(paths: list[str], prompt_type: str, baseline: ImageVolume) -> tuple[dict[int, Prompt], dict[int, str]]:
    """The baseline's prompts, each checked against it (an unusable one goes to the errors), from a JSON file, a
    lesion instance map, or one mask file per lesion. Masks on another grid are resampled onto the baseline's."""
    if prompt_type in ("point", "box"):
        if len(paths) != 1 or not paths[0].endswith(".json"):
            raise PromptError(f"-t {prompt_type} needs one JSON prompt file; got {paths}.")
        prompts, errors = load_prompt_json(paths[0])
        usable = {}
        for lesion_id, prompt in prompts.items():
            try:
                if prompt_kind(prompt) != prompt_type:
                    raise PromptError(f"not a {prompt_type} prompt (-t {prompt_type})")
                usable[lesion_id] = validate_prompt(prompt, baseline.shape_zyx)
            except PromptError as error:
                errors[lesion_id] = str(error)
        return usable, errors
    json_files = [p for p in paths if p.endswith(".json")]
    if json_files:
        raise PromptError(f"-t prev_mask takes lesion masks of the baseline, not JSON prompts ({json_files[0]}); "
                          "give -t point or -t box for a JSON file.")
    if len(paths) == 1:
        masks, errors, note = lesions_from_label_image(read_image(paths[0]), baseline, paths[0])
        if note:
            print(note, file=sys.stderr)
        return {k: MaskPrompt(v, from_instance_map=True) for k, v in masks.items()}, errors
    # a list of per-lesion masks: lesion k is the k-th file in natural order (official numbering)
    prompts, errors = {}, {}
    for lesion_id, path in enumerate(natsorted(paths), start=1):
        try:
            prompts[lesion_id] = MaskPrompt(lesion_mask_file(path, lesion_id, baseline))
        except PromptError as error:
            errors[lesion_id] = str(error)
    return prompts, errors


def lesion_mask_file(path: str, lesion_id: int, baseline: ImageVolume) -> np.ndarray:
    """One lesion's mask file on the baseline's grid (resampled there, with a note, when it is on another)."""
    mask = read_image(path)
    if not np.any(mask.array > 0):
        raise PromptError(f"mask file {path} (lesion {lesion_id}) is empty: it labels no voxel of the lesion")
    if mask.same_grid(baseline):
        return mask.array > 0
    on_baseline = resample_labels(mask, baseline) > 0
    if not on_baseline.any():
        raise PromptError(f"mask file {path} (lesion {lesion_id}) does not overlap the baseline "
                          f"({grid_difference(mask, baseline)}): give a mask drawn on the baseline")
    print(f"{path} is not on the baseline's grid ({grid_difference(mask, baseline)}): resampled onto it (nearest "
          "neighbour, in physical space).", file=sys.stderr)
    return on_baseline


def output_stems(baseline: Path, followups: list[Path]) -> list[str]:
    """Official stems, made unique when two timepoints share a file name (official code overwrites)."""
    stems = [image_stem(p) for p in [baseline, *followups]]
    unique = []
    for index, stem in enumerate(stems):
        if stems.count(stem) > 1:
            unique.append(f"{stem}_tp{index}")
            print(f"Timepoints share the name '{stem}': writing timepoint {index} as '{stem}_tp{index}'.", file=sys.stderr)
        else:
            unique.append(stem)
    return unique


def mask_file(stem: str, lesion_id: int, timepoint: int, official_baseline: bool) -> str:
    """Official name; baseline masks given as prompts are copied under prompts/ so the report can use them."""
    name = f"{stem}_lesion_{lesion_id}.nii.gz"
    return name if timepoint > 0 or official_baseline else f"prompts/{name}"


def tracking_json(result, stems: list[str], paths: list[Path], write_baseline: bool) -> dict:
    lesions = {}
    for lesion_id, history in sorted(result.lesions.items()):
        first = next((r.timepoint for r in history if r.source != "new"), 0)
        entries = []
        for record in history:
            entry = record.summary()
            entry["mask"] = mask_file(stems[record.timepoint], lesion_id, record.timepoint, write_baseline) \
                if record.found else None
            entries.append(entry)
        lesions[str(lesion_id)] = {"name": f"Lesion {lesion_id}", "is_lymph_node": False, "first_timepoint": first,
                                   "timepoints": entries}
    timepoints = [{"index": i, "name": stems[i], "image": str(Path(p).resolve()), "study_date": None}
                  for i, p in enumerate(paths)]
    return {"format": TRACKING_FORMAT, "timepoints": timepoints, "lesions": lesions,
            "registrations_computed": result.registrations_computed}


def no_usable_prompt(paths: list[str], errors: dict[int, str]) -> int:
    """Exit status 1, as segment's when every prompt fails: each reason is printed, nothing is tracked or written."""
    for lesion_id, message in sorted(errors.items()):
        print(f"lesion {lesion_id} skipped: {message}", file=sys.stderr)
    print(f"error: {'No usable prompt' if errors else 'No prompt'} in file {', '.join(paths)}; nothing was tracked.",
          file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from .tracking import Tracker

    output = Path(args.output)
    require_folder_path(output, "-o")
    paths = [Path(args.baseline), *map(Path, args.followups)]
    images = [read_image(p) for p in paths]
    prompts, errors = read_track_prompts(args.prompt, args.prompt_type, images[0])
    if not prompts:
        return no_usable_prompt(args.prompt, errors)
    stems = output_stems(paths[0], paths[1:])
    write_baseline = args.prompt_type != "prev_mask"
    targets = [output / mask_file(stem, k, t, write_baseline) for t, stem in enumerate(stems) for k in prompts]
    targets.append(output / "lesions.json")
    refuse_inputs_as_outputs(targets, [*paths, *map(Path, args.prompt)])
    existing = [p for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise LesionLocatorError(f"{existing[0]} already exists; nothing was overwritten. Use another -o or --overwrite.")
    output.mkdir(parents=True, exist_ok=True)
    model_root = resolve_model_root(args.model)
    if expects_hounsfield_units(model_root):
        for warning in filter(None, (hu_warning(image.array, stem) for image, stem in zip(images, stems))):
            print(warning, file=sys.stderr)
    tracker = Tracker.from_folder(model_root, device=args.device, preset=args.preset,
                                  folds=args.folds, use_tta=False if args.disable_tta else None,
                                  registration=args.registration, official_list_prompts=args.official_list_prompts,
                                  cpu_bf16=args.bf16, point_search=not args.disable_point_search,
                                  box_refinement=not args.disable_box_refinement,
                                  point_extent=not args.disable_point_extent,
                                  box_fine_grid=not args.disable_box_fine_grid)
    result = tracker.track(images, prompts, progress=stderr_progress(not args.disable_progress_bar))
    (output / "prompts").mkdir(exist_ok=True)
    for lesion_id, history in result.lesions.items():
        for record in history:
            if record.found:
                name = mask_file(stems[record.timepoint], lesion_id, record.timepoint, write_baseline)
                write_mask(record.mask, images[record.timepoint], output / name)
            elif record.source != "new":
                print(f"lesion {lesion_id}, {stems[record.timepoint]}: {record.message}", file=sys.stderr)
    for lesion_id, message in errors.items():
        print(f"lesion {lesion_id} skipped: {message}", file=sys.stderr)
    (output / "lesions.json").write_text(json.dumps(tracking_json(result, stems, paths, write_baseline), indent=1))
    return 1 if errors else 0
