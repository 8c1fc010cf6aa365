# Frequentist fits for the harness.  Sourced into a private environment by
# harness/engines/lme4.py; every function returns a named list of plain
# data.frames / vectors so the Python side never touches R model objects.

suppressPackageStartupMessages({
  library(lme4)
  library(nlme)  # lme() re-evaluates its call and needs lme.formula on the search path
})

# Run expr, collecting warnings and messages instead of printing them.
harness_capture <- function(expr) {
  notes <- character(0)
  value <- withCallingHandlers(
    expr,
    warning = function(w) {
      notes <<- c(notes, paste("warning:", conditionMessage(w)))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      notes <<- c(notes, paste("message:", trimws(conditionMessage(m))))
      invokeRestart("muffleMessage")
    }
  )
  list(value = value, notes = notes)
}

# harness_versions() comes from versions.R, sourced into the same environment first.

# A formula from text the Python side rebuilt out of internal column names (v1_, v2_, ...),
# numbers, operators and the allowed functions.  Parsing does not run anything; before
# the formula is evaluated, every symbol in it must be one of `symbols`.
harness_formula <- function(text, symbols) {
  expr <- str2lang(text)
  unknown <- setdiff(all.names(expr), symbols)
  if (length(unknown) > 0) stop("formula holds symbols the harness did not build: ",
                                paste(unknown, collapse = ", "))
  f <- eval(expr, baseenv())  # `~` only builds the formula object
  environment(f) <- globalenv()
  f
}


# lme4-style name of a variance component.
harness_component_name <- function(grp, var1, var2) {
  ifelse(grp == "Residual", "sigma",
         ifelse(is.na(var2), sprintf("%s: sd(%s)", grp, var1),
                sprintf("%s: cor(%s,%s)", grp, var1, var2)))
}

# Rows of confint(fit, method = "profile", oldNames = FALSE) for each variance row, or NULL.
# Matched by position, not by pasted names: confint's first rows are the theta parameters in
# getME(fit, "theta") order, which is VarCorr's order = "lower.tri" (per block the lower
# triangle column by column: sd, cor, ..., sd), then "sigma" (lmer only).  Names would not
# do: lme4 calls the second block of a repeated factor "Subject.1" in VarCorr but
# "sd_Days|Subject" in confint, and (1 | g) + (1 | g) gives two rows of the same name.
harness_profile_rows <- function(ci, variance, n_theta) {
  is_vc <- variance$kind != "sigma"
  has_sigma <- any(!is_vc)
  theta_rows <- seq_len(n_theta)
  lines_up <- nrow(ci) >= n_theta + has_sigma && sum(is_vc) == n_theta &&
    all(sub("_.*$", "", rownames(ci)[theta_rows]) == variance$kind[is_vc]) &&
    (!has_sigma || rownames(ci)[n_theta + 1] == "sigma")
  if (!lines_up) return(NULL)
  hit <- rep(NA_integer_, nrow(variance))
  hit[is_vc] <- theta_rows
  hit[!is_vc] <- n_theta + 1L
  hit
}

