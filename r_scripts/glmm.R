# Generalised linear mixed models (glmer) for the harness.  Sourced into the same
# private environment as fit.R (harness/engines/lme4.py), so harness_capture and
# harness_component_name come from there.  Returns plain data.frames / vectors only.

# family_name / link: validated on the Python side against harness.model.family.FAMILIES;
# they are looked up here in a fixed table, never parsed.  `nb_theta`: the negative
# binomial's shape (a number), fixed as glmer.nb's final glmer fit fixes it.
harness_glm_family <- function(family_name, link, nb_theta = NULL) {
  makers <- list(
    binomial = stats::binomial,
    poisson = stats::poisson,
    negbin = function(link) {
      if (!is.numeric(nb_theta) || length(nb_theta) != 1L || !is.finite(nb_theta) || nb_theta <= 0)
        stop("the negative binomial needs a positive shape theta")
      MASS::negative.binomial(theta = nb_theta, link = link)
    }
  )
  if (!family_name %in% names(makers)) stop("unknown family: ", family_name)
  makers[[family_name]](link = link)
}

# Negative binomial (NB2) GLMM: lme4::glmer.nb estimates the shape theta (alternating
# glmer fits with theta fixed and a 1-d optimisation of theta), then glmer refits with theta
# fixed at that estimate, from glmer's own start: the fit reported, whose Laplace logLik the
# harness reproduces (glmer.nb's own last fit restarts its penalised IRLS from the fit
# before, so its logLik depends on that path; it is returned as loglik_glmer_nb).
harness_fit_glmer_nb <- function(data, formula, symbols, family_name = "negbin", link = "log",
                                 nAGQ = 1L, profile = FALSE, level = 0.95, optimizer = NULL,
                                 maxfun = NULL) {
  if (!identical(family_name, "negbin")) stop("glmer.nb fits the negative binomial family only")
  checked <- harness_formula(formula, symbols)
  control <- if (is.null(optimizer)) lme4::glmerControl()
             else harness_glmer_control(optimizer, maxfun)
  started <- proc.time()[["elapsed"]]
  fitted <- harness_capture(lme4::glmer.nb(checked, data = data, control = control))
  nb_seconds <- proc.time()[["elapsed"]] - started
  nb <- fitted$value
  nb_theta <- as.numeric(lme4::getME(nb, "glmer.nb.theta"))
  out <- harness_fit_glmer(data, formula, symbols, "negbin", link, nAGQ = nAGQ, profile = profile,
                           level = level, optimizer = optimizer, maxfun = maxfun,
                           nb_theta = nb_theta)
  out$info$fit_seconds <- out$info$fit_seconds + nb_seconds
  out$info$glmer_nb_seconds <- nb_seconds
  out$notes <- unique(c(fitted$notes, out$notes, sprintf(paste(
    "glmer.nb estimated theta = %.6g; the estimates shown are glmer's with theta fixed there,",
    "from glmer's own start (glmer.nb's final fit restarts from its previous one: its logLik",
    "%.6f, this fit's %.6f)"), nb_theta, as.numeric(logLik(nb)), out$info$loglik)))
  out$family_params <- list(nb_theta = nb_theta)
  out$glmer_nb <- list(
    loglik = as.numeric(logLik(nb)),
    beta = lme4::fixef(nb),
    theta = lme4::getME(nb, "theta"),
    evaluations = if (is.null(attr(nb, "nevals"))) NA_integer_ else as.integer(attr(nb, "nevals"))
  )
  out
}

