"""Sample until the diagnostics hold: adaptive, bounded and reproducible rounds of NUTS.

After each run every compared quantity is checked: the fixed effects
``beta``, the residual SD(s) ``sigma``, each block's SDs ``sd_<label>`` and
off-diagonal correlations ``corr_<label>``, and the aligned offsets of every
group that has data on the term (the groups :func:`harness.checks.compare` agrees
over).  A quantity fails with R-hat > 1.01 or bulk or tail ESS < 400
(ArviZ's rank-normalised ``rhat`` and ``ess``); any divergence fails the run.
The next round is chosen by what the kept draws show (:func:`plan_next`):

0. **continue the chains** (nutpie: :class:`harness.engines.samplers.ExtendableChains`)
   when they agree (no stray chain), did not diverge and only fall short: the
   same chains sampled further, by the factor R-hat and ESS need
   (:func:`extension_factor`, at most doubled per round), with no new warm-up
   and no draw thrown away.  It comes first when it adds fewer draws than a
   new run; otherwise after the remedies below have changed what they change
   (a new run after the first samples :data:`NEW_RUN_SHARE` of the first
   run's draws and is itself continued as far as it needs);
1. **re-parameterise** (once, after the first round, whatever fails): per
   random-effects block, centred when the groups' data inform their offsets
   more than the prior does in every direction, by the rule of
   :func:`suggest_centering`;
2. **divergences** (the draws of a divergent run are discarded: they are
   biased): **raise target_accept** along 0.8 -> 0.9 -> 0.95 -> 0.99; at
   0.99, the **other geometry** (centred <-> non-centred) of the block(s)
   whose SDs the divergent draws set apart (:func:`divergence_blocks`).  When
   that too leaves divergences, the reason names the diverging block, its
   levels and, for few levels or a very wide SD posterior, that its SD is
   barely identified by the data;
3. **R-hat fails** (no divergences): the per-chain z-scores of the worst
   quantity (:func:`chain_disagreement`) decide.  A **stray chain** (``|z| >``
   :data:`ODD_CHAIN_Z`: it settled elsewhere, its mass matrix adapted badly)
   gets a **restart with a longer warm-up** (all chains replaced, warm-up
   doubled up to ``max_tune_factor`` times the first run's); with the
   warm-up at its longest, more chains.  Without a stray chain it is **slow
   mixing**: R-hat over chains of ``n`` effective draws each is inflated by
   roughly ``1/n`` whatever the number of chains, so more chains only make
   the test stricter; the chains are **continued** (0.) while that lowers
   R-hat, then (nutpie) the **low-rank mass matrix** is tried; a sampler
   whose chains cannot be continued **restarts with longer chains** (draws
   and warm-up doubled); after that the **other geometry** of the worst
   quantity's block;
4. **ESS short, R-hat holding**: the chains continued (0.); where they cannot
   be (PyMC's sampler, pooled runs, the budget), either **added chains**
   (independent chains of one posterior pool soundly) or a **restart with
   longer chains**, whichever costs fewer
   iterations for the ESS missing; chains are added only while R-hat has
   room to spare (:data:`RHAT_ROOM`), since chains of the same length keep
   its noise.

A re-parameterisation, other geometry or restart that samples worse than the
draws it would replace is recorded and not kept.  The loop stops when the
diagnostics hold, when no remedy is left, or when the next round would pass
the budget (:class:`AdaptiveSettings`): rounds and post-warm-up draws summed
over all runs (default six times the first run's), both counted, never
timed, so the same seed gives the same rounds, draws and verdict on a fast
or a busy machine.  ``max_seconds`` is an optional user cap on wall time
(default none); setting it gives up that reproducibility.  Every round is
recorded as plain JSON values with its evidence.  Round 1 uses the caller's
seed (so it equals a non-adaptive fit), round ``r`` a seed derived from
``(seed, r)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.engines.samplers import SamplerFailed

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

#: The default draws budget, in multiples of the first run's ``chains x draws``:
#: room for the first run, the re-parameterisation, two target_accept steps and
#: the other geometry, or for one restart with chains of twice the length.
DRAWS_FACTOR = 6

#: A block whose log-SD in the divergent draws lies this many posterior SDs from
#: the other draws' is where the sampler diverges (:func:`divergence_blocks`).
DIVERGENCE_Z = 1.0

#: An SD from this many levels or fewer (1-2 degrees of freedom) is barely identified ...
FEW_LEVELS = 3

#: ... as is one whose 90% posterior interval spans this factor or more.
SD_SPREAD = 10.0

#: More draws are planned for this multiple of the ESS missing (ESS is itself noisy).
ESS_MARGIN = 1.2

#: Chains of the same length are added for ESS only while R-hat - 1 is at most
#: this share of the target's margin (``rhat_max - 1``); beyond it, longer chains.
RHAT_ROOM = 0.5

#: Extended chains aim at R-hat - 1 of this share of the target's margin.
RHAT_AIM = 0.8

#: A new run after the first (another geometry, target_accept, mass matrix) samples this
#: share of the first run's draws per chain when its chains can be continued: it is
#: judged on them, and continued only as far as the targets need.
NEW_RUN_SHARE = 0.5

#: ... but never fewer draws per chain than this (R-hat and ESS need some length to read).
NEW_RUN_MIN_DRAWS = 100

#: A new run (nutpie) is sampled in stretches of this share of its draws per chain and
#: stopped after the first stretch with a divergence: divergent draws call for a remedy
#: whatever their number, so the rest of such a run would be sampled only to be replaced.
DIVERGENCE_CHECK_SHARE = 0.25

#: One extension at most multiplies the chains' length by this (then the draws are judged again).
MAX_EXTENSION = 2.0

#: Slowly mixing chains that need this many times their length try the low-rank mass
#: matrix's short run before being continued.
LOW_RANK_FIRST = 4.0

#: Extending again needs the last extension to have cut R-hat - 1 by this share at least;
#: otherwise the chains are not just short, they mix slowly, and the geometry is next.
EXTENSION_GAIN = 0.15


@dataclass(frozen=True)
class AdaptiveSettings:
    """Targets and budget of the adaptive loop.

    Parameters
    ----------
    max_rounds : int
        Sampler runs at most, the first included.
    max_draws : int, optional
        Post-warm-up draws summed over every chain of every run (discarded
        runs included); default :data:`DRAWS_FACTOR` (6) times the first run's
        ``chains x draws`` (24,000 with 4 x 1,000).  Counted, not timed: the
        same seed gives the same rounds on any machine.
    max_seconds : float, optional
        A user cap on the loop's wall time (compilation included): a round
        starts only when the time spent plus its estimated sampling time
        fits.  Default None (no cap); a cap makes the verdict depend on the
        machine's speed and load.
    rhat_max, ess_min : float
        The targets: R-hat at most ``rhat_max``, bulk and tail ESS at least ``ess_min``.
    max_tune_factor : int
        The longest warm-up of a restart, in multiples of the first run's
        (restarts double it: x2, x4, ...); 1 turns restarts off.
    """

    max_rounds: int = 8
    max_draws: int | None = None
    max_seconds: float | None = None
    rhat_max: float = 1.01
    ess_min: float = 400.0
    max_tune_factor: int = 4

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, not {self.max_rounds}")
        if self.max_draws is not None and self.max_draws < 1:
            raise ValueError(f"max_draws must be at least 1, not {self.max_draws}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, not {self.max_seconds}")
        if self.max_tune_factor < 1:
            raise ValueError(f"max_tune_factor must be at least 1, not {self.max_tune_factor}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- diagnostics


def compared_quantities(idata: Any, design: Design) -> tuple[np.ndarray, list[str]]:
    """Draws of every compared scalar quantity, shape (chain, draw, quantity), and their names.

    Offsets are the aligned ones (:func:`harness.engines.offsets.block_offsets`) of the
    groups with data on the term; groups informed by the prior alone are left
    out, as the agreement metrics leave them out.
    """
    from harness.engines.offsets import block_offsets, informed_counts
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
    from harness.engines.offsets import block_offsets

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
    family = design.family.at_posterior_median(posterior)  # its own parameters (NB theta) too
    _, weight = family.score_weights(np.asarray(design.y, float), eta, design.trials)
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


# --------------------------------------------------------------------------- divergences


def divergence_blocks(idata: Any, design: Design) -> dict[str, dict[str, Any]]:
    """Per random-effects block: where its SDs sit in the divergent draws, and how well known they are.

    Divergent transitions gather where the geometry is hardest: for a funnel,
    at the SD values where the offsets' scale changes fastest.  ``z`` is the
    largest over the block's terms of ``|mean_div - mean_ok| / sd_ok`` of
    ``log sd`` (divergent draws against the others): a block whose SD sits
    apart in the divergent draws is the one that diverges.  ``levels`` and
    the SD's 90% posterior interval (``sd_q05``, ``sd_q95``, the widest term)
    say how well the data identify that SD.
    """
    from harness.names import sd_var

    stats = idata.sample_stats
    if "diverging" not in stats:
        return {}
    diverging = np.asarray(stats["diverging"].values, dtype=bool).ravel()
    found: dict[str, dict[str, Any]] = {}
    for block in design.blocks:
        values = np.asarray(idata.posterior[sd_var(block)].values, dtype=float)
        flat = values.reshape(-1, values.shape[-1] if values.ndim > 2 else 1)
        logs = np.log(np.clip(flat, 1e-300, None))
        score = 0.0
        if diverging.any() and (~diverging).any():
            spread = logs[~diverging].std(axis=0)
            gap = np.abs(logs[diverging].mean(axis=0) - logs[~diverging].mean(axis=0))
            with np.errstate(divide="ignore", invalid="ignore"):
                scores = np.where(spread > 0, gap / spread, 0.0)
            finite = scores[np.isfinite(scores)]
            score = float(finite.max()) if finite.size else 0.0
        low, high = np.quantile(flat, [0.05, 0.95], axis=0)
        widest = int(np.argmax(high / np.clip(low, 1e-300, None)))
        found[block.label] = {
            "z": round(score, 2),
            "levels": int(block.n_levels),
            "sd_q05": float(low[widest]),
            "sd_q95": float(high[widest]),
        }
    return found


def diverging_labels(located: dict[str, dict[str, Any]]) -> list[str]:
    """The blocks that diverge: ``z`` of at least :data:`DIVERGENCE_Z`, else the largest ``z``."""
    if not located:
        return []
    chosen = [label for label, e in located.items() if e["z"] >= DIVERGENCE_Z]
    if chosen:
        return sorted(chosen, key=lambda label: -located[label]["z"])
    return [max(located, key=lambda label: located[label]["z"])]


def barely_identified(entry: dict[str, Any]) -> bool:
    """Few levels, or a 90% posterior interval of the SD spanning :data:`SD_SPREAD` fold or more."""
    low, high = entry["sd_q05"], entry["sd_q95"]
    spread = high / low if low > 0 else math.inf
    return entry["levels"] <= FEW_LEVELS or spread >= SD_SPREAD


def few_levels_text(label: str, entry: dict[str, Any]) -> str:
    """What the reason says of a diverging block: its levels and whether its SD is identified."""
    interval = f"90% posterior interval of its SD {entry['sd_q05']:.3g} to {entry['sd_q95']:.3g}"
    text = f"block '{label}' has {entry['levels']} levels ({interval})"
    if barely_identified(entry):
        text += ": its SD is barely identified by the data"
    return text


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


def divergence_rate(diag: dict[str, Any]) -> float:
    """Divergences per draw of a diagnosis (runs stopped early hold fewer draws)."""
    return diag["divergences"] / max(diag["chains"] * diag["draws"], 1)


def _more_divergent(new: dict[str, Any], old: dict[str, Any]) -> bool | None:
    """Is ``new`` divergent more often than ``old`` (None: equally, e.g. neither diverged)?"""
    a, b = divergence_rate(new), divergence_rate(old)
    return None if a == b else a > b


def _worse(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Does ``new`` sample worse than ``old`` (divergent more often, else less ESS per gradient)?"""
    more = _more_divergent(new, old)
    if more is not None:
        return more
    a, b = new["ess_per_1k_gradients"], old["ess_per_1k_gradients"]
    return a is not None and b is not None and a < b


