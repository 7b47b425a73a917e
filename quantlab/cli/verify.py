"""Verify a bundle (folder or zip): every file's sha256, then greedy generation in a fresh, isolated
interpreter compared with the ids recorded in the manifest. Exit 2 naming each bad file.
"""

from __future__ import annotations

import argparse
import json
import sys

from quantlab.package.verify import verify_bundle

HELP = "check a bundle's hashes and its recorded greedy generation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder or .zip written by quantlab package")
    p.add_argument("--python", default=None, help="interpreter for the generation check (a clean venv's python)")
    p.add_argument("--no-generate", action="store_true", help="check the hashes only")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    report = verify_bundle(args.bundle, python=args.python, generate=not args.no_generate)
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, "files_checked": report.files_checked,
                          "generation": report.generation, "seconds": round(report.seconds, 3)}))  # fmt: skip
    else:
        for problem in report.problems:
            print(f"quantlab verify: {problem}", file=sys.stderr)
        if report.ok:
            ids = report.generation["ids"] if report.generation else None
            print(f"ok: {args.bundle} ({report.files_checked} files, greedy ids {ids}, {report.seconds:.1f} s)")
    return 0 if report.ok else 2