# `formula` is text the Python side rebuilt on internal column names; harness_formula
# (fit.R) checks every symbol in it against `symbols` before evaluating it.
# `optimizer` (a name of refit.R's fixed table, for both stages) and `maxfun` (an evaluation
# cap) stand for a user's glmerControl; NULL keeps glmer's defaults.
harness_fit_glmer <- function(data, formula, symbols, family_name, link, nAGQ = 1L,
                              profile = FALSE, level = 0.95, optimizer = NULL, maxfun = NULL,
                              nb_theta = NULL) {
  formula <- harness_formula(formula, symbols)
  fam <- harness_glm_family(family_name, link, nb_theta)
  control <- if (is.null(optimizer)) lme4::glmerControl()
             else harness_glmer_control(optimizer, maxfun)
  started <- proc.time()[["elapsed"]]
  fitted <- harness_capture(lme4::glmer(formula, data = data, family = fam, nAGQ = nAGQ,
                                        control = control))
  fit_seconds <- proc.time()[["elapsed"]] - started
  fit <- fitted$value
  notes <- fitted$notes

  # Fixed effects: estimate, Wald SE, z statistic, Wald CI (as summary(glmer) reports).
  coefs <- summary(fit)$coefficients
  z <- qnorm(1 - (1 - level) / 2)
  fixed <- data.frame(
    term = rownames(coefs),
    estimate = unname(coefs[, "Estimate"]),
    se = unname(coefs[, "Std. Error"]),
    df = Inf,
    statistic = unname(coefs[, "z value"]),
    p_value = unname(coefs[, "Pr(>|z|)"]),
    lower = unname(coefs[, "Estimate"] - z * coefs[, "Std. Error"]),
    upper = unname(coefs[, "Estimate"] + z * coefs[, "Std. Error"]),
    ci_method = "Wald (z)",
    stringsAsFactors = FALSE
  )

  # Variance components on the SD / correlation scale (link scale; no residual row).
  vc <- as.data.frame(VarCorr(fit), order = "lower.tri")
  vc <- vc[vc$grp != "Residual", , drop = FALSE]
  variance <- data.frame(
    component = harness_component_name(vc$grp, vc$var1, vc$var2),
    group_factor = vc$grp,
    kind = ifelse(is.na(vc$var2), "sd", "cor"),
    term = vc$var1,
    term2 = vc$var2,
    estimate = vc$sdcor,
    lower = NA_real_,
    upper = NA_real_,
    ci_method = NA_character_,
    stringsAsFactors = FALSE
  )

  # Conditional modes and conditional SDs on the link scale.
  re <- as.data.frame(ranef(fit, condVar = TRUE))
  ranef_table <- data.frame(
    group_factor = as.character(re$grpvar),
    group = as.character(re$grp),
    term = as.character(re$term),
    mode = re$condval,
    condsd = re$condsd,
    stringsAsFactors = FALSE
  )

  singular <- isSingular(fit)
  conv <- fit@optinfo$conv$lme4$messages
  conv <- conv[!grepl("singular", conv, fixed = TRUE)]
  if (length(conv) == 0) conv <- NULL
  if (singular) notes <- c(notes, "singular fit: a variance component is (near) zero or a correlation is +/-1")
  if (!is.null(conv)) notes <- c(notes, paste("convergence:", conv))
  code <- fit@optinfo$conv$opt
  if (!is.null(code) && code != 0) {
    # An optimizer that stopped at its evaluation cap: lme4 reports it as a warning only.
    conv <- c(conv, sprintf("convergence code %s from %s", code, fit@optinfo$optimizer))
    notes <- c(notes, paste("convergence:", conv[length(conv)]))
  }
  ll <- as.numeric(logLik(fit))
  # The linear predictor glmer's deviance function starts its penalised IRLS from
  # (the end of its nAGQ = 0 stage): lme4's logLik is the Laplace value after its
  # IRLS stops at tolPwrss, which the harness reproduces from the same start.
  devfun <- harness_capture(update(fit, devFunOnly = TRUE))$value
  lp0 <- as.numeric(environment(devfun)$lp0)
  tol_pwrss <- as.numeric(environment(devfun)$tolPwrss)
  # Profile-likelihood intervals for the SDs (and correlations) only: parm = "theta_"
  # keeps the cost to one profile per covariance parameter.  Last: profiling a glmerMod
  # leaves its internal state (the conditional modes, ranef()) at the profile's last point.
  if (isTRUE(profile)) {
    prof <- harness_capture(tryCatch(
      confint(fit, parm = "theta_", method = "profile", oldNames = FALSE, level = level),
      error = function(e) { notes <<- c(notes, paste("profile CI failed:", conditionMessage(e))); NULL }
    ))
    notes <- c(notes, prof$notes)
    ci <- prof$value
    if (!is.null(ci)) {
      hit <- harness_profile_rows(ci, variance, length(getME(fit, "theta")))
      if (is.null(hit)) {
        notes <- c(notes, "profile CI rows do not line up with the variance components; not used")
        hit <- rep(NA_integer_, nrow(variance))
      }
      variance$lower <- ci[hit, 1]
      variance$upper <- ci[hit, 2]
      variance$ci_method[!is.na(hit)] <- "profile"
    }
  }

  info <- list(
    engine = "lme4",
    method = if (nAGQ > 1) sprintf("ML (adaptive Gauss-Hermite, %d points)", nAGQ) else "ML (Laplace)",
    loglik = ll,
    loglik_ml = ll,
    reml_criterion = NA_real_,
    deviance_ml = -2 * ll,
    nobs = nobs(fit),
    singular = singular,
    converged = is.null(conv),
    fit_seconds = fit_seconds,
    df_method = "none (Wald z)",
    nAGQ = nAGQ
  )
  list(
    fixed = fixed,
    variance = variance,
    ranef = ranef_table,
    sims = NULL,
    info = info,
    notes = unique(notes),
    theta = getME(fit, "theta"),
    ml_theta = getME(fit, "theta"),
    ml_beta = fixef(fit),
    ml_sigma = 1,
    lp0 = lp0,
    tol_pwrss = tol_pwrss
  )
}
