"""Which Python packages the engine needs in 3D Slicer, and how to install them without breaking Slicer.

Pure planning: the caller passes the installed versions (from `installed_versions()` inside Slicer, or a dict
in tests) and gets an `InstallPlan`. The rules:

- Packages Slicer ships (numpy, SimpleITK, scipy, ...) are never installed or upgraded by us; every installed one
  is pinned in the constraints file so that no dependency upgrades it. A shipped package that is too old is
  reported as a conflict (update Slicer).
- torch is installed by the PyTorch extension (PyTorchUtils), which picks the CPU/CUDA build; we never pip it.
- nnunetv2, dynamic-network-architectures and icon-registration declare dependencies that pull torchvision
  (through timm), pin torch, or bring training-only tools. They are installed with `--no-deps` and what they
  import at run time is listed here explicitly.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

TORCH = "torch"
# Slicer's own Python packages (SuperBuild python-* projects): replacing them can break Slicer itself.
SLICER_SHIPPED = frozenset(
    canonicalize_name(name)
    for name in ("numpy", "scipy", "SimpleITK", "requests", "packaging", "pillow", "pydicom", "six", "certifi",
                 "idna", "urllib3", "charset-normalizer")
)
SLICER_PACKAGING_VERSION = (5, 12)  # first Slicer with slicer.packaging (slicer.util.pip_install delegates to it)


@dataclass(frozen=True)
class PackageSpec:
    """One distribution the engine needs: bounds, what it is for, and why (if so) it goes in with --no-deps."""

    name: str
    specifier: str
    purpose: str
    no_deps_reason: str | None = None

    @property
    def key(self) -> str:
        return canonicalize_name(self.name)

    @property
    def requirement(self) -> str:
        return f"{self.name}{self.specifier}"


ENGINE_PACKAGES: tuple[PackageSpec, ...] = (
    PackageSpec(TORCH, ">=2.2", "neural networks"),
    PackageSpec("numpy", ">=1.24", "arrays"),
    PackageSpec("SimpleITK", ">=2.3", "image reading, writing and resampling"),
    PackageSpec("scipy", ">=1.10", "image filters"),
    PackageSpec("connected-components-3d", ">=3.12", "lesion connected components"),
    PackageSpec("scikit-image", ">=0.21", "morphology and resizing"),
    PackageSpec("natsort", ">=8", "ordering of input files"),
    PackageSpec("nnunetv2", ">=2.5,<3", "official preprocessing and resampling",
                "its dependencies pin torch and pull timm/torchvision and training tools"),
    PackageSpec("dynamic-network-architectures", ">=0.3.1,<0.5", "ResidualEncoderUNet",
                "it depends on timm, which pulls torchvision"),
    PackageSpec("icon-registration", ">=1.1.5,<2", "uniGradICON registration network",
                "it depends on torchvision, itk and tensorboard, none used here"),
    # What the three packages above import at run time (their declared dependencies are not installed).
    PackageSpec("acvl-utils", ">=0.2.3,<0.3", "nnunetv2 cropping helpers",
                "it would install batchgenerators with its training dependencies"),
    PackageSpec("batchgenerators", ">=0.25", "nnunetv2 resampling helpers",
                "it pulls unittest2, future and scikit-learn, none used here"),
    PackageSpec("pandas", ">=1.5", "imported by nnunetv2 resampling"),
    PackageSpec("einops", ">=0.6", "imported by dynamic-network-architectures and nnunetv2"),
    PackageSpec("blosc2", ">=3", "imported by acvl-utils"),
    PackageSpec("tqdm", ">=4", "imported by nnunetv2"),
    PackageSpec("matplotlib", ">=3.7", "report figures; imported by icon-registration"),
    PackageSpec("packaging", ">=23", "version checks of this installer"),
)


@dataclass(frozen=True)
class PackageState:
    spec: PackageSpec
    installed: str | None

    def describe(self) -> str:
        found = self.installed or "not installed"
        return f"{self.spec.requirement} (found {found}): {self.spec.purpose}"


@dataclass
class InstallPlan:
    """What to install, what to leave alone, and the exact pip calls for Slicer."""

    slicer_version: tuple[int, int]
    torch: PackageState
    provided_by_slicer: list[PackageState] = field(default_factory=list)
    conflicts: list[PackageState] = field(default_factory=list)
    satisfied: list[PackageState] = field(default_factory=list)
    install: list[PackageState] = field(default_factory=list)
    install_no_deps: list[PackageState] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)

    @property
    def torch_action(self) -> str:
        """'none', 'install' or 'upgrade': what the PyTorch extension must do."""
        if _satisfies(self.torch):
            return "none"
        return "install" if self.torch.installed is None else "upgrade"

    @property
    def torch_requirement(self) -> str:
        """For PyTorchUtilsLogic().installTorch(torchVersionRequirement=...)."""
        return self.torch.spec.specifier

    @property
    def needs_pip(self) -> bool:
        return bool(self.install or self.install_no_deps)

    @property
    def pip_install_api(self) -> str:
        """The Slicer function to pass `pip_commands()` to (both take a list of pip arguments)."""
        if tuple(self.slicer_version) >= SLICER_PACKAGING_VERSION:
            return "slicer.packaging.pip_install"
        return "slicer.util.pip_install"

    def constraints_text(self) -> str:
        """A pip constraints file that keeps Slicer's packages and torch at their installed versions."""
        return "".join(f"{name}=={version}\n" for name, version in sorted(self.pins.items()))

    def pip_commands(self, constraints_file: str | None = None) -> list[list[str]]:
        """pip arguments, in order: the --no-deps packages first, then the others under the constraints file."""
        commands = []
        if self.install_no_deps:
            commands.append(["--no-deps", *(state.spec.requirement for state in self.install_no_deps)])
        if self.install:
            constraints = ["-c", constraints_file] if constraints_file else []
            commands.append([*(state.spec.requirement for state in self.install), *constraints])
        return commands

    def summary(self) -> str:
        """Text for the single confirmation dialog."""
        lines = ["LesionLocator needs these Python packages in 3D Slicer."]
        lines += _torch_lines(self)
        lines += _section("Will be installed:", self.install)
        lines += _section("Will be installed without their declared dependencies:", self.install_no_deps,
                          lambda state: f"   ({state.spec.no_deps_reason})")
        lines += _section("Already installed:", self.satisfied)
        lines += _section("Provided by 3D Slicer (left unchanged):", self.provided_by_slicer)
        lines += _section("Problems (not fixed automatically; update 3D Slicer):", self.conflicts)
        if not self.needs_pip and self.torch_action == "none" and not self.conflicts:
            lines.append("Everything is installed; nothing will be changed.")
        return "\n".join(lines)


