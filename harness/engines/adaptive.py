"""Sample until the diagnostics hold: adaptive, bounded and reproducible rounds of NUTS.

After each run every compared quantity is checked: the fixed effects
``beta``, the residual SD(s) ``sigma``, each block's SDs ``sd_<label>`` and
off-diagonal correlations ``corr_<label>``, and the aligned offsets of every
group that has data on the term (the groups :func:`harness.checks.compare` agrees
over).  A quantity fails with R-hat > 1.01 or bulk or tail ESS < 400
(ArviZ's rank-normalised ``rhat`` and ``ess``); any divergence fails the run.
Then, in this order, the loop

1. **re-parameterises** (once, after the first round): per random-effects
   block, centred when the groups' data inform their offsets more than the
   prior does in every direction, by the rule of :func:`suggest_centering`; when the new
   parameterisation samples worse (more divergences, or at equal divergences
   a smaller minimum ESS per gradient evaluation) the earlier run is kept;
2. on divergences **raises target_accept** along 0.8 -> 0.9 -> 0.95 -> 0.99
   (the draws of a divergent run are discarded: they are biased);
3. when R-hat alone fails (bulk and tail ESS already at the target, no
   divergences) and a chain stands out (its mean of the worst quantity more
   than :data:`ODD_CHAIN_Z` standard errors from the other chains')
   **restarts with a longer warm-up**: all kept chains are
   replaced by a fresh run with the warm-up doubled (at most
   ``AdaptiveSettings.max_tune_factor`` times the first run's).  High ESS with
   R-hat above the target and a stray chain mean it settled somewhere else
   (its mass matrix adapted badly): more chains of the same warm-up do not
   cure that, and dropping the odd chain would choose draws by how they
   look.  Without a stray chain the same signature is slow mixing: R-hat
   over chains of ``n`` effective draws each is inflated by roughly ``1/n``
   whatever the number of chains, so the loop **restarts with longer
   chains** (twice the draws per chain, while the draws budget allows) rather
   than adding chains.  The per-chain
   z-scores of the worst quantity (:func:`chain_disagreement`) go into the
   round's evidence either way;
4. otherwise **adds chains**: nutpie cannot continue a chain, so as many new
   chains as the first run had are sampled with a derived seed and
   concatenated with the kept ones.  Chains of the same model, the same
   settings and independent seeds, each after its own warm-up, are
   independent draws of one posterior, so pooling them is sound, and R-hat over
   more chains is the stricter check.  A longer run would repeat the warm-up
   and throw away the draws already made.

It stops when the diagnostics hold, or when the next round would exceed the
budget (:class:`AdaptiveSettings`: rounds, post-warm-up draws summed over all
runs, seconds), and records every round as plain JSON values.  Round 1 uses
the caller's seed (so it equals a non-adaptive fit), round ``r`` a seed
derived from ``(seed, r)``: the same seed gives the same rounds and the same
draws, unless the seconds budget binds (wall time is not reproducible; the
rounds and draws budgets are).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from harness.engines.pymc import Run
    from harness.model.priors import ResolvedPriors
    from harness.model.spec import Design

log = logging.getLogger("harness")

#: target_accept steps on divergences (a run at 0.8 goes to 0.9, then 0.95, then 0.99).
TARGET_ACCEPT_STEPS = (0.8, 0.9, 0.95, 0.99)

#: A chain whose mean lies further than this many standard errors from the
#: others' (:func:`chain_disagreement`) sampled somewhere else.  Agreeing chains
#: give roughly standard normal scores; 4 keeps false alarms rare over 8-16 chains.
ODD_CHAIN_Z = 4.0


@dataclass(frozen=True)
class AdaptiveSettings:
    """Targets and budget of the adaptive loop.

    Parameters
    ----------
    max_rounds : int
        Sampler runs at most, the first included.
    max_draws : int, optional
        Post-warm-up draws summed over every chain of every run (discarded
        runs included); default four times the first run's ``chains x draws``
        (16,000 with 4 x 1,000).
    max_seconds : float
        Wall time of the loop (compilation included); a round starts only when
        the time spent plus the last run's sampling time fits.
    rhat_max, ess_min : float
        The targets: R-hat at most ``rhat_max``, bulk and tail ESS at least ``ess_min``.
    max_tune_factor : int
        The longest warm-up of a restart, in multiples of the first run's
        (restarts double it: x2, x4, ...); 1 turns restarts off.
    """

    max_rounds: int = 4
    max_draws: int | None = None
    max_seconds: float = 300.0
    rhat_max: float = 1.01
    ess_min: float = 400.0
    max_tune_factor: int = 4

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, not {self.max_rounds}")
        if self.max_draws is not None and self.max_draws < 1:
            raise ValueError(f"max_draws must be at least 1, not {self.max_draws}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, not {self.max_seconds}")
        if self.max_tune_factor < 1:
            raise ValueError(f"max_tune_factor must be at least 1, not {self.max_tune_factor}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- diagnostics


def compared_quantities(idata: Any, design: Design) -> tuple[np.ndarray, list[str]]:
    """Draws of every compared scalar quantity, shape (chain, draw, quantity), and their names.

    Offsets are the aligned ones (:func:`harness.checks.align.block_offsets`) of the
    groups with data on the term; groups informed by the prior alone are left
    out, as the agreement metrics leave them out.
    """
    from harness.checks.align import block_offsets, informed_counts
    from harness.names import corr_var, sd_var

    posterior = idata.posterior
    columns: list[np.ndarray] = []
    names: list[str] = []

    def add(name: str, values: np.ndarray) -> None:
        columns.append(values.reshape(values.shape[0], values.shape[1], -1))
        names.append(name)

    def add_many(stem: str, array: Any, labels: list[str]) -> None:
        values = np.asarray(array.values, dtype=float)
        flat = values.reshape(values.shape[0], values.shape[1], -1)
        columns.append(flat)
        names.extend(f"{stem}[{label}]" for label in labels)

    add_many("beta", posterior["beta"], list(design.fixed_terms))
    if "sigma" not in posterior:  # binomial / Poisson: no residual scale
        pass
    elif design.sigma_levels is not None:
        add_many("sigma", posterior["sigma"], [str(v) for v in design.sigma_levels])
    else:
        add("sigma", np.asarray(posterior["sigma"].values, dtype=float))
    counts = informed_counts(design)
    for block in design.blocks:
        add_many(sd_var(block), posterior[sd_var(block)], list(block.terms))
        if block.correlated and block.n_terms > 1:
            corr = np.asarray(posterior[corr_var(block)].values, dtype=float)
            rows, cols = np.tril_indices(block.n_terms, k=-1)
            columns.append(corr[:, :, rows, cols])
            names.extend(
                f"{corr_var(block)}[{block.terms[a]},{block.terms[b]}]"
                for a, b in zip(rows, cols, strict=True)
            )
        offsets = block_offsets(posterior, block, design.spec.parameterization)
        values = np.asarray(offsets.values, dtype=float)  # (chain, draw, group, term)
        mine = counts[counts["group_factor"] == block.factor].set_index(["group", "term"])["n_obs"]
        for k, term in enumerate(block.terms):
            informed = [j for j, level in enumerate(block.levels) if mine.get((level, term), 0) > 0]
            if informed:
                columns.append(values[:, :, informed, k])
                names.extend(f"u_{block.label}[{block.levels[j]},{term}]" for j in informed)
    return np.concatenate(columns, axis=2), names


def _gradient_evaluations(idata: Any) -> float | None:
    stats = idata.sample_stats
    name = next((n for n in ("n_steps", "tree_size") if n in stats), None)
    return float(stats[name].sum()) if name else None


def diagnose(idata: Any, design: Design, settings: AdaptiveSettings) -> dict[str, Any]:
    """R-hat, bulk and tail ESS of every compared quantity, and divergences, as plain values.

    Returns
    -------
    dict
        ``ok``; ``max_r_hat``, ``min_ess_bulk``, ``min_ess_tail`` each with the
        ``*_quantity`` that reached it; ``divergences``; ``n_failing`` and
        ``failing`` (the first 20 names); ``chains`` and ``draws`` (per chain);
        ``ess_per_1k_gradients`` (min ESS per 1,000 gradient evaluations).
    """
    import arviz as az
    import xarray as xr

    values, names = compared_quantities(idata, design)
    data = xr.Dataset({"q": (("chain", "draw", "quantity"), values)})
    r_hat = np.asarray(az.rhat(data)["q"].values, dtype=float)
    bulk = np.asarray(az.ess(data, method="bulk")["q"].values, dtype=float)
    tail = np.asarray(az.ess(data, method="tail")["q"].values, dtype=float)
    # A constant quantity (NaN R-hat/ESS) carries no Monte Carlo error: it passes.
    failing = (
        (np.nan_to_num(r_hat, nan=1.0) > settings.rhat_max)
        | (np.nan_to_num(bulk, nan=np.inf) < settings.ess_min)
        | (np.nan_to_num(tail, nan=np.inf) < settings.ess_min)
    )
    stats = idata.sample_stats
    divergences = int(stats["diverging"].sum()) if "diverging" in stats else 0

    def extreme(array: np.ndarray, worst: str) -> tuple[float | None, str | None]:
        if np.all(np.isnan(array)):
            return None, None
        j = int(np.nanargmax(array) if worst == "max" else np.nanargmin(array))
        return float(array[j]), names[j]

    max_r, max_r_name = extreme(r_hat, "max")
    min_b, min_b_name = extreme(bulk, "min")
    min_t, min_t_name = extreme(tail, "min")
    gradients = _gradient_evaluations(idata)
    worst_ess = min(v for v in (min_b, min_t, math.inf) if v is not None)
    per_gradient = (
        1000.0 * worst_ess / gradients if gradients and math.isfinite(worst_ess) else None
    )
    return {
        "ok": bool(not failing.any() and divergences == 0),
        "max_r_hat": max_r,
        "max_r_hat_quantity": max_r_name,
        "min_ess_bulk": min_b,
        "min_ess_bulk_quantity": min_b_name,
        "min_ess_tail": min_t,
        "min_ess_tail_quantity": min_t_name,
        "divergences": divergences,
        "n_quantities": len(names),
        "n_failing": int(failing.sum()),
        "failing": [names[j] for j in np.flatnonzero(failing)[:20]],
        "chains": int(idata.posterior.sizes["chain"]),
        "draws": int(idata.posterior.sizes["draw"]),
        "gradient_evaluations": gradients,
        "ess_per_1k_gradients": per_gradient,
    }


def describe(diag: dict[str, Any]) -> str:
    """One line of what fails in a diagnosis (empty when nothing does)."""
    parts = []
    if diag["divergences"]:
        parts.append(f"{diag['divergences']} divergences")
    if diag["max_r_hat"] is not None and not diag["ok"]:
        parts.append(f"max R-hat {diag['max_r_hat']:.3f} ({diag['max_r_hat_quantity']})")
        parts.append(f"min bulk ESS {diag['min_ess_bulk']:.0f} ({diag['min_ess_bulk_quantity']})")
        parts.append(f"min tail ESS {diag['min_ess_tail']:.0f} ({diag['min_ess_tail_quantity']})")
    return "; ".join(parts)


def rhat_only(diag: dict[str, Any], settings: AdaptiveSettings) -> bool:
    """Does R-hat alone fail: bulk and tail ESS at the target and no divergences?

    That is the signature of chains that disagree (one adapted badly, or
    settled in a slow direction) rather than of too few draws.
    """
    if diag["ok"] or diag["divergences"] or diag["max_r_hat"] is None:
        return False
    ess = [v for v in (diag["min_ess_bulk"], diag["min_ess_tail"]) if v is not None]
    return diag["max_r_hat"] > settings.rhat_max and all(v >= settings.ess_min for v in ess)


def chain_disagreement(draws: np.ndarray) -> list[float]:
    """How far each chain's mean lies from the other chains', in standard errors.

    Parameters
    ----------
    draws : array, shape (chain, draw)
        One quantity.

    Returns
    -------
    list of float
        Per chain ``(mean_c - mean_others) / sqrt(se_c^2 + se_others^2)``,
        each standard error from the chain's (or the others' pooled) bulk ESS;
        ``|z|`` well above 3 marks a chain that sampled somewhere else.
    """
    import arviz as az

    values = np.asarray(draws, dtype=float)
    n_chains = values.shape[0]
    if n_chains < 2:
        return [0.0] * n_chains

    def mean_and_se(block: np.ndarray) -> tuple[float, float]:
        ess = float(az.ess(block, method="mean")) if block.shape[1] > 3 else float(block.size)
        sd = float(block.std(ddof=1))
        return float(block.mean()), sd / math.sqrt(max(ess, 1.0))

    scores = []
    for c in range(n_chains):
        mine, se_mine = mean_and_se(values[c : c + 1])
        others, se_others = mean_and_se(np.delete(values, c, axis=0))
        scale = math.hypot(se_mine, se_others)
        scores.append(float((mine - others) / scale) if scale > 0 else 0.0)
    return scores


def _disagreement_evidence(idata: Any, design: Design, diag: dict[str, Any]) -> dict[str, Any]:
    values, names = compared_quantities(idata, design)
    name = diag["max_r_hat_quantity"]
    scores = chain_disagreement(values[:, :, names.index(name)])
    return {"quantity": name, "chain_z": [round(z, 2) for z in scores]}


# --------------------------------------------------------------------------- parameterisation


def _row_information(posterior: Any, design: Design) -> np.ndarray:
    """Fisher information of each row about its linear predictor, at posterior medians.

    Gaussian: ``1 / sigma_i^2``.  Binomial and Poisson: the IRLS weight of the
    family at the linear predictor ``X beta + Z u + offset`` of the medians.
    """
    if "sigma" in posterior:
        sigma = np.asarray(posterior["sigma"].median(("chain", "draw")).values, dtype=float)
        if design.sigma_index is not None:
            return 1.0 / sigma[np.asarray(design.sigma_index)] ** 2
        return np.full(design.n, 1.0 / float(sigma) ** 2)
    from harness.checks.align import block_offsets

    eta = design.X.to_numpy(dtype=float) @ np.asarray(
        posterior["beta"].median(("chain", "draw")).values, dtype=float
    )
    for block in design.blocks:
        offsets = block_offsets(posterior, block, design.spec.parameterization)
        u = np.asarray(offsets.median(("chain", "draw")).values, dtype=float)
        values = np.asarray(block.values, dtype=float)
        eta = eta + np.sum(values * u[np.asarray(block.group_index)], axis=1)
    if design.offset is not None:
        eta = eta + np.asarray(design.offset, dtype=float)
    _, weight = design.family.score_weights(np.asarray(design.y, float), eta, design.trials)
    return np.asarray(weight, dtype=float)


def information_ratios(idata: Any, design: Design) -> dict[str, dict[str, Any]]:
    """Per block: how strongly the groups' data inform their offsets, relative to the prior.

    For group ``j`` the data precision of its offsets is
    ``D_j = sum_i z_i z_i' / sigma_i^2`` over the group's rows (``z_i``: the
    block's columns of Z; ``n_j / sigma^2`` for an intercept) and the prior
    precision ``Sigma^-1`` (``Sigma`` from the SDs and correlations), all at
    posterior medians.  ``min_eigenvalue`` is the median over the groups with
    data of the smallest eigenvalue of ``L' D_j L`` (``Sigma = L L'``): the data
    precision in the direction the data inform least, in units of the prior
    precision.  ``terms`` gives the same per term alone, ``D_j[k, k] sd_k^2``
    (which misses collinear columns: an intercept far from the data's ``x``
    is informed less than ``n_j`` says, which is why the rule uses the eigenvalue).
    """
    from harness.names import corr_var, sd_var

    posterior = idata.posterior
    row_weight = _row_information(posterior, design)
    ratios: dict[str, dict[str, Any]] = {}
    for block in design.blocks:
        k = block.n_terms
        sd = np.asarray(posterior[sd_var(block)].median(("chain", "draw")).values, dtype=float)
        corr = np.eye(k)
        if block.correlated and k > 1:
            corr = np.asarray(posterior[corr_var(block)].median(("chain", "draw")).values, float)
        cov = corr * np.outer(sd, sd)
        # Elementwise medians need not make a positive definite matrix: clip its eigenvalues.
        values, vectors = np.linalg.eigh(cov)
        root = vectors * np.sqrt(np.clip(values, 0.0, None))  # cov = root root'
        weighted = np.asarray(block.values, dtype=float) * np.sqrt(row_weight)[:, None]
        precision = np.zeros((block.n_levels, k, k))
        np.add.at(precision, block.group_index, weighted[:, :, None] * weighted[:, None, :])
        informed = np.trace(precision, axis1=1, axis2=2) > 0
        whitened = np.einsum("ai,gab,bj->gij", root, precision[informed], root)
        smallest = np.linalg.eigvalsh(whitened)[:, 0] if informed.any() else np.zeros(1)
        per_term = precision[informed][:, range(k), range(k)] * sd**2
        ratios[block.label] = {
            "min_eigenvalue": float(np.median(smallest)),
            "terms": {
                term: float(np.median(per_term[:, j])) if informed.any() else 0.0
                for j, term in enumerate(block.terms)
            },
        }
    return ratios


def suggest_centering(idata: Any, design: Design) -> tuple[frozenset[str], dict[str, Any]]:
    """Blocks to centre: those whose data outweigh the prior in every direction.

    The rule: a block is centred when the median over its groups with data of
    the smallest eigenvalue of the prior-whitened data precision exceeds 1
    (:func:`information_ratios`, at the posterior medians of a first run).  The
    data then pin each group's offsets down more than the SDs do, and the
    non-centred form would couple ``z`` and the SDs; with weak data the centred
    form has the funnel.  Blocks of ``parameterization="baked_in"`` are
    centred by construction and left alone.  The loop keeps the earlier run
    when the switch samples worse, so a wrong call costs one round.

    Returns
    -------
    centred : frozenset of block labels
    evidence : dict
        Per block: the ratios (see :func:`information_ratios`) and the choice.
    """
    if design.spec.parameterization != "offsets":
        return frozenset(), {}
    chosen = set()
    evidence: dict[str, Any] = {}
    for label, ratio in information_ratios(idata, design).items():
        centred = ratio["min_eigenvalue"] > 1.0
        if centred:
            chosen.add(label)
        evidence[label] = {**ratio, "choice": "centred" if centred else "non-centred"}
    return frozenset(chosen), evidence


# --------------------------------------------------------------------------- the loop


@dataclass
class Outcome:
    """What :func:`sample_adaptively` returns."""

    final: Run
    idata: Any
    compile_seconds: float
    sample_seconds: float
    record: dict[str, Any] = field(default_factory=dict)


def round_seed(seed: int, round_number: int) -> int:
    """The seed of a round: the caller's for round 1, then derived from (seed, round)."""
    if round_number == 1:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(round_number)]).generate_state(1)[0])


