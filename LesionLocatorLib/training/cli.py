"""`lesionlocator train`: generate synthetic training samples, train the Lite model, export and validate it.

    lesionlocator train --output Resources/Models/LesionLocatorLite --work-dir scratch/lite --steps 3000
    lesionlocator train ... --resume          # continue from <work-dir>/checkpoint_latest.pth
    lesionlocator train ... --tasks point --prompt-mix 1 0 0   # a point-only network in <output>/net_point
    lesionlocator train ... --init-from lesionlocator-lite --own-data DATASET   # fine-tune on your annotated CTs

Samples are cached in <work-dir>/samples (or --cache) and reused; stopping (Ctrl-C, --time-limit-min) keeps a
resumable checkpoint. The model root is written once training reaches --steps. An earlier run's checkpoint in the
work folder, and a network in --output that this run would replace, are kept unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..checkpoint import read_model_manifest
from ..errors import LesionLocatorError, require_at_least, require_folder_path, require_positive
from ..point_search import DEFAULT_BOX_SIZES_MM
from .plans import NET_FOLDER, TASKS, LiteModelConfig, drop_box_refinement, set_point_search
from .own_data import fill_own_cache
from .samples import DEFAULT_PROMPT_MIX, TRAINING_BACKGROUNDS, SampleGenerator, cached_sample_paths, fill_cache
from .trainer import TrainingOptions, check_fresh_start, export_model, train
from .validation import summary_table


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, type=Path, help="model root to write (manifest + net/)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                        help="tasks the trained network serves (default all); the others keep their folder in an "
                             "existing model root")
    parser.add_argument("--point-search", type=float, nargs="+", metavar="MM", default=list(DEFAULT_BOX_SIZES_MM),
                        help="cube sizes of the point search the model root asks for (default: 8 12 18 27 40 60, "
                             "as the bundled model); set only once the root has a box network")
    parser.add_argument("--no-point-search", action="store_true",
                        help="the model root answers clicks with its point network alone")
    parser.add_argument("--net-folder", help="folder of the network in the model root (default: net for all tasks, "
                                             "else net_<tasks>)")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and logs (default: <output>_work)")
    parser.add_argument("--cache", type=Path, help="training sample cache (default: <work-dir>/samples)")
    parser.add_argument("--cache-size", type=int, default=1200, help="samples to generate (default 1200)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (poly decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--resume", action="store_true", help="continue from <work-dir>/checkpoint_latest.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh over an earlier run's checkpoint in the work folder, and replace the "
                             "networks in --output that this run writes (otherwise both are refused)")
    parser.add_argument("--time-limit-min", type=float, help="stop training after this many minutes (resumable)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        default=list(LiteModelConfig.patch_size_zyx), help="patch in voxels (z y x)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        default=list(LiteModelConfig.spacing_zyx), help="target spacing in mm (z y x)")
    parser.add_argument("--train-patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="train on smaller patches than the plans' patch (cheaper steps; default: the plans')")
    parser.add_argument("--init-from", help="start from these weights: a checkpoint file, a model folder, a model "
                                            "root or a registered model name such as lesionlocator-lite (a root: "
                                            "its network for the first of --tasks)")
    parser.add_argument("--prompt-mix", type=float, nargs=3, metavar=("POINT", "BOX", "MASK"),
                        default=list(DEFAULT_PROMPT_MIX), help="relative frequency of the simulated prompt kinds")
    parser.add_argument("--size-weighting", type=float, default=0.0, metavar="ALPHA",
                        help="draw lesions with probability ~ voxels^ALPHA (e.g. 0.2: large lesions more often)")
    parser.add_argument("--no-deep-supervision", action="store_true", help="loss on the full-resolution output only")
    parser.add_argument("--features", type=int, nargs="+", default=list(LiteModelConfig.features_per_stage))
    parser.add_argument("--blocks", type=int, nargs="+", default=list(LiteModelConfig.blocks_per_stage))
    parser.add_argument("--backgrounds", nargs="+", metavar="NAME=WEIGHT",
                        default=[f"{k}={v}" for k, v in TRAINING_BACKGROUNDS.items()],
                        help="training backgrounds (real scan names or body_phantom/head_phantom) with weights")
    parser.add_argument("--data-root", type=Path,
                        help="shared data folder (default: $LESIONLOCATOR_SHARED_DATA or ../shared/data)")
    parser.add_argument("--own-data", type=Path, metavar="DATASET",
                        help="your annotated CTs as an nnU-Net raw dataset (imagesTr/<case>_0000.nii.gz, "
                             "labelsTr/<case>.nii.gz; every connected lesion label is one lesion), mixed with the "
                             "synthetic samples; cached in <work-dir>/own_samples")
    parser.add_argument("--own-data-share", type=float, default=0.5,
                        help="share of training samples from --own-data (1: own data only, no synthetic samples)")
    parser.add_argument("--validation-seed", type=int, default=1234)
    parser.add_argument("--validation-cases", type=int, default=2, help="validation cases per held-out background")
    parser.add_argument("--no-validate", action="store_true", help="skip the held-out validation after training")


def _background_weights(entries: list[str]) -> dict[str, float]:
    from ..synthetic.backgrounds import check_background_name

    weights = {}
    for entry in entries:
        name, _, weight = entry.partition("=")
        try:
            weights[name] = float(weight or 1.0)
        except ValueError as error:
            raise LesionLocatorError(f"--backgrounds: '{entry}' is not NAME=WEIGHT.") from error
        check_background_name(name)
        if not weights[name] >= 0:
            raise LesionLocatorError(f"--backgrounds: the weight of '{name}' must be zero or more; got {weight}.")
    if sum(weights.values()) <= 0:
        raise LesionLocatorError("--backgrounds: give at least one background a positive weight.")
    return weights


def _check_counts(args: argparse.Namespace) -> None:
    """Before minutes of samples: settings that would train nothing or fail only after them."""
    counts = {"--steps": args.steps, "--batch-size": args.batch_size, "--cache-size": args.cache_size}
    if not args.no_validate:
        counts["--validation-cases"] = args.validation_cases
    require_at_least(1, counts)
    require_positive({"--lr": args.lr})
    require_at_least(0, {"--seed": args.seed, "--validation-seed": args.validation_seed})


def _prompt_mix(values: list[float]) -> tuple[float, float, float]:
    if min(values) < 0 or sum(values) <= 0:
        raise LesionLocatorError("--prompt-mix: give three non-negative weights (point box mask), not all zero.")
    return tuple(values)


def _init_source(value: str | None) -> str | None:
    """A registered model name (e.g. lesionlocator-lite) becomes its model root; paths pass unchanged."""
    from ..models.registry import REGISTRY, model_root

    if value is None:
        return None
    if value in REGISTRY:
        return str(model_root(value))
    if not Path(value).exists():
        raise LesionLocatorError(f"--init-from {value}: no such checkpoint file or model root. Give a "
                                 "checkpoint_latest.pth, a model root or a registered model name.")
    return str(value)


def _networks_replaced(output: Path, tasks: tuple[str, ...], net_folder: str) -> list[Path]:
    """The network folders in `output` that exporting would replace or take `tasks` from: the folder of each task
    being trained, and `net_folder` itself (it may serve other tasks)."""
    manifest = read_model_manifest(output) if output.is_dir() else {}  # a broken one fails now, not after training
    mapped = manifest.get("tasks", {})
    folders = {output / net_folder} | {output / mapped[task] for task in tasks if task in mapped}
    return sorted(f for f in folders if any(f.glob("fold_*/checkpoint_final.pth")))


def _check_nothing_replaced(args: argparse.Namespace, work_dir: Path, tasks: tuple[str, ...], net_folder: str) -> None:
    """Before samples and training: an earlier checkpoint or exported network is replaced only with --overwrite."""
    require_folder_path(args.output, "--output")  # found now, not after hours of training
    require_folder_path(work_dir, "--work-dir")
    check_fresh_start(work_dir, args.resume, args.overwrite)
    replaced = _networks_replaced(args.output, tasks, net_folder)
    if replaced and not args.overwrite:
        raise LesionLocatorError(
            f"{args.output} already holds the network(s) in {', '.join(str(f) for f in replaced)} for "
            f"{'/'.join(tasks)}; nothing was overwritten. Give another --output, or add --overwrite to replace "
            "them when this run ends.")


def _cache_progress(done: int, total: int) -> None:
    sys.stderr.write(f"\rgenerating samples {done}/{total} ")
    sys.stderr.flush()


def _validate(output: Path, work_dir: Path, args: argparse.Namespace) -> dict:
    from ..synthetic.cases import VALIDATION_BACKGROUNDS, make_validation_set
    from .validation import evaluate_segmentation, scores_as_dicts, summarize

    cases = make_validation_set(args.validation_seed, VALIDATION_BACKGROUNDS, args.validation_cases,
                                data_root=args.data_root)
    scores = evaluate_segmentation(output, cases, device="cpu" if args.device == "auto" else args.device)
    report = {"seed": args.validation_seed, "backgrounds": list(VALIDATION_BACKGROUNDS), "summary": summarize(scores),
              "lesions": scores_as_dicts(scores)}
    (work_dir / "validation.json").write_text(json.dumps(report, indent=1))
    return report


def run(args: argparse.Namespace) -> int:
    config = LiteModelConfig(tuple(args.patch_size), tuple(args.spacing), tuple(args.features), tuple(args.blocks))
    if args.train_patch_size:
        config.check_patch(args.train_patch_size, "--train-patch-size")
    work_dir = args.work_dir or args.output.with_name(args.output.name + "_work")
    cache = args.cache or work_dir / "samples"
    own_cache = None
    _check_counts(args)
    background_weights, prompt_mix = _background_weights(args.backgrounds), _prompt_mix(args.prompt_mix)
    init_weights = _init_source(args.init_from)
    tasks = tuple(dict.fromkeys(args.tasks))
    net_folder = args.net_folder or (NET_FOLDER if set(tasks) == set(TASKS) else "net_" + "_".join(tasks))
    if not args.no_point_search and not all(size > 0 for size in args.point_search):
        raise LesionLocatorError(f"--point-search sizes must be positive (mm); got {args.point_search}.")
    _check_nothing_replaced(args, work_dir, tasks, net_folder)
    if args.own_data is not None:
        if not 0 < args.own_data_share <= 1:
            raise LesionLocatorError(f"--own-data-share must be in (0, 1]; got {args.own_data_share}.")
        own_cache = work_dir / "own_samples"
        fill_own_cache(args.own_data, own_cache, config,
                       lambda done, total: sys.stderr.write(f"\rown data: case {done}/{total} "))
        sys.stderr.write("\n")
    synthetic_needed = own_cache is None or args.own_data_share < 1
    if synthetic_needed and args.cache_size > len(cached_sample_paths(cache)):
        generator = SampleGenerator(config, np.random.default_rng(args.seed + 10_000),
                                    background_weights, args.data_root)
        fill_cache(cache, args.cache_size, generator, _cache_progress)
        sys.stderr.write("\n")
    options = TrainingOptions(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                              device=args.device, threads=args.threads,
                              time_limit_s=None if args.time_limit_min is None else 60 * args.time_limit_min,
                              patch_size_zyx=tuple(args.train_patch_size) if args.train_patch_size else None,
                              deep_supervision=not args.no_deep_supervision, prompt_mix=prompt_mix,
                              size_weighting=args.size_weighting,
                              init_weights=init_weights,
                              init_task=args.tasks[0],
                              own_data_share=args.own_data_share if own_cache is not None else 0.0)
    try:
        network, state = train(config, options, cache, work_dir, resume=args.resume, max_samples=args.cache_size,
                               own_cache=own_cache, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint in {work_dir} resumes with the same command plus --resume",
              file=sys.stderr)
        return 130
    sys.stderr.write("\n")
    if state.step < args.steps:
        print(f"stopped at step {state.step}/{args.steps}; continue with the same command plus --resume",
              file=sys.stderr)
        return 0
    export_model(network, config, args.output, state, tasks, net_folder)
    print(f"model written to {args.output} ({state.step} steps, {state.seconds / 60:.1f} min of training)")
    if "box" in tasks and drop_box_refinement(args.output):
        print(f"the box refinement fitted for the earlier box network was removed; `lesionlocator fit-box-refinement "
              f"-m {args.output}` fits one for this network", file=sys.stderr)
    searching = set_point_search(args.output, None if args.no_point_search else args.point_search)
    if not searching and not args.no_point_search:
        print("no point search yet: it needs a box network in this model root (train --tasks box)", file=sys.stderr)
    elif searching:
        print(f"clicks pick among the point search's candidates by contrast; `lesionlocator fit-point-search -m "
              f"{args.output}` fits a selector for these networks, then `lesionlocator fit-point-extent -m "
              f"{args.output}` the network that predicts a clicked lesion's box", file=sys.stderr)
    if not args.no_validate:
        summary = _validate(args.output, work_dir, args)["summary"]
        print(f"held-out validation (every lesion's scores: {work_dir / 'validation.json'}):\n{summary_table(summary)}")
    return 0
