"""Command line: argument parsing and output only; the work lives in the modules it calls.

Exit codes: 0 success; 2 refused input, bad usage or an unavailable backend asked for by name
(one line on stderr); 1 an unexpected failure (traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from appliance import INTENDED_USE, __version__

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


class Refused(Exception):
    """Bad input or usage; the message is printed as one line and the exit code is 2."""


class StderrProgress:
    """Progress of long work on stderr: one line per stage, redrawn in place on a terminal."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.stage: str | None = None
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            if self.stage is not None and self.tty:
                self.stream.write("\n")
            self.stage = stage
            if not self.tty:
                self.stream.write(f"{stage}: {total} steps\n")
        if self.tty:
            width = 24
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\r{stage:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
                              f"  {time.perf_counter() - self.start:5.1f}s")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self.stage is not None:
            self.stream.write("\n")
            self.stream.flush()


def fmt_pct(value: float | None) -> str:
    """Display rounding: one decimal, two below 1%."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def format_table(result: dict) -> str:
    scan = result["scan"]
    lines = [
        f"Patient {scan['patient_id']}  series {scan['series_instance_uid']}",
        f"Acquired {scan['acquired_at'] or 'unknown'}  shape {'x'.join(map(str, scan['shape']))}  "
        f"spacing {'/'.join(f'{s:.2f}' for s in scan['spacing_mm'])} mm",
        "",
        f"{'region':<7}{'lung ml':>10}{'opac. ml':>10}{'PLO %':>8}{'GGO %':>8}{'cons. %':>9}{'sev.':>6}",
    ]
    for name, r in result["regions"].items():
        sev = str(r["severity"]) if "severity" in r else ""
        lines.append(f"{name:<7}{r['lung_ml']:>10.1f}{r['opacity_ml']:>10.1f}{fmt_pct(r['plo_pct']):>8}"
                     f"{fmt_pct(r['ggo_pct']):>8}{fmt_pct(r['consolidation_pct']):>9}{sev:>6}")
    lines.append("")
    lines.append(f"CT severity score {result['severity_score']}/25")
    qa = result["qa"]
    if qa["ok"]:
        lines.append("QA: ok")
    else:
        lines.append("QA: REVIEW")
        lines += [f"  ! {f['code']}: {f['message']}" for f in qa["flags"]]
    b = result["backend"]
    lines.append(f"Backend {b['name']} ({b['device']}, {b['precision']}); total "
                 f"{result['timings_s']['total']:.1f} s")
    lines.append(f"Intended use: {INTENDED_USE}.")
    return "\n".join(lines)


def cmd_analyze(args: argparse.Namespace) -> int:
    from appliance.analysis import Analyzer
    from appliance.config import load_config

    config = load_config(args.config)
    overrides = {k: v for k, v in (("threads", args.threads), ("precision", args.precision)) if v}
    if overrides:
        import dataclasses

        config = dataclasses.replace(config, analysis=dataclasses.replace(config.analysis, **overrides))
    if not Path(args.path).exists():
        raise Refused(f"{args.path} does not exist")
    progress = StderrProgress()
    with Analyzer(config, backend=args.backend) as analyzer:
        analysis = analyzer.analyze(args.path, progress=progress)
    progress.finish()
    result = analysis.result
    if args.save_masks:
        from appliance.nifti import save_mask

        out = Path(args.save_masks)
        result["masks"] = {
            "lobes": str(save_mask(out / "lobes.nii.gz", analysis.lobes, analysis.volume)),
            "opacity": str(save_mask(out / "opacity.nii.gz", analysis.opacity, analysis.volume)),
        }
    if args.dicom_out:
        from appliance.dicom.outputs import write_dicom_outputs

        try:
            written = write_dicom_outputs(analysis, args.dicom_out)
        except ValueError as exc:
            raise Refused(f"cannot write DICOM results: {exc}") from None
        result["dicom_outputs"] = [str(p) for p in written]
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return EXIT_OK


def cmd_phantom(args: argparse.Namespace) -> int:
    from appliance import phantom_cli

    return phantom_cli.run(args)


def cmd_config(args: argparse.Namespace) -> int:
    from appliance.config import describe_defaults, load_config

    if args.check:
        load_config(args.check)
        print(f"{args.check}: ok")
    else:
        print(describe_defaults())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description=f"Chest-CT lung opacification per lobe ({INTENDED_USE}).",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="analyse one chest CT series (folder or files)")
    p.add_argument("path", help="DICOM folder, file")
    p.add_argument("--json", action="store_true", help="print the result contract as JSON")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default=None,
                   help="inference backend (default: the config's, auto)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: config)")
    p.add_argument("--save-masks", metavar="DIR", help="write lobes.nii.gz and opacity.nii.gz here")
    p.add_argument("--dicom-out", metavar="DIR", help="write DICOM SEG, SR and key images here")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("phantom", help="write a synthetic chest CT series with exact ground truth")
    p.add_argument("outdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--severity", default="moderate",
                   choices=["none", "mild", "moderate", "severe", "critical"])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--thickness", type=float, default=None, help="slice thickness in mm (0.625-2.5)")
    p.add_argument("--follow-up", type=int, default=0, metavar="K", help="K further studies, days apart")
    p.add_argument("--insert-into", metavar="DICOM_DIR", help="insert lesions into a real scan instead")
    p.add_argument("--motion", action="store_true", help="add a breathing motion artefact")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("config", help="print the default configuration (documented), or check a file")
    p.add_argument("--check", metavar="FILE", help="validate this TOML file")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="phantom patients analysed end to end")
    p.add_argument("--headless", action="store_true", help="no dashboard: print the results table")
    p.add_argument("--workdir", metavar="DIR", help="keep the demo's files here (default: a temp dir)")
    p.set_defaults(func=cmd_demo)

    from appliance import daemon_cli

    daemon_cli.add_parsers(sub)
    from appliance import tui

    tui.add_parser(sub)
    from appliance import send_cli

    send_cli.register(sub)
    from engines import cli as engines_cli

    engines_cli.add_parser(sub)
    from appliance.research import cli as research_cli

    research_cli.register(sub)
    return parser


def prefer_small_pages() -> None:
    """numpy asks the kernel for transparent huge pages on every large array; where the kernel
    then compacts memory on the page fault (THP defrag "madvise", the usual default) that cost
    8-9 s of kernel time per 300-slice analysis on the 2-core box (wall 22.4 s vs 13.0 s median,
    peak 1.41 vs 1.32 GB). So the appliance's processes use small pages unless
    NUMPY_MADVISE_HUGEPAGE says otherwise; the daemon's spawned workers inherit the setting."""
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    try:  # numpy read the variable when it was imported, possibly before the line above
        from numpy._core.multiarray import _set_madvise_hugepage  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _set_madvise_hugepage  # numpy 1.26
    _set_madvise_hugepage(os.environ["NUMPY_MADVISE_HUGEPAGE"] != "0")


def main(argv: list[str] | None = None) -> int:
    prefer_small_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Scanner headers break the standard in small ways (UUIDs as UIDs...): say nothing per file.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    from appliance.config import ConfigError
    from appliance.dicom.series import SeriesRefused
    from appliance.runtime.base import BackendUnavailable, ModelError

    try:
        return args.func(args)
    except (Refused, SeriesRefused, ConfigError, BackendUnavailable, ModelError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, or the traceback with --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"appliance: unexpected failure: {type(exc).__name__}: {exc} (rerun with --debug)",
                  file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    # `python -m appliance.cli`: run the imported module, whose Refused is the class the
    # subcommand modules raise (this __main__ copy has a Refused of its own)
    from appliance.cli import main as _main

    sys.exit(_main())
