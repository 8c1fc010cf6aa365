"""The ``harness`` command: doctor, report, compare, study.

Each subcommand's work lives in its own module, imported only when that
subcommand runs, so ``harness doctor`` answers quickly and works without R.
A failure prints one readable line and exits non-zero; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("harness")


def _seed(text: str) -> int:
    """A seed for numpy/PyMC: a whole number from 0 to 2**32 - 1, refused up front."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 2**32 - 1")
    return value


def _cmd_doctor(args: argparse.Namespace) -> int:
    from harness.doctor import doctor, doctor_ok, format_doctor

    rows = doctor()
    print(format_doctor(rows))
    return 0 if doctor_ok(rows) else 1


def _adaptive_arguments(parser: argparse.ArgumentParser) -> None:
    """The adaptive-sampling budget (defaults: ``harness.pipeline.runner.FitSettings``)."""
    parser.add_argument(
        "--max-rounds", type=int, default=None, help="adaptive sampling: runs at most (default 8)"
    )
    parser.add_argument(
        "--max-draws",
        type=int,
        default=None,
        help="adaptive sampling: post-warm-up draws over all runs (default 6x the first run's)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="adaptive sampling: a wall-time cap in seconds (default none; a cap makes the "
        "verdict depend on the machine's speed)",
    )
    parser.add_argument(
        "--no-adaptive", action="store_true", help="one sampler run, however the diagnostics look"
    )


# --- report (owner: report engineer) -----------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="fit a shipped design with both engines and write its report")
    p.add_argument("design", help="a shipped design name, or 'all' for every design plus the index")
    p.add_argument("--out", type=Path, default=None, help="output HTML file (one design)")
    p.add_argument("--out-dir", type=Path, default=Path("reports"), help="folder for 'all'")
    p.add_argument("--seed", type=_seed, default=1, help="PyMC seed")
    p.add_argument("--refit", action="store_true", help="ignore the fit cache")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for 'all' (default: HARNESS_WORKERS, else one per core; 1: serial)",
    )
    _adaptive_arguments(p)
    _engines_argument(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.report.command import run_report_command

    return run_report_command(args)


# --- compare (owner: user-data engineer) -------------------------------------
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare lme4 and PyMC on your own CSV")
    p.add_argument("csv", type=Path, help="data file (CSV with a header row)")
    p.add_argument("--formula", required=True, help='lme4 formula, e.g. "y ~ x + (x | g)"')
    p.add_argument("--sigma-by", default=None, help="column with one residual SD per level")
    p.add_argument("--priors", default="weak", help="prior profile: weak, m14.1 or flat")
    # GLMM hook (issue 12)
    p.add_argument(
        "--family",
        default="gaussian",
        help="response family: gaussian, binomial, poisson or negbin (negative binomial, log link)",
    )
    p.add_argument("--link", default=None, help="link (binomial: logit or probit)")
    p.add_argument("--out", type=Path, default=None, help="report file (HTML)")
    p.add_argument("--json", type=Path, default=None, help="write the tables as JSON here")
    p.add_argument("--seed", type=_seed, default=1, help="PyMC seed")
    _adaptive_arguments(p)
    _engines_argument(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from harness.user_data import run_compare_command

    return run_compare_command(args)


# --- audit (issue 21) -------------------------------------------------------
def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="audit your own PyMC model against the harness's model and lme4",
        description="Audit MODEL.py, your own PyMC model: its likelihood, random-effects law, "
        "priors and posterior against the harness's model for --formula and against lme4. "
        "This RUNS THE CODE IN MODEL.py (it must define build(data) -> pymc.Model and "
        "MAPPING); audit only files you trust. Exit status 0 when the verdict is pass, 2 otherwise.",
    )
    p.add_argument("model", type=Path, help="your model file (Python; it is run)")
    p.add_argument("--data", type=Path, required=True, help="data file (CSV with a header row)")
    p.add_argument(
        "--formula", required=True, help='lme4 formula, e.g. "y ~ tx + (0 + tx | group)"'
    )
    p.add_argument("--sigma-by", default=None, help="column with one residual SD per level")
    p.add_argument("--family", default="gaussian", help="gaussian, binomial, poisson or negbin")
    p.add_argument("--link", default=None, help="link (binomial: logit or probit)")
    p.add_argument(
        "--priors", default="weak", help="the harness's prior profile: weak, m14.1, flat"
    )
    p.add_argument("--out", type=Path, default=None, help="report file (HTML)")
    p.add_argument("--json", type=Path, default=None, help="write the checks as JSON here")
    p.add_argument("--seed", type=_seed, default=1, help="seed of the prior draws and the sampler")
    p.add_argument("--draws", type=int, default=1000, help="posterior draws per chain")
    p.add_argument("--tune", type=int, default=1000, help="warm-up draws per chain")
    p.add_argument("--chains", type=int, default=4, help="chains")
    p.add_argument(
        "--no-posterior",
        action="store_true",
        help="skip sampling and lme4 (the posterior check then reads incomplete)",
    )
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from harness.cli_audit import run_audit_command

    return run_audit_command(args)


# --- study (owner: study engineer) -------------------------------------------
def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a simulation study (coverage, Type I error, SBC)")
    p.add_argument("name", help="study name")
    p.add_argument("--reps", type=int, default=None, help="replicates per condition")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (default: local)")
    p.add_argument("--out-dir", type=Path, default=Path("reports/studies"))
    p.add_argument("--seed", type=_seed, default=20261121, help="root seed")
    p.add_argument("--workers", type=int, default=None, help="local worker processes")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from harness.studies.command import run_study_command

    return run_study_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description="Fit one mixed model with lme4 and PyMC and compare them."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check R, lme4, rpy2, PyMC and the sampler")
    doctor.set_defaults(func=_cmd_doctor)
    _add_report(sub)
    _add_compare(sub)
    _add_study(sub)
    _add_audit(sub)
    return parser


def _engines(text: str) -> tuple[str, ...]:
    """``lme4,pymc``: registered engine names, refused up front (unknown, or not installed)."""
    from harness.engines.registry import check_installed, parse_engines

    try:
        names = parse_engines(text)
        check_installed(names)
    except (ValueError, RuntimeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return names


def _engines_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engines",
        type=_engines,
        default=None,
        help="engines to fit and compare, comma-separated, the reference lme4 among them "
        "(default: lme4,pymc)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harness`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from harness import progress

    progress.configure(show=not args.quiet)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"harness {args.command}: error: {message}", file=sys.stderr)
        return 1


def run() -> None:
    """The console script and ``python -m harness.cli``: :func:`main`, then a quick exit.

    Every exit handler still runs (R's temp folder, joining child processes,
    logging's flush); only the interpreter's module teardown is skipped, which
    took 1.4 s after a ``compare`` with numba, PyTensor and matplotlib loaded.
    Tests call :func:`main`, which returns.
    """
    status = 1

    def exit_now() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    # Registered before the work starts, so it runs after every handler the work registers.
    atexit.register(exit_now)
    from harness.child_processes import quiet_library_notices

    quiet_library_notices()
    try:
        status = main()
    except SystemExit as stop:  # argparse's usage errors and --help
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    sys.exit(status)


if __name__ == "__main__":
    run()