def _dearer_to_continue(
    new: dict[str, Any], old: dict[str, Any], settings: AdaptiveSettings
) -> bool:
    """Would ``new``'s chains cost more gradients than ``old``'s to reach the ESS target?

    Both can be continued and neither diverged, so the draws to keep are those
    that reach ``ESS_MARGIN * ess_min`` for fewer further gradient evaluations
    (ESS per gradient, from what each already holds): a new geometry that is
    about as efficient does not throw away longer chains.
    """
    aim = ESS_MARGIN * settings.ess_min

    def cost(diag: dict[str, Any]) -> float | None:
        ess = [v for v in (diag["min_ess_bulk"], diag["min_ess_tail"]) if v is not None]
        rate = diag["ess_per_1k_gradients"]
        if not ess or not rate:
            return None
        return max(aim - min(ess), 0.0) / rate

    a, b = cost(new), cost(old)
    return a is not None and b is not None and a >= b


def _dominated(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Is ``new`` worse on every count (divergence rate, else both R-hat and the smallest ESS)?

    Used for restarts, whose chains differ in length from the run they
    replace, so ESS per gradient alone would not compare like with like.
    """
    more = _more_divergent(new, old)
    if more is not None:
        return more
    if None in (new["max_r_hat"], old["max_r_hat"]):
        return False
    new_ess = min(new["min_ess_bulk"], new["min_ess_tail"])
    old_ess = min(old["min_ess_bulk"], old["min_ess_tail"])
    return new["max_r_hat"] > old["max_r_hat"] and new_ess < old_ess


def _labels(design: Design, centered: Collection[str]) -> dict[str, str]:
    return {b.label: "centred" if b.label in centered else "non-centred" for b in design.blocks}


def _block_of(quantity: str | None, design: Design) -> str | None:
    """The random-effects block a compared quantity belongs to (None for beta and sigma)."""
    if not quantity:
        return None
    stem = quantity.split("[", 1)[0]
    for block in design.blocks:
        if stem in (f"sd_{block.label}", f"corr_{block.label}", f"u_{block.label}"):
            return block.label
    return None


@dataclass
class _Kept:
    """The draws the loop holds: the last kept run, its (possibly pooled) draws and diagnosis."""

    run: Run
    idata: Any
    diag: dict[str, Any]
    tune: int
    draws: int
    low_rank: bool = False  # sampled with nutpie's low-rank mass matrix
    pooled: bool = False  # chains of several runs: no single run's chains to extend
    # The run's own length before any extension (what a new run like it samples); 0: ``draws``.
    base_draws: int = 0

    def __post_init__(self) -> None:
        self.base_draws = self.base_draws or self.draws

    def extendable(self) -> bool:
        return not self.pooled and self.run.extendable

    def continued(self, run: Run, length: int, diag: dict[str, Any]) -> _Kept:
        """These chains continued to ``length`` draws (``run``, diagnosed as ``diag``)."""
        return _Kept(
            run, run.idata, diag, self.tune, length, self.low_rank, base_draws=self.base_draws
        )


@dataclass
class _Plan:
    """The next round: what to run and why."""

    action: str
    why: str
    accept: float
    blocks: frozenset[str]
    warmup: int
    length: int
    n_chains: int
    add: bool = False  # pooled with the kept chains (else it replaces them)
    # The kept chains continued from ``start`` to ``length`` draws (no new run, no warm-up).
    extend: bool = False
    start: int = 0
    low_rank: bool = False  # nutpie's low-rank modified mass matrix
    # A cheaper plan for the same problem, run instead when this one would pass the budget.
    fallback: _Plan | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    # A run stopped at its first divergent stretch: the length it was planned with.
    planned_length: int = 0

    @property
    def draws(self) -> int:
        return self.n_chains * (self.length - self.start)

    @property
    def iterations(self) -> int:
        if self.extend:
            return self.draws
        return self.n_chains * (self.warmup + self.length)


@dataclass
class _Memory:
    """What the loop has tried, so that no remedy is repeated blindly."""

    first_chains: int
    first_tune: int
    rule_used: bool = False
    tried: set[tuple[frozenset[str], float]] = field(default_factory=set)
    not_kept: set[str] = field(default_factory=set)
    longer_chains_kept: int = 0
    # A restart that was not kept because it diverged: the target_accept it ran at.
    # Divergences call for a smaller step size, so the same restart is retried higher.
    diverged_at: dict[str, float] = field(default_factory=dict)
    # nutpie's low-rank mass matrix is on offer (nutpie only) and not tried yet.
    low_rank_open: bool = False
    # The last extension of R-hat-failing chains cut R-hat - 1 by less than EXTENSION_GAIN.
    extension_stalled: bool = False
    # Draws per chain of a new run whose chains can be continued (None: as long as the kept run).
    new_run_draws: int | None = None


def _same(kept: _Kept, memory: _Memory, **changes: Any) -> dict[str, Any]:
    """A plan's fields for a fresh run like the kept one, with ``changes`` applied."""
    base = {
        "accept": kept.run.target_accept,
        "blocks": kept.run.centered,
        "warmup": kept.tune,
        # A new run whose chains can be continued starts short and is continued as far as
        # it needs; otherwise it is as long as the kept run was before any continuation.
        "length": memory.new_run_draws or kept.base_draws,
        "n_chains": memory.first_chains,
        "low_rank": kept.low_rank,
    }
    return {**base, **changes}


def _plan_low_rank(kept: _Kept, memory: _Memory, why: str) -> _Plan | None:
    """Slow mixing: the same run with nutpie's low-rank mass matrix, once.

    A diagonal mass matrix cannot follow parameters that move together (a
    fixed effect and the group effects nested in it, an intercept and a slope
    whose predictor is far from 0 in a random-effects block); the low-rank
    correction adapts those directions.  It costs one run of the kept length,
    less than the longer chains that slow mixing would otherwise need
    (``benchmarks/bench_geometry.py``: 3-8x the ESS per gradient on three of
    four models), and a run that samples worse is not kept.
    """
    if not memory.low_rank_open or kept.low_rank:
        return None
    memory.low_rank_open = False
    return _Plan(
        "low-rank mass matrix",
        f"{why}: the same run with nutpie's low-rank modified mass matrix, which adapts the "
        "directions in which parameters move together",
        **_same(kept, memory, low_rank=True),
    )


def divergence_check_length(length: int) -> int:
    """Draws per chain between two looks for divergences in a new run of ``length``."""
    return min(length, max(NEW_RUN_MIN_DRAWS, math.ceil(DIVERGENCE_CHECK_SHARE * length)))


def _as_sampled(plan: _Plan, new: Run) -> _Plan:
    """``plan`` as the run went: shorter where it stopped at its first divergent stretch."""
    length = int(new.idata.posterior.sizes["draw"])
    if length >= plan.length:
        return plan
    divergences = int(new.idata.sample_stats["diverging"].sum())
    return replace(
        plan,
        length=length,
        why=(
            f"{plan.why}; stopped after {length} of {plan.length} draws per chain: "
            f"{divergences} divergence(s) already, which call for a remedy whatever "
            "the rest would show"
        ).lstrip("; "),
        planned_length=plan.length,
    )


def _plan_completion(kept: _Kept, memory: _Memory) -> _Plan | None:
    """The kept run sampled to its planned length, when the loop ends on one that stopped early.

    A run stops at its first divergent stretch so that a remedy can follow; when
    none is left (or the budget is spent) its draws are what the report holds,
    so they are sampled to the planned length: its divergences stay (the fit is
    still unreliable), but its Monte Carlo error is that of the run planned.
    """
    if kept.diag["ok"] or kept.pooled or kept.draws >= kept.base_draws:
        return None
    if not kept.extendable() or kept.base_draws > kept.run.capacity:
        return None
    chains = int(kept.diag["chains"])
    return _Plan(
        "complete the kept run",
        f"the loop ends on a run that stopped at {kept.draws} draws per chain: continued to "
        f"its planned {kept.base_draws} so that the reported posterior has the planned "
        "precision (its divergences stay)",
        extend=True,
        start=kept.draws,
        **_same(kept, memory, length=kept.base_draws, n_chains=chains),
    )


def extension_factor(diag: dict[str, Any], settings: AdaptiveSettings) -> float:
    """How much longer the chains must be for R-hat and ESS to reach their targets.

    ESS grows with the chains' length; R-hat's excess over 1 comes from the
    chains' means differing by their Monte Carlo error, so ``R-hat^2 - 1``
    shrinks as ``1 / length`` (the chains settled, only short).  The factor
    is the larger of ``ESS_MARGIN * ess_min / ESS`` and the ratio of
    ``R-hat^2 - 1`` to that of :data:`RHAT_AIM` of the target's margin.
    """
    ess = [v for v in (diag["min_ess_bulk"], diag["min_ess_tail"]) if v is not None]
    factor = ESS_MARGIN * settings.ess_min / max(min(ess), 1.0) if ess else 1.0
    r_hat = diag["max_r_hat"]
    if r_hat is not None and r_hat > settings.rhat_max:
        aim = (1.0 + RHAT_AIM * (settings.rhat_max - 1.0)) ** 2 - 1.0
        factor = max(factor, (r_hat**2 - 1.0) / aim)
    return factor


def _plan_extend(
    design: Design,
    kept: _Kept,
    memory: _Memory,
    settings: AdaptiveSettings,
    problem: str,
    *,
    cheaper_than_a_run: bool = False,
) -> _Plan | None:
    """Continue the kept chains (no new warm-up, no draw thrown away), when that can cure.

    Only for draws without divergences (extending keeps them), chains that
    agree (a stray chain needs a new warm-up) and one run's chains (pooled
    runs cannot be continued), within the chains' capacity.  An extension
    after one that did not cut R-hat - 1 by :data:`EXTENSION_GAIN` is not
    planned: the chains mix slowly, and the geometry comes next.  With
    ``cheaper_than_a_run`` only when it adds fewer draws than a new run of
    the kept length would sample (then it comes before a re-parameterisation).
    """
    diag = kept.diag
    if diag["divergences"] or not kept.extendable() or memory.extension_stalled:
        return None
    evidence: dict[str, Any] = {}
    r_hat = diag["max_r_hat"]
    if r_hat is not None and r_hat > settings.rhat_max:
        disagreement = _disagreement_evidence(kept.idata, design, diag)
        evidence["chain_disagreement"] = disagreement
        if max(abs(z) for z in disagreement["chain_z"]) > ODD_CHAIN_Z:
            return None
    factor = extension_factor(diag, settings)
    if cheaper_than_a_run and factor >= MAX_EXTENSION:
        return None
    length = max(kept.draws + 1, math.ceil(kept.draws * min(factor, MAX_EXTENSION)))
    if length > kept.run.capacity:
        return None
    evidence["extension_factor"] = round(factor, 3)
    chains = int(diag["chains"])
    return _Plan(
        "extend chains",
        f"{problem}: the chains agree and need x{factor:.2f} their length for the targets: "
        f"all {chains} chains continued from {kept.draws} to {length} draws (their warm-up "
        "and draws kept)",
        evidence=evidence,
        extend=True,
        start=kept.draws,
        **_same(kept, memory, length=length, n_chains=chains),
    )


def _plan_divergences(design: Design, kept: _Kept, memory: _Memory, problem: str) -> _Plan | str:
    """Raise target_accept; at its top, the other geometry of the diverging block(s)."""
    accept = kept.run.target_accept
    step = _next_target_accept(accept)
    if step is not None:
        return _Plan(
            "raise target_accept",
            f"{problem}: target_accept {accept} -> {step}",
            **_same(kept, memory, accept=step),
        )
    located = divergence_blocks(kept.idata, design)
    labels = diverging_labels(located)
    where = ", ".join(
        f"{label} (log-SD gap {located[label]['z']:.1f} posterior SDs)" for label in labels
    )
    evidence = {"divergence_blocks": located}
    if design.spec.parameterization == "offsets" and labels:
        flipped = frozenset(kept.run.centered ^ set(labels))
        if (flipped, accept) not in memory.tried:
            new_forms = _labels(design, flipped)
            return _Plan(
                "other geometry",
                f"{problem} at target_accept {accept}: the divergent draws set apart the SD of "
                f"{where}: " + ", ".join(f"{label} -> {new_forms[label]}" for label in labels),
                evidence=evidence,
                **_same(kept, memory, blocks=flipped),
            )
    forms = sorted(
        {
            _labels(design, blocks)[label]
            for blocks, a in memory.tried
            if a == accept
            for label in labels
        }
    )
    tried = f"in the {' and '.join(forms)} form" + ("s" if len(forms) > 1 else "")
    texts = "; ".join(few_levels_text(label, located[label]) for label in labels)
    return (
        f"no remedy left: {problem} at target_accept {accept}, {tried} of the diverging "
        f"block(s) {where}; {texts}; {kept.diag['divergences']} divergences left"
    )


def _plan_rhat(
    design: Design, kept: _Kept, memory: _Memory, settings: AdaptiveSettings, problem: str
) -> _Plan | str:
    """R-hat fails without divergences: a stray chain or slow mixing."""
    disagreement = _disagreement_evidence(kept.idata, design, kept.diag)
    evidence: dict[str, Any] = {"chain_disagreement": disagreement}
    scores = ", ".join(f"{z:+.1f}" for z in disagreement["chain_z"])
    quantity = disagreement["quantity"]
    if max(abs(z) for z in disagreement["chain_z"]) > ODD_CHAIN_Z:
        # A chain settled elsewhere (its mass matrix adapted badly): a longer
        # warm-up cures that; dropping the chain would choose draws by their look.
        longest = settings.max_tune_factor * memory.first_tune
        if 2 * kept.tune <= longest:
            return _Plan(
                "restart with longer warm-up",
                f"{problem}: a chain stands out (z of each chain's mean of {quantity} against "
                f"the others: {scores}; |z| > {ODD_CHAIN_Z:g}): all {kept.diag['chains']} "
                f"chains replaced by {memory.first_chains} with warm-up {kept.tune} -> "
                f"{2 * kept.tune}",
                evidence=evidence,
                **_same(kept, memory, warmup=2 * kept.tune),
            )
        return _Plan(
            "add chains",
            f"{problem}: a chain stands out (z of each chain's mean of {quantity}: {scores}) "
            f"with the warm-up at its longest ({kept.tune}): {memory.first_chains} more chains "
            "with a derived seed, so that one stray chain weighs less in the pooled draws",
            add=True,
            evidence=evidence,
            **_same(kept, memory, length=kept.draws),
        )
    # Slow mixing: R-hat over chains of ~n effective draws each carries noise of
    # order 1/n that more chains do not shrink (they make R-hat a stricter test):
    # longer chains after a longer warm-up do, or a geometry that mixes faster.
    # The worst quantity's block; a fixed effect or sigma mixes through every block.
    label = _block_of(quantity, design)
    labels = {label} if label else {b.label for b in design.blocks}
    flipped = frozenset(kept.run.centered ^ labels)
    other = (
        bool(labels)
        and design.spec.parameterization == "offsets"
        and (flipped, kept.run.target_accept) not in memory.tried
    )
    where = ", ".join(sorted(labels)) or "no block"
    longer_accept: float | None = kept.run.target_accept
    if "restart with longer chains" in memory.diverged_at:
        longer_accept = _next_target_accept(
            max(kept.run.target_accept, memory.diverged_at["restart with longer chains"])
        )
    longer = "restart with longer chains" not in memory.not_kept and longer_accept is not None
    mixing = f"no chain stands out (z of each chain's mean of {quantity}: {scores}): slow mixing"
    # After longer chains failed (sampled worse, or diverged) the other geometry comes first;
    # longer chains that diverged are retried at a higher target_accept after it.
    failed = "restart with longer chains" in memory.diverged_at or not longer
    # The same chains, longer, while that lowers R-hat; but chains that would need
    # LOW_RANK_FIRST times their length (three runs' worth of draws or more) first get
    # the short low-rank run, which costs a fraction of that (measured over the gallery:
    # trying it first for every shortfall past a doubling cost more than it saved).
    factor = extension_factor(kept.diag, settings)
    if factor < LOW_RANK_FIRST:
        extension = _plan_extend(design, kept, memory, settings, problem)
        if extension is not None:
            return extension
    low_rank = _plan_low_rank(kept, memory, f"{problem}: {mixing}")
    if low_rank is not None:
        low_rank.evidence = {**evidence, "extension_factor": round(factor, 3)}
        return low_rank
    extension = _plan_extend(design, kept, memory, settings, problem)
    if extension is not None:
        return extension
    if other and (memory.longer_chains_kept or failed):
        forms = _labels(design, flipped)
        return _Plan(
            "other geometry",
            f"{problem}: {mixing} after longer chains: "
            + ", ".join(f"{b} -> {forms[b]}" for b in sorted(labels)),
            evidence=evidence,
            **_same(kept, memory, blocks=flipped),
        )
    if longer:
        warmup = min(2 * kept.tune, settings.max_tune_factor * memory.first_tune)
        # Twice the run's own length; chains already continued past that are not doubled again.
        restart_length = max(2 * kept.base_draws, kept.draws)
        retry = ""
        if longer_accept != kept.run.target_accept:
            retry = (
                f" at target_accept {longer_accept} (the longer chains diverged at "
                f"{memory.diverged_at['restart with longer chains']})"
            )
        return _Plan(
            "restart with longer chains",
            f"{problem}: {mixing}, R-hat needs more effective draws per chain: all "
            f"{kept.diag['chains']} chains replaced by {memory.first_chains} of {restart_length} "
            f"draws after a warm-up of {warmup}{retry}",
            evidence=evidence,
            **_same(kept, memory, warmup=warmup, length=restart_length, accept=longer_accept),
        )
    # Here longer chains sampled worse, and the other geometry was tried or does not exist.
    geometry = (
        f"the other geometry of {where} tried"
        if design.spec.parameterization == "offsets" and labels
        else "no other geometry (baked_in)"
    )
    return f"no remedy left: {problem}: {mixing}; longer chains sampled worse, {geometry}"


def _plan_ess(
    design: Design, kept: _Kept, memory: _Memory, settings: AdaptiveSettings, problem: str
) -> _Plan:
    """ESS short with R-hat fine: more draws, by whichever of two sound ways costs less."""
    extension = _plan_extend(design, kept, memory, settings, problem)
    if extension is not None:
        return extension
    ess = min(v for v in (kept.diag["min_ess_bulk"], kept.diag["min_ess_tail"]) if v is not None)
    factor = ESS_MARGIN * settings.ess_min / max(ess, 1.0)
    chains_kept = int(kept.diag["chains"])
    add_n = max(1, math.ceil(chains_kept * (factor - 1.0)))
    length = max(kept.draws + 1, math.ceil(kept.draws * factor))
    add_cost = add_n * (kept.tune + kept.draws)
    longer_cost = memory.first_chains * (kept.tune + length)
    costs = f"{add_n} more chains cost {add_cost} iterations, longer chains {longer_cost}"
    evidence = {"ess_factor": round(factor, 3), "add_iterations": add_cost}
    evidence["longer_iterations"] = longer_cost
    # Chains of the same length keep R-hat's 1/n noise (and more of them make
    # it a stricter test): add chains only where R-hat has room to spare.
    r_hat = kept.diag["max_r_hat"]
    room = r_hat is None or r_hat - 1.0 <= RHAT_ROOM * (settings.rhat_max - 1.0)
    evidence["rhat_room"] = bool(room)
    if not room:
        costs += f"; R-hat {r_hat:.4f} leaves no room for chains of the same length"
    fresh = memory.first_chains * (kept.tune + kept.draws)
    if min(add_cost if room else longer_cost, longer_cost) >= fresh:
        low_rank = _plan_low_rank(
            kept, memory, f"{problem}: R-hat holds, ESS short by x{factor:.2f} ({costs})"
        )
        if low_rank is not None:
            low_rank.evidence = evidence
            return low_rank
    if room and add_cost < longer_cost:
        return _Plan(
            "add chains",
            f"{problem}: R-hat holds, ESS short by x{factor:.2f}; {costs}: "
            f"{add_n} more chains with a derived seed",
            add=True,
            evidence=evidence,
            **_same(kept, memory, n_chains=add_n, length=kept.draws),
        )
    plan = _Plan(
        "restart with longer chains",
        f"{problem}: R-hat holds, ESS short by x{factor:.2f}; {costs}: all {chains_kept} chains "
        f"replaced by {memory.first_chains} of {length} draws",
        evidence=evidence,
        **_same(kept, memory, length=length),
    )
    if add_n * kept.draws < plan.draws:
        # Pooled chains of the same length are sound draws of the posterior; their R-hat is
        # checked again, so when only they fit the budget they are better than stopping.
        plan.fallback = _Plan(
            "add chains",
            f"{problem}: R-hat holds, ESS short by x{factor:.2f}; longer chains "
            f"({plan.draws} draws) would pass the draws budget: {add_n} more chains with a "
            "derived seed instead",
            add=True,
            evidence=evidence,
            **_same(kept, memory, n_chains=add_n, length=kept.draws),
        )
    return plan


def plan_next(
    design: Design, kept: _Kept, memory: _Memory, settings: AdaptiveSettings
) -> _Plan | str:
    """The next round by the evidence of the kept draws, or why there is none ("no remedy left")."""
    problem = describe(kept.diag)
    # Chains that only fall short of the targets are continued when that costs less
    # than any new run; the rule's re-parameterisation is one more run, kept or not.
    cheap = _plan_extend(design, kept, memory, settings, problem, cheaper_than_a_run=True)
    if cheap is not None:
        return cheap
    if not memory.rule_used and design.spec.parameterization == "offsets":
        memory.rule_used = True
        suggestion, evidence = suggest_centering(kept.idata, design)
        if suggestion != kept.run.centered:
            # Divergences call for a smaller step whatever the form: both remedies in one
            # round (when the pair is not kept, the next round raises target_accept alone).
            accept = kept.run.target_accept
            step = _next_target_accept(accept) if kept.diag["divergences"] else None
            also = f"; for the divergences also target_accept {accept} -> {step}" if step else ""
            return _Plan(
                "re-parameterise",
                f"{problem}; rule (data/prior precision > 1 -> centred): "
                + ", ".join(
                    f"{label}: {e['choice']} (smallest eigenvalue {e['min_eigenvalue']:.2g})"
                    for label, e in evidence.items()
                )
                + also,
                evidence=evidence,
                **_same(kept, memory, blocks=suggestion, accept=step or accept),
            )
    if kept.diag["divergences"]:
        return _plan_divergences(design, kept, memory, problem)
    if kept.diag["max_r_hat"] is not None and kept.diag["max_r_hat"] > settings.rhat_max:
        return _plan_rhat(design, kept, memory, settings, problem)
    return _plan_ess(design, kept, memory, settings, problem)


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
    clock: Callable[[], float] = time.perf_counter,
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
    clock : callable
        Seconds (``time.perf_counter``); read only for the record and for a
        ``max_seconds`` cap.

    Returns
    -------
    Outcome
        ``record`` holds ``settings``, ``rounds`` (one dict per run: ``round``,
        ``seed``, ``action``, ``why``, ``target_accept``, ``parameterization``
        per block, ``chains`` (of this run), ``draws``, ``tune``,
        ``iterations`` (warm-up included), ``before`` and ``after`` (see
        :func:`diagnose`; ``after`` describes the draws kept after the round),
        ``kept``, ``evidence``, ``sample_seconds``, ``compile_seconds``),
        ``reliable``, ``budget_spent``, ``reason``, ``draws_sampled``,
        ``iterations_sampled``, ``seconds`` and ``final``.
    """
    settings = settings or AdaptiveSettings()
    max_draws = (
        settings.max_draws if settings.max_draws is not None else DRAWS_FACTOR * chains * draws
    )
    started = clock()
    opened: list[Run] = []  # runs whose chains may still hold sampler threads

    def run(number: int, plan: _Plan, draws_so_far: int) -> Run:
        extra: dict[str, Any] = {"low_rank": True} if plan.low_rank else {}
        if sampler == "nutpie":
            # Room to continue these chains with whatever the draws budget leaves.
            extra["capacity"] = plan.length + max(
                0, (max_draws - draws_so_far - plan.draws) // plan.n_chains
            )
            # Added chains are pooled with the kept ones (the same length); the last round
            # allowed has no remedy to make room for, so it is sampled whole.
            if not plan.add and number < settings.max_rounds:
                extra["check_every"] = divergence_check_length(plan.length)
        new = sample_once(
            design,
            priors,
            seed=round_seed(seed, number),
            draws=plan.length,
            tune=plan.warmup,
            chains=plan.n_chains,
            sampler=sampler,
            target_accept=plan.accept,
            progress=progress,
            centered=plan.blocks,
            **extra,
        )
        opened.append(new)
        return new

    try:
        return _rounds(
            design,
            seed,
            draws,
            tune,
            chains,
            target_accept,
            centered,
            settings,
            sampler,
            max_draws,
            started,
            clock,
            run,
        )
    finally:
        for opened_run in opened:
            opened_run.close()


def _rounds(
    design: Design,
    seed: int,
    draws: int,
    tune: int,
    chains: int,
    target_accept: float,
    centered: Collection[str],
    settings: AdaptiveSettings,
    sampler: str,
    max_draws: int,
    started: float,
    clock: Callable[[], float],
    run: Callable[[int, _Plan, int], Run],
) -> Outcome:
    """The rounds of :func:`sample_adaptively` (which closes every run's chains afterwards)."""
    first_plan = _Plan("first run", "", target_accept, frozenset(centered), tune, draws, chains)
    first = run(1, first_plan, 0)
    first_plan = _as_sampled(first_plan, first)
    kept = _Kept(
        first,
        first.idata,
        diagnose(first.idata, design, settings),
        tune,
        first_plan.length,
        bool(getattr(first, "low_rank", False)),  # a caller's opt-in (fit_pymc's low_rank)
        base_draws=draws,
    )
    memory = _Memory(first_chains=chains, first_tune=tune, low_rank_open=sampler == "nutpie")
    if first.extendable:
        memory.new_run_draws = min(draws, max(NEW_RUN_MIN_DRAWS, math.ceil(NEW_RUN_SHARE * draws)))
    memory.tried.add((first.centered, first.target_accept))
    compile_s, sample_s = first.compile_seconds, first.sample_seconds
    draws_sampled, iterations = first_plan.draws, first_plan.iterations
    rounds: list[dict[str, Any]] = [
        _round_entry(1, first, first_plan, design, None, kept.diag, True)
    ]
    last_seconds_per_iteration = first.sample_seconds / max(first_plan.iterations, 1)
    budget_spent = False
    reason = ""
    while True:
        if kept.diag["ok"]:
            reason = f"diagnostics hold after {len(rounds)} round(s)"
            break
        problem = describe(kept.diag)
        plan = plan_next(design, kept, memory, settings)
        if isinstance(plan, str):
            reason = plan
            break
        elapsed = clock() - started
        if (
            plan.fallback is not None
            and draws_sampled + plan.draws > max_draws
            and draws_sampled + plan.fallback.draws <= max_draws
        ):
            plan = plan.fallback
        if len(rounds) >= settings.max_rounds:
            budget_spent, reason = True, f"budget spent: {settings.max_rounds} rounds"
        elif draws_sampled + plan.draws > max_draws:
            budget_spent = True
            reason = (
                f"budget spent: {draws_sampled} draws sampled, another {plan.draws} "
                f"would pass max_draws {max_draws}"
            )
        elif settings.max_seconds is not None and (
            elapsed + last_seconds_per_iteration * plan.iterations > settings.max_seconds
        ):
            budget_spent = True
            estimate = last_seconds_per_iteration * plan.iterations
            reason = (
                f"budget spent: {elapsed:.0f} s used, another round (~{estimate:.0f} s) "
                f"would pass max_seconds {settings.max_seconds:.0f}"
            )
        if budget_spent:
            reason = f"{reason}; still {problem}; next would have been: {plan.action}"
            break
        number = len(rounds) + 1
        log.info("adaptive round %d: %s (%s)", number, plan.action, plan.why)
        try:
            if plan.extend:
                new = kept.run.extend(plan.length)
            else:
                new = run(number, plan, draws_sampled)
                plan = _as_sampled(plan, new)
        except SamplerFailed as err:
            # The run never produced draws (e.g. no valid initial point in the new geometry):
            # it counts as a round that sampled worse, and the loop goes on from the kept draws.
            log.warning("adaptive round %d (%s) failed: %s", number, plan.action, err)
            memory.not_kept.add(plan.action)
            memory.tried.add((plan.blocks, plan.accept))
            rounds.append(
                {
                    "round": number,
                    "seed": round_seed(seed, number),
                    "action": plan.action,
                    "why": f"{plan.why}; the sampler failed ({err}): the earlier draws are kept",
                    "target_accept": plan.accept,
                    "parameterization": _labels(design, plan.blocks),
                    "mass_matrix": "low-rank" if plan.low_rank else "diagonal",
                    "chains": plan.n_chains,
                    "draws": plan.length,
                    "tune": plan.warmup,
                    "iterations": 0,
                    "before": kept.diag,
                    "after": kept.diag,
                    "kept": False,
                    "evidence": plan.evidence,
                    "sample_seconds": 0.0,
                    "compile_seconds": 0.0,
                }
            )
            continue
        compile_s += new.compile_seconds
        sample_s += new.sample_seconds
        draws_sampled += plan.draws
        iterations += plan.iterations
        last_seconds_per_iteration = new.sample_seconds / max(plan.iterations, 1)
        memory.tried.add((new.centered, new.target_accept))
        before = kept.diag
        was_kept, note = True, ""
        if plan.extend:
            # The same chains, longer: always kept (the draws so far are among them).
            extended = diagnose(new.idata, design, settings)
            old_r, new_r = before["max_r_hat"], extended["max_r_hat"]
            if old_r is not None and new_r is not None and old_r > settings.rhat_max:
                cut = 1.0 - (new_r - 1.0) / max(old_r - 1.0, 1e-12)
                memory.extension_stalled = cut < EXTENSION_GAIN
            kept = kept.continued(new, plan.length, extended)
        elif plan.add:
            pooled = concat_chains(kept.idata, new.idata)
            kept.run.close()  # pooled chains are never continued
            kept = candidate = _Kept(
                new,
                pooled,
                diagnose(pooled, design, settings),
                kept.tune,
                kept.draws,
                plan.low_rank,
                pooled=True,
            )
            new.close()
        else:
            candidate = _Kept(
                new,
                new.idata,
                diagnose(new.idata, design, settings),
                plan.warmup,
                plan.length,
                plan.low_rank,
                base_draws=plan.planned_length or plan.length,
            )
            restart = plan.action.startswith("restart")
            geometry = plan.action in ("re-parameterise", "other geometry", "low-rank mass matrix")
            worse = (_dominated if restart else _worse)(candidate.diag, kept.diag)
            both_go_on = (
                kept.extendable()
                and candidate.extendable()
                and not kept.diag["divergences"]
                and not candidate.diag["divergences"]
            )
            if geometry and both_go_on:
                worse = _dearer_to_continue(candidate.diag, kept.diag, settings)
            if (restart or geometry) and not candidate.diag["ok"] and worse:
                what = "draws" if restart else "parameterisation and draws"
                note = f"samples worse than before: the earlier {what} are kept"
                if restart and candidate.diag["divergences"] and not kept.diag["divergences"]:
                    # It failed by diverging: retried at a higher target_accept, not dropped.
                    memory.diverged_at[plan.action] = plan.accept
                else:
                    memory.not_kept.add(plan.action)
                was_kept = False
                new.close()
            else:
                kept.run.close()
                kept = candidate
                memory.extension_stalled = False  # new chains: they may be continued
                if plan.action == "restart with longer chains":
                    memory.longer_chains_kept += 1
        after = kept.diag if was_kept else candidate.diag
        rounds.append(_round_entry(number, new, plan, design, before, after, was_kept, note))
    completion = _plan_completion(kept, memory)
    if (
        completion is not None
        and len(rounds) < settings.max_rounds
        and draws_sampled + completion.draws <= max_draws
        and (
            settings.max_seconds is None
            or clock() - started + last_seconds_per_iteration * completion.iterations
            <= settings.max_seconds
        )
    ):
        try:
            new = kept.run.extend(completion.length)
        except SamplerFailed as err:
            log.warning("completing the kept run failed: %s", err)
        else:
            before = kept.diag
            kept = kept.continued(new, completion.length, diagnose(new.idata, design, settings))
            sample_s += new.sample_seconds
            draws_sampled += completion.draws
            iterations += completion.iterations
            reason = f"{reason}; the kept run completed to {completion.length} draws per chain"
            rounds.append(
                _round_entry(len(rounds) + 1, new, completion, design, before, kept.diag, True)
            )
    record = {
        "settings": {**settings.as_dict(), "max_draws": max_draws},
        "rounds": rounds,
        "reliable": bool(kept.diag["ok"]),
        "budget_spent": budget_spent,
        "reason": reason,
        "draws_sampled": draws_sampled,
        "iterations_sampled": iterations,
        "seconds": clock() - started,
        "final": {
            "target_accept": kept.run.target_accept,
            "parameterization": _labels(design, kept.run.centered),
            "mass_matrix": "low-rank" if kept.low_rank else "diagonal",
            "chains": int(kept.idata.posterior.sizes["chain"]),
            "tune": kept.tune,
            "draws": kept.draws,
        },
    }
    level = logging.INFO if kept.diag["ok"] else logging.WARNING
    log.log(level, "adaptive sampling: %s", reason)
    return Outcome(kept.run, kept.idata, compile_s, sample_s, record)


def _round_entry(
    number: int,
    new: Run,
    plan: _Plan,
    design: Design,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    kept: bool,
    note: str = "",
) -> dict[str, Any]:
    return {
        "round": number,
        "seed": new.seed,
        "action": plan.action,
        "why": plan.why if not note else f"{plan.why}; {note}",
        "target_accept": new.target_accept,
        "parameterization": _labels(design, new.centered),
        "mass_matrix": "low-rank" if plan.low_rank else "diagonal",
        "chains": plan.n_chains,
        "draws": plan.length,
        "tune": plan.warmup,
        "iterations": plan.iterations,
        "before": before,
        "after": after,
        "kept": kept,
        "evidence": plan.evidence,
        "sample_seconds": new.sample_seconds,
        "compile_seconds": new.compile_seconds,
    }
