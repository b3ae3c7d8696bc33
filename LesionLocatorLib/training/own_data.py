"""Fine-tuning on your own annotated CT scans, given as an nnU-Net raw dataset folder:

    DATASET/imagesTr/<case>_0000.nii.gz   one CT per case, in HU (any image format of image.IMAGE_SUFFIXES)
    DATASET/labelsTr/<case>.nii.gz        its lesion labels on the same grid (0 = background)

Every connected component of every label value is one lesion (a binary mask of several lesions works, and so does
an instance map). Each lesion becomes one training sample, preprocessed exactly as the synthetic samples and the
engine's roi mode (see samples.lesion_sample), cached in its own folder next to the synthetic cache.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import cc3d
import numpy as np

from ..errors import LesionLocatorError
from ..image import IMAGE_SUFFIXES, image_stem, is_image_file, read_image
from ..intensity_check import hu_warning
from ..preprocessing import Preprocessor
from .plans import LiteModelConfig, plans_model_folder
from .samples import cached_sample_paths, lesion_sample, save_sample

CHANNEL_SUFFIX = "_0000"
SOURCE_FILE = "source.json"


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {image_stem(path): path for path in sorted(folder.iterdir())
            if is_image_file(path) and not path.name.startswith(".")}


def dataset_cases(dataset: str | Path, split: str = "Tr") -> list[tuple[str, Path, Path]]:
    """(case, image path, label path) of every case of `split` (Tr: training, Ts: test), paired by name; anything
    unpaired is a clear error."""
    dataset = Path(dataset)
    images_dir, labels_dir = dataset / f"images{split}", dataset / f"labels{split}"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise LesionLocatorError(f"{dataset} is not an nnU-Net raw dataset: it needs images{split}/<case>_0000.nii.gz "
                                 f"and labels{split}/<case>.nii.gz (lesion labels on the image grid).")
    images, labels = _files_by_stem(images_dir), _files_by_stem(labels_dir)
    extra_channels = sorted(stem for stem in images if not stem.endswith(CHANNEL_SUFFIX))
    if extra_channels:
        raise LesionLocatorError(f"{images_dir}: {extra_channels[0]} is not a channel-0 image (<case>_0000). The Lite "
                                 "model takes one CT channel; remove the other channels.")
    images = {stem[: -len(CHANNEL_SUFFIX)]: path for stem, path in images.items()}
    unlabelled, orphans = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabelled:
        raise LesionLocatorError(f"No label for image {images[unlabelled[0]]}: add labelsTr/{unlabelled[0]}.nii.gz "
                                 "(an empty label map if the scan has no lesion) or remove the image.")
    if orphans:
        raise LesionLocatorError(f"Label {labels[orphans[0]]} has no image: add imagesTr/{orphans[0]}_0000.nii.gz.")
    if not images:
        raise LesionLocatorError(f"{images_dir} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return [(case, images[case], labels[case]) for case in sorted(images)]


def lesion_masks(labels_zyx: np.ndarray) -> list[np.ndarray]:
    """One boolean mask per connected component (26-connected) of every non-zero label value (cc3d labels the
    components of each value apart, so touching lesions with different ids stay separate)."""
    components = cc3d.connected_components(np.ascontiguousarray(labels_zyx), connectivity=26)
    return [components == k for k in range(1, int(components.max()) + 1)]


def read_case(image_path: Path, label_path: Path):
    """(float32 CT, lesion masks) of one case, checked."""
    image, labels = read_image(image_path), read_image(label_path)
    _check_pair(image, labels, image_path, label_path)
    return image.with_array(image.array.astype(np.float32)), lesion_masks(np.rint(labels.array).astype(np.int64))


def _check_pair(image, labels, image_path: Path, label_path: Path) -> None:
    if not labels.same_grid(image, tol=1e-3):
        raise LesionLocatorError(f"{label_path} (shape {labels.shape_zyx}, spacing {labels.spacing_zyx}) is not on the "
                                 f"grid of {image_path} ({image.shape_zyx}, {image.spacing_zyx}; origin and "
                                 "direction count too): resample the labels onto the image.")
    warning = hu_warning(image.array, str(image_path))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def fill_own_cache(dataset: str | Path, folder: str | Path, config: LiteModelConfig, progress=None) -> list[Path]:
    """Samples of every lesion of the dataset in `folder`; a complete cache of the same dataset and model
    configuration is reused, a cache of another one is an error (nothing is deleted)."""
    dataset, folder = Path(dataset).resolve(), Path(folder)
    cases = dataset_cases(dataset)
    source = {"dataset": str(dataset), "cases": [case for case, _, _ in cases], "config": asdict(config)}
    source_file = folder / SOURCE_FILE
    if source_file.is_file():
        saved = json.loads(source_file.read_text())
        if {k: saved.get(k) for k in source} != json.loads(json.dumps(source)):
            raise LesionLocatorError(f"{folder} holds samples of another dataset or model configuration "
                                     f"({saved.get('dataset')}); use another --work-dir or delete that folder.")
        if saved.get("complete"):
            return cached_sample_paths(folder)
        for stale in cached_sample_paths(folder):  # this dataset's interrupted run: its partial samples are redone
            stale.unlink()
    elif cached_sample_paths(folder):
        raise LesionLocatorError(f"{folder} holds samples that this command did not make; use another --work-dir.")
    folder.mkdir(parents=True, exist_ok=True)
    source_file.write_text(json.dumps(source, indent=1))
    preprocessor = Preprocessor(plans_model_folder(config))
    paths: list[Path] = []
    for number, (case, image_path, label_path) in enumerate(cases):
        image, masks = read_case(image_path, label_path)
        for lesion_id, mask in enumerate(masks, start=1):
            sample = lesion_sample(image, mask, preprocessor, config, {"case": case, "lesion_id": lesion_id,
                                                                       "source": "own"})
            if sample is not None:
                paths.append(save_sample(folder, len(paths), sample))
        if progress is not None:
            progress(number + 1, len(cases))
    if not paths:
        raise LesionLocatorError(f"{dataset}: no lesion survived resampling to the model's spacing; check labelsTr.")
    source_file.write_text(json.dumps({**source, "complete": True, "samples": len(paths)}, indent=1))
    return paths
