"""``harness audit MODEL.py --data CSV --formula F``: the command's glue (read, audit, write)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["run_audit_command"]


def run_audit_command(args: argparse.Namespace) -> int:
    """Run the user's MODEL.py, audit it, write the page (and JSON); 0 when the verdict is "pass".

    Returns
    -------
    int
        0 for "pass", 2 for any other verdict (so scripts can gate on it).
    """
    from harness._io import check_outputs
    from harness.audit import audit, load_model_file
    from harness.user_data import read_data

    model_file = Path(args.model)
    csv = Path(args.data)
    out = (
        Path(args.out)
        if args.out is not None
        else Path("reports") / f"audit_{model_file.stem}.html"
    )
    json_path = Path(args.json) if args.json is not None else None
    check_outputs({"--out": out, "--json": json_path}, inputs=[csv, model_file])
    data = read_data(csv)
    user = load_model_file(model_file)  # runs the user's own code
    result = audit(
        user.build,
        data,
        args.formula,
        user.mapping,
        sigma_by=args.sigma_by,
        family=args.family,
        link=args.link,
        priors=args.priors,
        seed=args.seed,
        posterior=not args.no_posterior,
        draws=args.draws,
        tune=args.tune,
        chains=args.chains,
        source=user.source,
        model_path=str(model_file),
    )
    from harness.report.audit_page import write_audit

    write_audit(result, out)
    if json_path is not None:
        result.to_json(json_path)
    print(f"{model_file.name}: audit verdict {result.verdict}; report {out}")
    for check in result.checks.values():
        print(f"  {check.name}: {check.verdict}: {check.diagnosis}")
    return 0 if result.verdict == "pass" else 2
