"""CLI for the ops area: `bgeserve doctor` and `bgeserve env snapshot | diff | rollback`.

Nothing heavy is imported here: torch is touched only inside `probe()`, when `doctor` runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from bgeserve.errors import BgeServeError

DEFAULT_SNAPSHOT = "requirements_backup.txt"


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `doctor` and `env` to the `bgeserve` parser."""
    doctor = sub.add_parser(
        "doctor",
        help="check Python, torch, CUDA, driver and GPUs; optionally load a model",
        description="Checks the environment a bgeserve service runs in. Exit status 0 when nothing "
        "fails (warnings allowed), 1 when a check fails, 2 on bad arguments.",
    )
    doctor.add_argument("--model", help="also load this model, embed one text and check the output")
    doctor.add_argument(
        "--device",
        default=None,
        help="device for --model (default: $DEVICE, else auto)",
    )
    doctor.add_argument("--dtype", default="auto", help="dtype for --model (default auto)")
    doctor.add_argument("--json", action="store_true", help="print a machine-readable report")
    doctor.add_argument(
        "--facts",
        metavar="FILE",
        help="judge recorded facts (a `doctor --json` report) instead of probing this machine",
    )
    doctor.set_defaults(func=run_doctor)

    env = sub.add_parser(
        "env",
        help="snapshot, diff and roll back the Python environment around an upgrade",
        description="Back up the installed packages before an upgrade, see what changed, restore.",
    )
    env_sub = env.add_subparsers(dest="env_command", metavar="ACTION")
    env.set_defaults(func=lambda args: _usage(env))

    python_help = "the environment's interpreter (default: the one running bgeserve)"
    snapshot = env_sub.add_parser("snapshot", help="record exact package versions and torch/CUDA facts")
    snapshot.add_argument(
        "--out",
        default=DEFAULT_SNAPSHOT,
        help=f"requirements file to write; the details go next to it as .json (default {DEFAULT_SNAPSHOT})",
    )
    snapshot.add_argument("--python", default=None, help=python_help)
    snapshot.set_defaults(func=run_snapshot)

    diff = env_sub.add_parser("diff", help="what changed since a snapshot (exit 0: nothing, 1: changes)")
    diff.add_argument("file", help="the snapshot (.txt or .json)")
    diff.add_argument("--python", default=None, help=python_help)
    diff.add_argument("--json", action="store_true", help="print the changes as JSON")
    diff.set_defaults(func=run_diff)

    rollback = env_sub.add_parser("rollback", help="show (and with --yes run) the pip commands that restore a snapshot")
    rollback.add_argument("file", help="the snapshot (.txt or .json)")
    rollback.add_argument("--yes", action="store_true", help="run the commands instead of only showing them")
    rollback.add_argument("--python", default=None, help=python_help)
    rollback.set_defaults(func=run_rollback)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _error(message: str) -> int:
    print(f"bgeserve: error: {message}", file=sys.stderr)
    return 2


def run_doctor(args: argparse.Namespace) -> int:
    """`bgeserve doctor`: probe (or replay) the facts, judge them, print the report."""
    from bgeserve.ops import doctor
    from bgeserve.ops.gpu_probe import load_facts, probe

    if args.facts:
        try:
            facts = load_facts(args.facts)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            return _error(f"cannot read recorded facts from {args.facts}: {exc}")
    else:
        facts = probe()
    checks = doctor.run_checks(facts)
    if args.model is not None:
        if args.facts:
            return _error("--model loads the model on this machine; it cannot be combined with --facts")
        # DEVICE may be the service's comma list; one device is enough to load the model on.
        device = args.device or (facts.device_env or "auto").split(",")[0].strip() or "auto"
        from bgeserve.ops.model_check import check_model

        checks.append(check_model(args.model, device, args.dtype))
    if args.json:
        print(doctor.render_json(checks, facts))
    else:
        print(doctor.render_table(checks))
    return doctor.exit_status(checks)


def _python(args: argparse.Namespace) -> str:
    from bgeserve.ops.environment import default_python

    return args.python or default_python()


def run_snapshot(args: argparse.Namespace) -> int:
    """`bgeserve env snapshot`: write the requirements file and its JSON details."""
    from bgeserve.ops import environment

    try:
        snapshot = environment.take_snapshot(_python(args))
        text_path, json_path = environment.write_snapshot(snapshot, args.out)
    except (BgeServeError, OSError) as exc:
        return _error(str(exc))
    torch = snapshot.torch
    torch_text = (
        f"torch {torch.get('version')} (CUDA {torch.get('cuda') or 'none: CPU build'})"
        if torch.get("installed")
        else "torch not installed"
    )
    print(f"Saved {len(snapshot.packages)} packages, {torch_text}, to {text_path} (details: {json_path}).")
    print(f"Restore later with: bgeserve env rollback {shlex.quote(str(text_path))} --yes")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """`bgeserve env diff`: compare the environment now with a snapshot."""
    from bgeserve.ops import environment

    try:
        snapshot = environment.load_snapshot(args.file)
        changes = environment.diff(snapshot.packages, environment.installed_packages(_python(args)))
    except (BgeServeError, OSError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps([_change_dict(c) for c in changes], indent=2))
    else:
        print(f"Changes since {args.file}" + (f" ({snapshot.created})" if snapshot.created else "") + ":")
        print(environment.render_diff(changes))
    return 1 if changes else 0


def _change_dict(change: object) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(change)  # type: ignore[call-overload]


def run_rollback(args: argparse.Namespace) -> int:
    """`bgeserve env rollback`: show the restoring pip commands; run and verify them with --yes."""
    from bgeserve.ops import environment

    python = _python(args)
    try:
        snapshot = environment.load_snapshot(args.file)
        changes = environment.diff(snapshot.packages, environment.installed_packages(python))
    except (BgeServeError, OSError) as exc:
        return _error(str(exc))
    if not changes:
        print("Nothing to roll back: the environment matches the snapshot.")
        return 0
    print(environment.render_diff(changes))
    commands = environment.rollback_commands(python, snapshot, changes)
    print("\nRestoring commands:")
    for command in commands:
        if "--index-url" in command:
            index = command[command.index("--index-url") + 1]
            print(f"  # from the PyTorch index ({index}): CUDA builds of torch are not on PyPI")
        print(f"  {shlex.join(command)}")
    if not args.yes:
        print("\nDry run: nothing was changed. Run again with --yes to execute these commands.")
        return 0
    print()
    failures = environment.run_commands(commands)
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    try:
        remaining = environment.diff(snapshot.packages, environment.installed_packages(python))
    except BgeServeError as exc:
        return _error(f"the commands ran but the result could not be checked: {exc}")
    if remaining:
        print("\nStill different from the snapshot:")
        print(environment.render_diff(remaining))
        return 1
    print(f"\nRestored: the environment matches the snapshot ({len(snapshot.packages)} packages).")
    return 0
