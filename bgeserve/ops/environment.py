"""`bgeserve env snapshot | diff | rollback`: back up a Python environment before an upgrade, and undo it.

The facts come from the target interpreter's own pip (`python -m pip inspect`), so the commands work on
any virtual environment (`--python PATH`), not only the one bgeserve runs in. pip's `direct_url.json`
tells an editable install, a local wheel and a VCS checkout from an index download; a torch with a
local version label (`+cu121`, `+cpu`) came from the PyTorch index, and the restore keeps that index.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from bgeserve.errors import BgeServeError
from bgeserve.ops.torch_index import PYTORCH_INDEX

# The PyTorch index names its flavours by the local label: +cu128, +cpu, +rocm6.3, +xpu.
_TORCH_LABEL = re.compile(r"cu\d+|cpu|rocm[\d.]+|xpu")
# Never uninstall the tool doing the restoring.
_KEEP = {"pip"}
_PIP_TIMEOUT_S = 1800.0
_TORCH_FACTS_SCRIPT = """
import json
try:
    import torch
except Exception as exc:
    print(json.dumps({"installed": False, "error": f"{type(exc).__name__}: {exc}"}))
else:
    facts = {"installed": True, "version": str(torch.__version__), "cuda": torch.version.cuda}
    try:
        facts["cudnn"] = torch.backends.cudnn.version() if torch.version.cuda else None
        facts["arch_list"] = list(torch.cuda.get_arch_list())
    except Exception as exc:
        facts["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(facts))
"""


class EnvironmentCommandFailed(BgeServeError):
    """pip (or the target interpreter) could not be run, or its answer could not be read."""


@dataclass
class Package:
    """One installed distribution and where it came from."""

    name: str
    version: str
    source: str = "index"  # index | editable | local | url | vcs
    location: str | None = None  # the editable directory, the file/archive URL, or vcs+url@commit
    index_url: str | None = None  # a non-default index it must come from (the PyTorch index)

    @property
    def key(self) -> str:
        """The normalised name pip compares by (PEP 503)."""
        return canonical_name(self.name)

    def requirement(self) -> str:
        """The requirement line that installs exactly this package from where it came."""
        if self.source == "editable" and self.location:
            return f"-e {self.location}"
        if self.source in ("local", "url", "vcs") and self.location:
            return f"{self.name} @ {self.location}"
        return f"{self.name}=={self.version}"

    def describe(self) -> str:
        """The version plus its origin when it is not the default index, for reports."""
        if self.source != "index":
            return f"{self.version} ({self.source} {self.location})"
        if self.index_url:
            return f"{self.version} (from {self.index_url})"
        return self.version


@dataclass
class Snapshot:
    """What an environment held at one moment: packages plus torch's build facts."""

    created: str
    python: str
    python_version: str
    packages: dict[str, Package]
    torch: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the details file next to the requirements file)."""
        data = asdict(self)
        data["packages"] = [asdict(p) for p in sorted(self.packages.values(), key=lambda p: p.key)]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        """Reads `to_dict()` output back."""
        packages = {}
        for item in data.get("packages", []):
            package = Package(**item)
            packages[package.key] = package
        return cls(
            created=str(data.get("created", "")),
            python=str(data.get("python", "")),
            python_version=str(data.get("python_version", "")),
            packages=packages,
            torch=dict(data.get("torch") or {}),
        )


@dataclass
class Change:
    """One difference between a snapshot and now."""

    kind: str  # added | removed | upgraded | downgraded | changed
    name: str
    before: Package | None
    after: Package | None


def canonical_name(name: str) -> str:
    """PEP 503 normalisation: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(python: str, args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    try:
        return subprocess.run(
            [python, "-m", "pip", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise EnvironmentCommandFailed(f"no Python interpreter at {python}") from exc
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentCommandFailed(f"pip did not answer within {timeout:.0f} s") from exc


def classify(entry: dict[str, Any]) -> Package:
    """Turns one `pip inspect` "installed" entry into a Package with its origin."""
    metadata = entry.get("metadata", {})
    package = Package(name=str(metadata.get("name", "")), version=str(metadata.get("version", "")))
    direct = entry.get("direct_url")
    if direct:
        url = str(direct.get("url", ""))
        if "vcs_info" in direct:
            vcs = direct["vcs_info"]
            package.source = "vcs"
            package.location = f"{vcs.get('vcs', 'git')}+{url}@{vcs.get('commit_id', '')}"
        elif direct.get("dir_info", {}).get("editable"):
            package.source = "editable"
            package.location = _file_path(url)
        elif url.startswith("file:"):
            package.source = "local"
            package.location = url
        else:
            package.source = "url"
            package.location = url
        return package
    label = package.version.partition("+")[2]
    if label and _TORCH_LABEL.fullmatch(label):
        package.index_url = f"{PYTORCH_INDEX}/{label}"
    return package


def _file_path(url: str) -> str:
    parsed = urlparse(url)
    return unquote(parsed.path) if parsed.scheme == "file" else url


def installed_packages(python: str) -> dict[str, Package]:
    """Every distribution installed in the target interpreter's environment, keyed by canonical name."""
    done = _pip(python, ["inspect", "--local"])
    if done.returncode != 0:
        raise EnvironmentCommandFailed(
            f"`{python} -m pip inspect` failed (pip >= 22.2 is needed): {done.stderr.strip()[-500:]}"
        )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise EnvironmentCommandFailed(f"pip inspect printed no JSON: {exc}") from exc
    packages: dict[str, Package] = {}
    for entry in report.get("installed", []):
        package = classify(entry)
        if package.name:
            packages[package.key] = package
    return packages


def torch_facts(python: str) -> dict[str, Any]:
    """torch's version, CUDA build, cuDNN and arch list as the target interpreter sees them."""
    try:
        done = subprocess.run(
            [python, "-c", _TORCH_FACTS_SCRIPT], capture_output=True, text=True, timeout=180, check=False
        )
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError):
        return {"installed": False, "error": "could not run the interpreter to ask torch"}


def _python_version(python: str) -> str:
    try:
        done = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvironmentCommandFailed(f"cannot run {python}: {exc}") from exc
    if done.returncode != 0:
        raise EnvironmentCommandFailed(f"cannot run {python}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def take_snapshot(python: str) -> Snapshot:
    """Records the target interpreter's packages and torch facts."""
    version = _python_version(python)
    return Snapshot(
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        python=python,
        python_version=version,
        packages=installed_packages(python),
        torch=torch_facts(python),
    )


def snapshot_paths(out: str | Path) -> tuple[Path, Path]:
    """The requirements file and its JSON details file: `backup.txt` -> (`backup.txt`, `backup.json`)."""
    out = Path(out)
    if out.suffix == ".json":
        return out.with_suffix(".txt"), out
    return out, out.with_suffix(".json")


def write_snapshot(snapshot: Snapshot, out: str | Path) -> tuple[Path, Path]:
    """Writes a pip-installable requirements file plus the JSON details; returns both paths."""
    text_path, json_path = snapshot_paths(out)
    text_path.parent.mkdir(parents=True, exist_ok=True)
    text_path.write_text(requirements_text(snapshot, text_path), encoding="utf-8")
    json_path.write_text(json.dumps(snapshot.to_dict(), indent=2) + "\n", encoding="utf-8")
    return text_path, json_path


def requirements_text(snapshot: Snapshot, path: Path) -> str:
    """The requirements file: exact pins, the PyTorch index when torch came from it, editables last."""
    torch = snapshot.torch
    lines = [
        f"# bgeserve env snapshot, {snapshot.created}",
        f"# python: {snapshot.python} ({snapshot.python_version})",
    ]
    if torch.get("installed"):
        lines.append(
            f"# torch {torch.get('version')}, CUDA {torch.get('cuda') or 'none (CPU build)'}, "
            f"cuDNN {torch.get('cudnn')}, arch {' '.join(torch.get('arch_list') or []) or 'none'}"
        )
    lines.append(f"# restore: bgeserve env rollback {path} --yes   (details in {path.with_suffix('.json').name})")
    packages = sorted(snapshot.packages.values(), key=lambda p: p.key)
    # A requirements file takes index options globally; the pinned local label (+cu121) makes pip pick
    # the CUDA build from that index even though PyPI is searched too.
    for index in sorted({p.index_url for p in packages if p.index_url and p.source == "index"}):
        lines.append(f"--extra-index-url {index}")
    # Editables last: pip installs them after the pinned dependencies they rely on.
    for package in sorted(packages, key=lambda p: p.source == "editable"):
        if package.index_url:
            lines.append(f"# {package.name} from {package.index_url}")
        elif package.source != "index":
            # `-e path` and `name @ url` lines carry no version: keep it in a comment for `diff`.
            lines.append(f"# {package.source}: {package.name}=={package.version}")
        lines.append(package.requirement())
    return "\n".join(lines) + "\n"


def load_snapshot(path: str | Path) -> Snapshot:
    """Reads a snapshot from its JSON details (preferred) or, failing that, its requirements file."""
    text_path, json_path = snapshot_paths(path)
    if json_path.is_file():
        try:
            return Snapshot.from_dict(json.loads(json_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise EnvironmentCommandFailed(f"{json_path} is not a bgeserve snapshot: {exc}") from exc
    if not text_path.is_file():
        raise EnvironmentCommandFailed(f"no snapshot at {path} (looked for {text_path} and {json_path})")
    return parse_requirements(text_path.read_text(encoding="utf-8"))


def parse_requirements(text: str) -> Snapshot:
    """Reads a requirements file written by `requirements_text` (or a plain `pip freeze`)."""
    packages: dict[str, Package] = {}
    index_note: str | None = None
    pinned: tuple[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if found := re.fullmatch(r"# (?:editable|local|url|vcs): (\S+)==(\S+)", line):
            pinned = (found.group(1), found.group(2))
            continue
        if found := re.fullmatch(r"# \S+ from (\S+)", line):
            index_note = found.group(1)
            continue
        if not line or line.startswith(("#", "--")):
            continue
        if line.startswith("-e "):
            location = line[3:].strip()
            name, version = pinned or (Path(location).name, "")
            package = Package(name, version, "editable", location)
        elif " @ " in line:
            name, url = (s.strip() for s in line.split(" @ ", 1))
            source = "vcs" if re.match(r"\w+\+", url) else "local" if url.startswith("file:") else "url"
            version = pinned[1] if pinned and canonical_name(pinned[0]) == canonical_name(name) else ""
            package = Package(name, version, source, url)
        elif "==" in line:
            name, version = (s.strip() for s in line.split("==", 1))
            package = Package(name, version, index_url=index_note)
        else:
            continue
        packages[package.key] = package
        index_note, pinned = None, None
    return Snapshot(created="", python="", python_version="", packages=packages)


def _compare(old: str, new: str) -> int:
    """-1, 0 or 1 as `new` is lower, equal or higher than `old` by its public version."""
    old_public, new_public = old.split("+")[0], new.split("+")[0]
    try:
        from packaging.version import InvalidVersion, Version

        try:
            a, b = Version(old_public), Version(new_public)
            return (b > a) - (b < a)
        except InvalidVersion:
            pass
    except ImportError:
        pass
    a_parts = [int(p) if p.isdigit() else p for p in re.split(r"[.]", old_public)]
    b_parts = [int(p) if p.isdigit() else p for p in re.split(r"[.]", new_public)]
    try:
        return (b_parts > a_parts) - (b_parts < a_parts)
    except TypeError:  # mixed int/str parts: fall back to text order
        return (new_public > old_public) - (new_public < old_public)


def diff(before: dict[str, Package], after: dict[str, Package]) -> list[Change]:
    """What changed from `before` to `after`, sorted by kind then name.

    A different version is an upgrade or downgrade by its public part; the same version with a
    different build (+cu121 -> +cu128) or origin (index -> editable) is "changed".
    """
    changes: list[Change] = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old is None and new is not None:
            changes.append(Change("added", new.name, None, new))
        elif new is None and old is not None:
            changes.append(Change("removed", old.name, old, None))
        elif old is not None and new is not None:
            order = _compare(old.version, new.version) if old.version and new.version else 0
            if order:
                changes.append(Change("upgraded" if order > 0 else "downgraded", new.name, old, new))
            elif (old.version and old.version != new.version) or (old.source, old.location) != (
                new.source,
                new.location,
            ):
                changes.append(Change("changed", new.name, old, new))
    rank = {"upgraded": 0, "downgraded": 1, "changed": 2, "added": 3, "removed": 4}
    return sorted(changes, key=lambda c: (rank[c.kind], canonical_name(c.name)))


def render_diff(changes: list[Change]) -> str:
    """The human report: one aligned line per change."""
    if not changes:
        return "No difference from the snapshot."
    width = max(len(c.name) for c in changes)
    lines = []
    for change in changes:
        if change.before and change.after:
            detail = f"{change.before.describe()} -> {change.after.describe()}"
        else:
            detail = (change.after or change.before).describe()  # type: ignore[union-attr]
        lines.append(f"  {change.kind:<10}  {change.name:<{width}}  {detail}")
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.kind] = counts.get(change.kind, 0) + 1
    lines.append(", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return "\n".join(lines)


def rollback_commands(python: str, snapshot: Snapshot, changes: list[Change]) -> list[list[str]]:
    """The pip commands that turn the current environment back into the snapshot.

    Added packages are uninstalled; everything else is installed at its exact recorded version from
    where it came, without dependencies (the snapshot already lists every dependency exactly).
    """
    pip = [python, "-m", "pip"]
    commands: list[list[str]] = []
    added = sorted(c.name for c in changes if c.kind == "added" and canonical_name(c.name) not in _KEEP)
    if added:
        commands.append([*pip, "uninstall", "-y", *added])
    restore = [snapshot.packages[canonical_name(c.name)] for c in changes if c.kind != "added"]
    install = [*pip, "install", "--no-deps", "--force-reinstall"]
    by_index: dict[str | None, list[str]] = {}
    for package in restore:
        if package.source == "index":
            by_index.setdefault(package.index_url, []).append(package.requirement())
    for index in sorted(by_index, key=lambda i: i or ""):
        options = ["--index-url", index] if index else []
        commands.append([*install, *options, *by_index[index]])
    for package in restore:
        if package.source == "editable" and package.location:
            commands.append([*install, "-e", package.location])
        elif package.source != "index":
            commands.append([*install, package.requirement()])
    return commands


def run_commands(commands: list[list[str]], echo: Any = print) -> list[str]:
    """Runs the commands one after another; returns the failures (the rest still run)."""
    failures = []
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    for command in commands:
        echo(f"$ {shlex.join(command)}")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, env=env, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(f"{shlex.join(command)}: {exc}")
            continue
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            failures.append(f"{shlex.join(command)} exited {done.returncode}: " + " | ".join(tail))
    return failures


def default_python() -> str:
    """The interpreter bgeserve runs in: the usual target."""
    return sys.executable