def concat_chains(first: Any, second: Any) -> Any:
    """Join two runs' InferenceData along ``chain`` (the second's chains renumbered after)."""
    import arviz as az
    import xarray as xr

    groups = {}
    offset = int(first.posterior.sizes["chain"])
    for name in first.groups():
        a = getattr(first, name)
        if "chain" in a.dims and name in second.groups():
            b = getattr(second, name)
            b = b.assign_coords(chain=np.arange(offset, offset + b.sizes["chain"]))
            a = a.assign_coords(chain=np.arange(offset))
            groups[name] = xr.concat([a, b], dim="chain", join="exact")
        else:
            groups[name] = a
    return az.InferenceData(**groups)


def _next_target_accept(current: float) -> float | None:
    higher = [t for t in TARGET_ACCEPT_STEPS if t > current + 1e-9]
    return higher[0] if higher else None


def _worse(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Does ``new`` sample worse than ``old`` (more divergences, else less ESS per gradient)?"""
    if new["divergences"] != old["divergences"]:
        return new["divergences"] > old["divergences"]
    a, b = new["ess_per_1k_gradients"], old["ess_per_1k_gradients"]
    return a is not None and b is not None and a < b


def _labels(design: Design, centered: Collection[str]) -> dict[str, str]:
    return {b.label: "centred" if b.label in centered else "non-centred" for b in design.blocks}


def sample_adaptively(
    design: Design,
    priors: ResolvedPriors,
    *,
    seed: int,
    draws: int,
    tune: int,
    chains: int,
    sampler: str,
    target_accept: float,
    progress: bool = False,
    centered: Collection[str] = (),
    settings: AdaptiveSettings | None = None,
    sample_once: Callable[..., Run],
) -> Outcome:
    """Run the sampler in rounds until the diagnostics hold or the budget is spent.

    Parameters
    ----------
    design, priors
        The model.
    seed, draws, tune, chains, sampler, target_accept, progress
        Of the first run (as :func:`harness.engines.pymc.fit_pymc` takes them).
    centered : collection of str
        Blocks centred in the first run.
    settings : AdaptiveSettings, optional
    sample_once : callable
        One sampler run, :func:`harness.engines.pymc.sample_once` (passed in by
        ``fit_pymc``, so this module never imports the model builder back).

    Returns
    -------
    Outcome
        ``record`` holds ``settings``, ``rounds`` (one dict per run: ``round``,
        ``seed``, ``action``, ``why``, ``target_accept``, ``parameterization``
        per block, ``chains``, ``draws``, ``tune``, ``before`` and ``after`` (see
        :func:`diagnose`; ``after`` describes the draws kept after the round),
        ``kept``, ``sample_seconds``, ``compile_seconds``), ``reliable``,
        ``budget_spent``, ``reason``, ``draws_sampled`` and ``seconds``.
    """
    settings = settings or AdaptiveSettings()
    max_draws = settings.max_draws if settings.max_draws is not None else 4 * chains * draws
    started = time.perf_counter()

    def run(
        round_number: int,
        n_chains: int,
        accept: float,
        blocks: Collection[str],
        warmup: int,
        length: int,
    ) -> Run:
        return sample_once(
            design,
            priors,
            seed=round_seed(seed, round_number),
            draws=length,
            tune=warmup,
            chains=n_chains,
            sampler=sampler,
            target_accept=accept,
            progress=progress,
            centered=blocks,
        )

    current = run(1, chains, target_accept, centered, tune, draws)
    current_tune, current_draws = tune, draws  # warm-up and chain length of the kept draws
    kept_idata = current.idata
    compile_s, sample_s = current.compile_seconds, current.sample_seconds
    draws_sampled = chains * draws
    diag = diagnose(kept_idata, design, settings)
    rounds: list[dict[str, Any]] = [
        {
            "round": 1,
            "seed": current.seed,
            "action": "first run",
            "why": "",
            "target_accept": current.target_accept,
            "parameterization": _labels(design, current.centered),
            "chains": chains,
            "draws": draws,
            "tune": tune,
            "before": None,
            "after": diag,
            "kept": True,
            "evidence": {},
            "sample_seconds": current.sample_seconds,
            "compile_seconds": current.compile_seconds,
        }
    ]
    last_run_seconds = current.sample_seconds
    reparameterized = False
    # (run, idata, diagnosis) to return to when a re-parameterisation or restart samples worse
    before_switch: tuple[Run, Any, dict[str, Any]] | None = None
    # A restart throws the kept draws away: only after more chains were tried, and only once.
    chains_added = restarted = False
    budget_spent = False
    reason = ""
    while True:
        if diag["ok"]:
            reason = f"diagnostics hold after {len(rounds)} round(s)"
            break
        problem = describe(diag)
        # Decide the next round.
        suggestion: frozenset[str] | None = None
        evidence: dict[str, Any] = {}
        if not reparameterized and design.spec.parameterization == "offsets":
            reparameterized = True
            suggestion, evidence = suggest_centering(kept_idata, design)
            if suggestion == current.centered:
                suggestion = None
        accept = current.target_accept
        blocks = current.centered
        warmup, length = current_tune, current_draws
        if suggestion is not None:
            action, blocks, add_chains = "re-parameterise", suggestion, False
            why = f"{problem}; rule (data/prior precision > 1 -> centred): " + ", ".join(
                f"{label}: {e['choice']} (smallest eigenvalue {e['min_eigenvalue']:.2g})"
                for label, e in evidence.items()
            )
        elif diag["divergences"]:
            step = _next_target_accept(accept)
            if step is None:
                reason = (
                    f"no remedy left: {problem} at target_accept {accept} "
                    "after the re-parameterisation rule"
                )
                break
            action, accept, add_chains = "raise target_accept", step, False
            why = f"{problem}: target_accept {current.target_accept} -> {step}"
        else:
            disagreement: dict[str, Any] = {}
            odd = False
            if rhat_only(diag, settings):
                disagreement = _disagreement_evidence(kept_idata, design, diag)
                # Next to the centring rule's evidence when that rule chose no change.
                evidence = {**evidence, "chain_disagreement": disagreement}
                scores = ", ".join(f"{z:+.1f}" for z in disagreement["chain_z"])
                odd = max(abs(z) for z in disagreement["chain_z"]) > ODD_CHAIN_Z
            may_restart = chains_added and not restarted
            if odd and may_restart and 2 * current_tune <= settings.max_tune_factor * tune:
                action, warmup, add_chains = "restart with longer warm-up", 2 * current_tune, False
                why = (
                    f"{problem}: R-hat fails with ESS at the target and a chain stands out "
                    f"(z of each chain's mean of {disagreement['quantity']} against the others: "
                    f"{scores}; |z| > {ODD_CHAIN_Z:g}): all {diag['chains']} chains replaced "
                    f"by {chains} with warm-up {current_tune} -> {warmup}"
                )
            elif (
                disagreement
                and may_restart
                and draws_sampled + 2 * chains * current_draws <= max_draws
            ):
                # R-hat over chains of ~n effective draws each carries noise of order
                # 1/n that more chains do not shrink: longer chains do.
                action, length, add_chains = "restart with longer chains", 2 * current_draws, False
                why = (
                    f"{problem}: R-hat fails with ESS at the target and no chain stands out "
                    f"(z of each chain's mean of {disagreement['quantity']}: {scores}): slow "
                    f"mixing, R-hat needs more effective draws per chain: all {diag['chains']} "
                    f"chains replaced by {chains} of {length} draws"
                )
            else:
                action, add_chains = "add chains", True
                why = f"{problem}: {chains} more chains with a derived seed"
                if disagreement:
                    why += (
                        f" (R-hat fails with ESS at the target; z of each chain's mean of "
                        f"{disagreement['quantity']}: {scores}"
                        + (
                            f"; no chain beyond |z| {ODD_CHAIN_Z:g}: slow mixing, not a stray "
                            "chain, so more draws)"
                            if not odd
                            else "; warm-up already at its longest)"
                        )
                    )
        # Budget: rounds, draws, seconds.
        planned_draws = chains * length
        elapsed = time.perf_counter() - started
        if len(rounds) >= settings.max_rounds:
            budget_spent, reason = True, f"budget spent: {settings.max_rounds} rounds"
        elif draws_sampled + planned_draws > max_draws:
            budget_spent = True
            reason = (
                f"budget spent: {draws_sampled} draws sampled, another {planned_draws} "
                f"would pass max_draws {max_draws}"
            )
        elif elapsed + last_run_seconds * (warmup + length) / (current_tune + current_draws) > (
            settings.max_seconds
        ):
            budget_spent = True
            reason = (
                f"budget spent: {elapsed:.0f} s used, another round (~{last_run_seconds:.0f} s) "
                f"would pass max_seconds {settings.max_seconds:.0f}"
            )
        if budget_spent:
            reason = f"{reason}; still {problem}; next would have been: {action}"
            break
        number = len(rounds) + 1
        log.info("adaptive round %d: %s (%s)", number, action, why)
        new = run(number, chains, accept, blocks, warmup, length)
        compile_s += new.compile_seconds
        sample_s += new.sample_seconds
        draws_sampled += planned_draws
        last_run_seconds = new.sample_seconds
        before = diag
        kept_flag = True
        restart = action.startswith("restart")
        previous_length = (current_tune, current_draws)
        if add_chains:
            kept_idata = concat_chains(kept_idata, new.idata)
            current = new
            chains_added = True
        else:
            before_switch = (current, kept_idata, diag)
            restarted = restarted or restart
            current, kept_idata = new, new.idata
            current_tune, current_draws = warmup, length
        diag = after = diagnose(kept_idata, design, settings)
        note = ""
        revertible = action == "re-parameterise" or restart
        if revertible and before_switch is not None and not diag["ok"]:
            old_run, old_idata, old_diag = before_switch
            if _worse(diag, old_diag):
                what = "draws" if restart else "parameterisation and draws"
                note = f"samples worse than before: the earlier {what} are kept"
                current, kept_idata, diag = old_run, old_idata, old_diag
                current_tune, current_draws = previous_length
                kept_flag = False
        rounds.append(
            {
                "round": number,
                "seed": new.seed,
                "action": action,
                "why": why if not note else f"{why}; {note}",
                "target_accept": new.target_accept,
                "parameterization": _labels(design, new.centered),
                "chains": chains,
                "draws": length,
                "tune": warmup,
                "before": before,
                "after": after,
                "kept": kept_flag,
                "evidence": evidence,
                "sample_seconds": new.sample_seconds,
                "compile_seconds": new.compile_seconds,
            }
        )
    record = {
        "settings": {**settings.as_dict(), "max_draws": max_draws},
        "rounds": rounds,
        "reliable": bool(diag["ok"]),
        "budget_spent": budget_spent,
        "reason": reason,
        "draws_sampled": draws_sampled,
        "seconds": time.perf_counter() - started,
        "final": {
            "target_accept": current.target_accept,
            "parameterization": _labels(design, current.centered),
            "chains": int(kept_idata.posterior.sizes["chain"]),
            "tune": current_tune,
            "draws": current_draws,
        },
    }
    level = logging.INFO if diag["ok"] else logging.WARNING
    log.log(level, "adaptive sampling: %s", reason)
    return Outcome(current, kept_idata, compile_s, sample_s, record)
