"""The workflow's blinding steps: thin glue over :mod:`analysis.blinding` (its docstring says
what blinding does and why). Used by workflows/rules/*.smk while the workflow config has
``unblind: false`` (the default):

    blind.py workspace CONFIG --output FILE < workspace.json     signal-region data -> Asimov
    blind.py histograms CONFIG --output FILE < histograms.json   data sample out of the SRs
    blind.py cutflow CONFIG --output FILE < cutflow.json         data sample out of the SRs
    blind.py record CONFIG [--unblind] --output FILE             results/<analysis>/blinding.json

(The distributions are drawn by `diffana plot distributions --config CONFIG --blind`.)

The JSON steps read the diffana command's output from a pipe, so the unblinded signal-region
numbers are never written to disk. User errors: one line on stderr and exit code 2, as the
diffana CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from analysis import blinding
from analysis import config as configuration
from analysis.errors import AnalysisError, ConfigError
from analysis.files import json_text, write_atomically


def _stdin_json(what: str) -> Any:
    try:
        return json.loads(sys.stdin.read())
    except ValueError as err:
        raise ConfigError(f"<stdin>: not a {what} JSON document: {err}") from None


def _data_samples(config: Any) -> set[str]:
    return {sample.name for sample in config.samples if sample.data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    for step in ("workspace", "histograms", "cutflow", "record"):
        command = steps.add_parser(step)
        command.add_argument("config", metavar="CONFIG", help="analysis YAML")
        command.add_argument("--output", required=True, help="JSON file to write")
        if step == "record":
            command.add_argument("--unblind", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = configuration.load(args.config)
        regions = blinding.signal_regions(config)
        result: Any
        if args.step == "workspace":
            result = blinding.blind_workspace(_stdin_json("pyhf workspace"), regions)
        elif args.step == "histograms":
            payload = _stdin_json("diffana histograms")
            result = blinding.blind_histograms(payload, regions, _data_samples(config))
        elif args.step == "cutflow":
            result = blinding.blind_cut_flows(_stdin_json("diffana cutflow"), regions)
        else:
            result = blinding.blinding_record(config, unblind=args.unblind)
        write_atomically(args.output, json_text(result))
    except AnalysisError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
