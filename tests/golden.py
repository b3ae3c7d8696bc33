"""Helpers to run the official golden fixture cases (../shared/fixtures/official) through our engine."""
from __future__ import annotations

import json
import shlex
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "official"
MANIFEST = FIXTURES / "manifest.json"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture missing: {path}")
    return path


@lru_cache(maxsize=1)
def runs() -> dict[str, dict]:
    return {run["id"]: run for run in json.loads(require(MANIFEST).read_text())["runs"]}


def run_arguments(run_id: str) -> dict[str, list[str]]:
    """The official command line of a run as {flag: values}."""
    tokens = [t for t in shlex.split(runs()[run_id]["command"]) if "=" not in t or t.startswith("-")]
    arguments: dict[str, list[str]] = {}
    flag = None
    for token in tokens[1:]:
        if token.startswith("-"):
            flag = token
            arguments[flag] = []
        elif flag is not None:
            arguments[flag].append(token)
    return arguments


def golden_mask(run_id: str, file_name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(require(FIXTURES / "outputs" / run_id / file_name))))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)
