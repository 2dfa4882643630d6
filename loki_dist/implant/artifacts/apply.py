"""The `apply` command: merge an implant file into the base model it was trained on.

The result is the same standard Hugging Face directory a training run exports (export.py), with the
implant file beside it; the base must be the implant's own (implant_file.check_implant_fits) and not
itself an export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loki_dist.core import distributed, flags
from loki_dist.core.errors import UserError
from loki_dist.core.families import spec_from_dir
from loki_dist.implant.artifacts.export import BaseShards, check_output, export_model, run_collectively
from loki_dist.implant.artifacts.implant_file import ImplantRows, check_implant_fits, fingerprint


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base model directory the implant was trained on")
    parser.add_argument("--implant", required=True, help="implant.safetensors from a training run")
    parser.add_argument("--output", required=True, help="directory for the merged Hugging Face model")
    flags.add_overwrite(parser, "an existing --output")


def apply_implant(base_dir: Path, implant: Path, out_dir: Path, world, overwrite: bool = False) -> None:
    """Collective: out_dir := base_dir with the implant merged in (and the implant file beside it)."""
    with distributed.agreement(world):  # every rank checks; one agreed error before anything is written
        check_output(out_dir, overwrite, {"--base": base_dir, "--implant": implant})
        source = ImplantRows(implant)
        spec = spec_from_dir(base_dir, "--base")
        implanted = BaseShards.read(base_dir, spec).implanted
        if implanted:  # an export: a second implant would stack two trainings on rows chosen for one
            raise UserError(
                f"--base {base_dir}: {implanted} already carries a loki_dist implant; apply it to the "
                "original base model instead"
            )
        base_print = fingerprint(base_dir)
        check_implant_fits(source.metadata, spec, base_print, base_dir)
    export_model(base_dir, source, out_dir, world, base_print, implant=implant)


def run_apply(args: argparse.Namespace) -> None:
    out = Path(args.output)
    run_collectively(
        lambda world: apply_implant(Path(args.base), Path(args.implant), out, world, args.overwrite), out
    )
