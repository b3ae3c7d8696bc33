"""Requirement planning for the Slicer installer, with injected installed versions (no Slicer needed)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy
from packaging.utils import canonicalize_name

from LesionLocatorLib.models.requirements import (
    ENGINE_PACKAGES,
    SLICER_SHIPPED,
    installed_versions,
    plan_installation,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
NO_DEPS = {"nnunetv2", "dynamic-network-architectures", "icon-registration"}
# A fresh Slicer: its own Python packages, nothing of ours.
FRESH_SLICER = {"numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.4.1", "requests": "2.32.3",
                "packaging": "24.0", "Pillow": "10.1.0", "pip": "24.0"}


def names(states) -> set[str]:
    return {state.spec.name for state in states}


def test_fresh_slicer_plan_skips_shipped_packages_and_leaves_torch_to_pytorchutils():
    plan = plan_installation(FRESH_SLICER, (5, 10))
    assert names(plan.provided_by_slicer) == {"numpy", "scipy", "SimpleITK", "packaging"}
    assert plan.torch_action == "install" and plan.torch_requirement == ">=2.2"
    planned = names(plan.install) | names(plan.install_no_deps)
    assert not {canonicalize_name(name) for name in planned} & (SLICER_SHIPPED | {"torch"})
    assert NO_DEPS <= names(plan.install_no_deps)
    assert {"connected-components-3d", "scikit-image", "natsort", "pandas", "matplotlib"} <= names(plan.install)


def test_pip_commands_put_no_deps_first_and_constrain_the_rest():
    plan = plan_installation(FRESH_SLICER, (5, 10))
    no_deps, regular = plan.pip_commands("/tmp/ll-constraints.txt")
    assert no_deps[0] == "--no-deps"
    assert {"nnunetv2>=2.5,<3", "dynamic-network-architectures>=0.3.1,<0.5", "icon-registration>=1.1.5,<2"} <= set(
        no_deps
    )
    assert "connected-components-3d>=3.12" in regular and "scikit-image>=0.21" in regular
    assert regular[-2:] == ["-c", "/tmp/ll-constraints.txt"]
    requested = {canonicalize_name(re.split(r"[<>=!~]", argument)[0]) for argument in no_deps[1:] + regular[:-2]}
    assert not requested & {"torch", "torchvision", "timm", "numpy", "scipy", "simpleitk"}
    assert plan.pip_commands() == [no_deps, regular[:-2]]


def test_constraints_pin_what_slicer_ships_and_the_installed_torch():
    plan = plan_installation({**FRESH_SLICER, "torch": "2.13.0+cpu"}, (5, 12))
    pins = plan.constraints_text().splitlines()
    assert {"numpy==1.26.4", "scipy==1.13.1", "simpleitk==2.4.1", "pillow==10.1.0", "torch==2.13.0+cpu"} <= set(pins)
    assert not any(pin.startswith("pip==") for pin in pins)
    assert plan.torch_action == "none"


def test_slicer_api_depends_on_the_slicer_version():
    assert plan_installation(FRESH_SLICER, (5, 10)).pip_install_api == "slicer.util.pip_install"
    assert plan_installation(FRESH_SLICER, (5, 12)).pip_install_api == "slicer.packaging.pip_install"


def test_too_old_shipped_package_is_a_conflict_not_an_install():
    plan = plan_installation({**FRESH_SLICER, "SimpleITK": "2.2.1"}, (5, 10))
    assert names(plan.conflicts) == {"SimpleITK"}
    assert "SimpleITK" not in names(plan.install) | names(plan.install_no_deps)
    summary = plan.summary()
    assert "update 3D Slicer" in summary and "SimpleITK>=2.3 (found 2.2.1)" in summary


def test_shipped_package_missing_from_a_custom_build_is_installed():
    plan = plan_installation({name: v for name, v in FRESH_SLICER.items() if name != "scipy"}, (5, 10))
    assert "scipy" in names(plan.install)


def test_installed_versions_decide_satisfied_install_and_upgrade():
    installed = {**FRESH_SLICER, "torch": "2.1.0", "NNUNetV2": "2.8.1", "scikit_image": "0.19.3",
                 "Connected_Components_3D": "3.12.4", "icon-registration": "2.0.0", "natsort": "not-a-version"}
    plan = plan_installation(installed, (5, 10))
    assert plan.torch_action == "upgrade"
    assert {"nnunetv2", "connected-components-3d"} <= names(plan.satisfied)
    assert {"scikit-image", "natsort"} <= names(plan.install) and "icon-registration" in names(plan.install_no_deps)
    assert "PyTorch (torch>=2.2) will be updated from 2.1.0 by the PyTorch extension" in plan.summary()


def test_complete_environment_needs_nothing():
    lowest_allowed = {spec.name: re.match(r">=([\d.]+)", spec.specifier).group(1) for spec in ENGINE_PACKAGES}
    plan = plan_installation(lowest_allowed, (5, 12))
    assert plan.torch_action == "none" and not plan.needs_pip and plan.pip_commands() == []
    assert "nothing will be changed" in plan.summary()


def test_summary_lists_every_package_to_install():
    plan = plan_installation(FRESH_SLICER, (5, 10))
    summary = plan.summary()
    for state in plan.install + plan.install_no_deps:
        assert state.spec.requirement in summary
    assert "PyTorch extension (PyTorch Utils)" in summary and "without their declared dependencies" in summary


def test_every_pyproject_dependency_is_planned():
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    declared_names = {canonicalize_name(re.split(r"[<>=!~ ;\[]", dependency)[0]) for dependency in declared}
    assert declared_names <= {spec.key for spec in ENGINE_PACKAGES}


def test_installed_versions_reads_this_environment():
    versions = installed_versions(["numpy", "surely-not-installed-lesionlocator"])
    assert versions == {"numpy": numpy.__version__, "surely-not-installed-lesionlocator": None}