harness_fit_lmer <- function(data, formula, symbols, REML = TRUE, profile = FALSE,
                             n_sims = 1000L, seed = 1L, level = 0.95, optimizer = NULL,
                             maxfun = NULL, start = NULL) {
  formula <- harness_formula(formula, symbols)
  use_lmertest <- requireNamespace("lmerTest", quietly = TRUE)
  # optimizer: a name of harness_optimizer_table() (refit.R), looked up, never parsed.
  control <- if (is.null(optimizer)) lme4::lmerControl() else harness_lmer_control(optimizer, maxfun)
  start <- if (is.null(start)) NULL else as.numeric(start)
  started <- proc.time()[["elapsed"]]
  fitted <- harness_capture(
    if (use_lmertest) lmerTest::lmer(formula, data = data, REML = REML, control = control, start = start)
    else lme4::lmer(formula, data = data, REML = REML, control = control, start = start)
  )
  fit_seconds <- proc.time()[["elapsed"]] - started
  fit <- fitted$value
  notes <- fitted$notes

  # Fixed effects: estimate, SE, Satterthwaite df (lmerTest), Wald CI.
  coefs <- summary(fit)$coefficients
  wald <- confint(fit, parm = "beta_", method = "Wald", level = level)
  has_df <- "df" %in% colnames(coefs)
  fixed <- data.frame(
    term = rownames(coefs),
    estimate = unname(coefs[, "Estimate"]),
    se = unname(coefs[, "Std. Error"]),
    df = if (has_df) unname(coefs[, "df"]) else NA_real_,
    statistic = unname(coefs[, "t value"]),
    p_value = if (has_df) unname(coefs[, "Pr(>|t|)"]) else NA_real_,
    lower = unname(wald[rownames(coefs), 1]),
    upper = unname(wald[rownames(coefs), 2]),
    ci_method = "Wald",
    stringsAsFactors = FALSE
  )

  # Variance components on the SD / correlation scale.
  vc <- as.data.frame(VarCorr(fit), order = "lower.tri")
  variance <- data.frame(
    component = harness_component_name(vc$grp, vc$var1, vc$var2),
    group_factor = ifelse(vc$grp == "Residual", NA_character_, vc$grp),
    kind = ifelse(vc$grp == "Residual", "sigma", ifelse(is.na(vc$var2), "sd", "cor")),
    term = ifelse(vc$grp == "Residual", NA_character_, vc$var1),
    term2 = vc$var2,
    estimate = vc$sdcor,
    lower = NA_real_,
    upper = NA_real_,
    ci_method = NA_character_,
    stringsAsFactors = FALSE
  )
  if (isTRUE(profile)) {
    prof <- harness_capture(tryCatch(
      confint(fit, method = "profile", oldNames = FALSE, level = level),
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
      fhit <- match(fixed$term, rownames(ci))
      fixed$profile_lower <- ci[fhit, 1]
      fixed$profile_upper <- ci[fhit, 2]
    }
  }

  # Conditional modes and conditional SDs for every group and term.
  re <- as.data.frame(ranef(fit, condVar = TRUE))
  ranef_table <- data.frame(
    group_factor = as.character(re$grpvar),
    group = as.character(re$grp),
    term = as.character(re$term),
    mode = re$condval,
    condsd = re$condsd,
    stringsAsFactors = FALSE
  )

  # merTools-style simulation of the random effects (conditional on the estimates).
  sims <- NULL
  if (n_sims > 0 && requireNamespace("merTools", quietly = TRUE)) {
    simulated <- harness_capture(harness_with_own_seed(
      merTools::REsim(fit, n.sims = n_sims, seed = seed)))
    s <- simulated$value
    sims <- data.frame(
      group_factor = as.character(s$groupFctr),
      group = as.character(s$groupID),
      term = as.character(s$term),
      sim_mean = s$mean,
      sim_median = s$median,
      sim_sd = s$sd,
      stringsAsFactors = FALSE
    )
  }

  singular <- isSingular(fit)
  conv <- fit@optinfo$conv$lme4$messages
  # lme4 files the singular-fit note among its convergence messages; it is not a failure.
  conv <- conv[!grepl("singular", conv, fixed = TRUE)]
  # lmerTest and the optimiser report doubts as warnings ("Model may not have converged
  # with 1 eigenvalue close to zero"); any of them makes the fit not converged.
  doubts <- grep("converge", fitted$notes, value = TRUE, ignore.case = TRUE)
  notes <- setdiff(notes, doubts)  # reported once, below, as convergence notes
  conv <- unique(c(conv, as.character(unlist(fit@optinfo$warnings)), sub("^warning: ", "", doubts)))
  if (length(conv) == 0) conv <- NULL
  if (singular) notes <- c(notes, "singular fit: a variance component is (near) zero or a correlation is +/-1")
  if (!is.null(conv)) notes <- c(notes, paste("convergence:", conv))
  ml_fit <- if (REML) refitML(fit) else fit
  optimizer_used <- fit@optinfo$optimizer
  algorithm <- fit@optinfo$control$algorithm
  if (identical(optimizer_used, "nloptwrap")) {
    optimizer_used <- paste0("nloptwrap.", if (is.null(algorithm)) "NLOPT_LN_BOBYQA" else algorithm)
  }
  info <- list(
    engine = "lme4",
    method = if (REML) "REML" else "ML",
    loglik = as.numeric(logLik(fit)),
    loglik_ml = as.numeric(logLik(ml_fit)),
    reml_criterion = if (REML) as.numeric(REMLcrit(fit)) else NA_real_,
    deviance_ml = as.numeric(deviance(ml_fit)),
    nobs = nobs(fit),
    singular = singular,
    converged = is.null(conv),
    fit_seconds = fit_seconds,
    df_method = if (has_df) "Satterthwaite (lmerTest)" else "none",
    optimizer = optimizer_used
  )
  list(
    fixed = fixed,
    variance = variance,
    ranef = ranef_table,
    sims = sims,
    info = info,
    notes = unique(notes),
    theta = getME(fit, "theta"),
    ml_theta = getME(ml_fit, "theta"),
    ml_beta = fixef(ml_fit),
    ml_sigma = sigma(ml_fit)
  )
}

# Heteroscedastic residuals: nlme::lme with varIdent, for one grouping factor.
# fixed: "y ~ 1 + tx"; random_rhs: "0 + tx"; group: "group"; correlated: use
# pdLogChol (general) or pdDiag.
harness_fit_lme <- function(data, fixed, random_rhs, group, sigma_by, symbols, REML = TRUE,
                            correlated = TRUE, level = 0.95) {
  if (!requireNamespace("nlme", quietly = TRUE)) stop("R package 'nlme' is not installed")
  fixed_f <- harness_formula(fixed, symbols)
  random_f <- harness_formula(paste("~", random_rhs), symbols)
  stopifnot(group %in% symbols, sigma_by %in% symbols)
  random_list <- list()
  random_list[[group]] <- if (correlated) nlme::pdLogChol(random_f) else nlme::pdDiag(random_f)
  # ~ 1 | sigma_by, built as a call: the column name is a symbol, never parsed text.
  sigma_form <- eval(call("~", call("|", 1, as.name(sigma_by))), baseenv())
  environment(sigma_form) <- globalenv()
  weights <- nlme::varIdent(form = sigma_form)
  started <- proc.time()[["elapsed"]]
  fitted <- harness_capture(nlme::lme(
    fixed = fixed_f, random = random_list, weights = weights, data = data,
    method = if (REML) "REML" else "ML", control = nlme::lmeControl(returnObject = TRUE)
  ))
  fit_seconds <- proc.time()[["elapsed"]] - started
  fit <- fitted$value
  notes <- fitted$notes

  tt <- summary(fit)$tTable
  q <- qt(1 - (1 - level) / 2, tt[, "DF"])
  fixed_table <- data.frame(
    term = rownames(tt),
    estimate = unname(tt[, "Value"]),
    se = unname(tt[, "Std.Error"]),
    df = unname(tt[, "DF"]),
    statistic = unname(tt[, "t-value"]),
    p_value = unname(tt[, "p-value"]),
    lower = unname(tt[, "Value"] - q * tt[, "Std.Error"]),
    upper = unname(tt[, "Value"] + q * tt[, "Std.Error"]),
    ci_method = "t (nlme DF)",
    stringsAsFactors = FALSE
  )

  G <- as.matrix(nlme::getVarCov(fit))
  terms <- colnames(G)
  sds <- sqrt(diag(G))
  rows <- list()
  for (i in seq_along(terms)) {
    rows[[length(rows) + 1]] <- data.frame(component = sprintf("%s: sd(%s)", group, terms[i]),
      group_factor = group, kind = "sd", term = terms[i], term2 = NA_character_, estimate = sds[i],
      stringsAsFactors = FALSE)
  }
  if (length(terms) > 1) {
    R <- cov2cor(G)
    for (j in seq_along(terms)) for (i in seq_along(terms)) if (i > j) {
      rows[[length(rows) + 1]] <- data.frame(component = sprintf("%s: cor(%s,%s)", group, terms[j], terms[i]),
        group_factor = group, kind = "cor", term = terms[j], term2 = terms[i], estimate = R[i, j],
        stringsAsFactors = FALSE)
    }
  }
  ratios <- coef(fit$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE)
  sigma_levels <- levels(data[[sigma_by]])
  sigmas <- fit$sigma * ratios[sigma_levels]
  rows[[length(rows) + 1]] <- data.frame(component = sprintf("sigma: %s=%s", sigma_by, sigma_levels),
    group_factor = NA_character_, kind = "sigma", term = sigma_levels, term2 = NA_character_,
    estimate = unname(sigmas), stringsAsFactors = FALSE)
  variance <- do.call(rbind, rows)
  variance$lower <- NA_real_
  variance$upper <- NA_real_
  variance$ci_method <- NA_character_

  # Approximate (Wald on the log/atanh scale) intervals from nlme::intervals.
  iv <- tryCatch(nlme::intervals(fit, level = level, which = "var-cov"),
                 error = function(e) { notes <<- c(notes, paste("intervals() failed:", conditionMessage(e))); NULL })
  if (!is.null(iv)) {
    reiv <- iv$reStruct[[group]]
    for (k in seq_len(nrow(variance))) {
      v <- variance[k, ]
      if (v$kind == "sd") {
        name <- sprintf("sd(%s)", v$term)
      } else if (v$kind == "cor") {
        name <- sprintf("cor(%s,%s)", v$term, v$term2)
      } else next
      if (name %in% rownames(reiv)) {
        variance$lower[k] <- reiv[name, "lower"]; variance$upper[k] <- reiv[name, "upper"]
        variance$ci_method[k] <- "Wald (nlme intervals, transformed scale)"
      }
    }
  }
  # Residual SD per level: Wald interval on log(sigma) + log(ratio_level), with the
  # covariance of nlme's unconstrained parameters (fit$apVar), i.e. the delta method.
  apv <- fit$apVar
  if (is.matrix(apv)) {
    pars <- attr(apv, "Pars")
    z <- qnorm(1 - (1 - level) / 2)
    # apVar names the varIdent parameters "varStruct", "varStruct1", ... in the order of
    # the non-reference levels (named by coef(unconstrained = FALSE)).
    vs_pars <- grep("^varStruct", names(pars), value = TRUE)
    non_reference <- names(coef(fit$modelStruct$varStruct, unconstrained = FALSE))
    for (k in which(variance$kind == "sigma")) {
      lvl <- variance$term[k]
      g <- setNames(numeric(length(pars)), names(pars))
      g["lSigma"] <- 1
      hit <- match(lvl, non_reference)
      if (!is.na(hit)) g[vs_pars[hit]] <- 1
      centre <- sum(g * pars)
      se <- sqrt(drop(t(g) %*% apv %*% g))
      variance$lower[k] <- exp(centre - z * se)
      variance$upper[k] <- exp(centre + z * se)
      variance$ci_method[k] <- "Wald on log scale (nlme apVar, delta method)"
    }
  } else {
    notes <- c(notes, paste("no approximate covariance for variance parameters:", apv))
  }

  # Conditional modes and conditional SDs: Var(b_j | y) = (Z_j' R_j^-1 Z_j + G^-1)^-1.
  modes <- nlme::ranef(fit)
  Zall <- model.matrix(random_f, data = data)
  w <- nlme::varWeights(fit$modelStruct$varStruct)
  resid_var <- (fit$sigma / w)^2
  Ginv <- solve(G)
  gvals <- as.character(data[[group]])
  out <- list()
  for (lvl in rownames(modes)) {
    idx <- which(gvals == lvl)
    Zi <- Zall[idx, , drop = FALSE]
    V <- solve(crossprod(Zi, Zi / resid_var[idx]) + Ginv)
    out[[length(out) + 1]] <- data.frame(group_factor = group, group = lvl, term = terms,
      mode = unlist(modes[lvl, terms]), condsd = sqrt(diag(V)), stringsAsFactors = FALSE)
  }
  ranef_table <- do.call(rbind, out)
  rownames(ranef_table) <- NULL

  singular <- any(sds < 1e-3 * fit$sigma)
  if (singular) notes <- c(notes, "singular fit: a variance component is (near) zero or a correlation is +/-1")
  doubts <- grep("converge", fitted$notes, value = TRUE, ignore.case = TRUE)
  notes <- c(setdiff(notes, doubts), if (length(doubts)) paste("convergence:", sub("^warning: ", "", doubts)))
  ml_fit <- if (REML) update(fit, method = "ML") else fit
  ml_ratios <- coef(ml_fit$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE)
  info <- list(
    engine = "nlme",
    method = if (REML) "REML" else "ML",
    loglik = as.numeric(logLik(fit)),
    loglik_ml = as.numeric(logLik(ml_fit)),
    reml_criterion = if (REML) -2 * as.numeric(logLik(fit)) else NA_real_,
    deviance_ml = -2 * as.numeric(logLik(ml_fit)),
    nobs = nrow(data),
    singular = singular,
    converged = length(doubts) == 0,
    fit_seconds = fit_seconds,
    df_method = "nlme inner/outer DF"
  )
  list(
    fixed = fixed_table,
    variance = variance,
    ranef = ranef_table,
    sims = NULL,
    info = info,
    notes = unique(notes),
    ml_beta = nlme::fixef(ml_fit),
    ml_G = as.matrix(nlme::getVarCov(ml_fit)),
    ml_sigma = ml_fit$sigma * ml_ratios[sigma_levels]
  )
}

# The model matrices lme4 builds, for the design-equality tests.
harness_lformula <- function(data, formula, symbols) {
  lf <- lme4::lFormula(harness_formula(formula, symbols), data = data)
  Zt <- lf$reTrms$Zt
  list(
    X = lf$X,
    X_names = colnames(lf$X),
    Z = as.matrix(t(Zt)),
    Z_names = rownames(Zt),
    cnms = lapply(lf$reTrms$cnms, as.character),
    flist_names = names(lf$reTrms$flist)
  )
}

# Run expr with R's random-number state saved and restored, so that the harness's own
# set.seed() calls leave the random stream of the user's R session as it was.
harness_with_own_seed <- function(expr) {
  had_seed <- exists(".Random.seed", envir = globalenv(), inherits = FALSE)
  if (had_seed) saved <- get(".Random.seed", envir = globalenv(), inherits = FALSE)
  on.exit({
    if (had_seed) {
      assign(".Random.seed", saved, envir = globalenv())
    } else if (exists(".Random.seed", envir = globalenv(), inherits = FALSE)) {
      rm(".Random.seed", envir = globalenv())
    }
  })
  expr
}

# Statistical Rethinking's cafe simulation, drawn exactly as the book does.
harness_simulate_cafe <- function(...) harness_with_own_seed(harness_simulate_cafe_seeded(...))

harness_simulate_cafe_seeded <- function(n_cafes = 20L, n_visits = 10L, a = 3.5, b = -1,
                                         sigma_a = 1, sigma_b = 0.5, rho = -0.7, sigma = 0.5) {
  Mu <- c(a, b)
  cov_ab <- sigma_a * sigma_b * rho
  Sigma <- matrix(c(sigma_a^2, cov_ab, cov_ab, sigma_b^2), ncol = 2)
  set.seed(5)
  vary_effects <- MASS::mvrnorm(n_cafes, Mu, Sigma)
  a_cafe <- vary_effects[, 1]
  b_cafe <- vary_effects[, 2]
  set.seed(22)
  afternoon <- rep(0:1, n_visits * n_cafes / 2)
  cafe_id <- rep(1:n_cafes, each = n_visits)
  mu <- a_cafe[cafe_id] + b_cafe[cafe_id] * afternoon
  wait <- rnorm(n_visits * n_cafes, mu, sigma)
  data.frame(cafe = cafe_id, afternoon = afternoon, wait = wait)
}