def _torch_lines(plan: InstallPlan) -> list[str]:
    action = plan.torch_action
    if action == "none":
        return [f"PyTorch {plan.torch.installed} is installed."]
    verb = "installed" if action == "install" else f"updated from {plan.torch.installed}"
    return [f"PyTorch (torch{plan.torch_requirement}) will be {verb} by the PyTorch extension (PyTorch Utils), "
            "which picks the CPU or CUDA build for this computer."]


def _section(
    title: str, states: list[PackageState], extra: Callable[[PackageState], str] | None = None
) -> list[str]:
    if not states:
        return []
    lines = ["", title]
    for state in states:
        lines.append(f" - {state.describe()}")
        if extra is not None:
            lines.append(extra(state))
    return lines


def plan_installation(installed: Mapping[str, str | None], slicer_version: tuple[int, int]) -> InstallPlan:
    """Plan the installation from the installed versions (distribution name -> version, None if absent)."""
    versions = {canonicalize_name(name): version for name, version in installed.items()}
    states = [PackageState(spec, versions.get(spec.key)) for spec in ENGINE_PACKAGES]
    plan = InstallPlan(slicer_version=tuple(slicer_version), torch=next(s for s in states if s.spec.key == TORCH))
    plan.pins = {name: version for name, version in versions.items()
                 if version and (name in SLICER_SHIPPED or name == TORCH)}
    for state in states:
        if state.spec.key != TORCH:
            _bucket(plan, state).append(state)
    return plan


def _bucket(plan: InstallPlan, state: PackageState) -> list[PackageState]:
    shipped = state.spec.key in SLICER_SHIPPED and state.installed is not None
    if shipped:
        return plan.provided_by_slicer if _satisfies(state) else plan.conflicts
    if _satisfies(state):
        return plan.satisfied
    return plan.install_no_deps if state.spec.no_deps_reason else plan.install


def _satisfies(state: PackageState) -> bool:
    if state.installed is None:
        return False
    try:
        version = Version(state.installed)
    except InvalidVersion:
        return False
    return SpecifierSet(state.spec.specifier).contains(version, prereleases=True)


def installed_versions(names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Installed distribution versions (None when absent), by default of everything the planner looks at."""
    if names is None:
        names = [spec.name for spec in ENGINE_PACKAGES] + sorted(SLICER_SHIPPED)
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
