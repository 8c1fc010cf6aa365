# Refits of an lmer model with lme4's other optimizers, as lme4::allFit() tries them, and from
# a given start (the harness's own ML optimum).  Sourced into the same private environment as
# fit.R (harness/engines/lme4.py), so harness_formula and harness_component_name come from there.
# Optimizers are looked up by name in the fixed table below; nothing here is parsed.

# allFit()'s optimizers that lme4 1.1 runs without extra packages (nloptr is one of lme4's own
# imports); lmer's default is nloptwrap with NLOPT_LN_BOBYQA.
harness_optimizer_table <- function() {
  list(
    "bobyqa" = list(optimizer = "bobyqa", optCtrl = list()),
    "Nelder_Mead" = list(optimizer = "Nelder_Mead", optCtrl = list()),
    "nlminbwrap" = list(optimizer = "nlminbwrap", optCtrl = list()),
    "nloptwrap.NLOPT_LN_NELDERMEAD" = list(optimizer = "nloptwrap",
                                           optCtrl = list(algorithm = "NLOPT_LN_NELDERMEAD")),
    "nloptwrap.NLOPT_LN_BOBYQA" = list(optimizer = "nloptwrap",
                                       optCtrl = list(algorithm = "NLOPT_LN_BOBYQA"))
  )
}

# allFit()'s optimizers that need a package the harness does not require, when it is missing.
harness_optimizers_missing <- function() {
  wanted <- c("nmkbw" = "dfoptim", "optimx.L-BFGS-B" = "optimx")
  have <- vapply(wanted, requireNamespace, logical(1), quietly = TRUE)
  wanted[!have]
}

# lmerControl for one optimizer of the table (by name), with an optional evaluation cap.
harness_lmer_control <- function(name, maxfun = NULL) {
  table <- harness_optimizer_table()
  if (!name %in% names(table)) stop("unknown optimizer: ", name)
  entry <- table[[name]]
  opt_ctrl <- entry$optCtrl
  if (!is.null(maxfun)) {
    # nloptwrap calls the cap maxeval; the others maxfun (bobyqa, Nelder_Mead) or eval.max.
    key <- switch(entry$optimizer, nloptwrap = "maxeval", nlminbwrap = "eval.max", "maxfun")
    opt_ctrl[[key]] <- as.integer(maxfun)
  }
  lme4::lmerControl(optimizer = entry$optimizer, optCtrl = opt_ctrl)
}

# Doubts about convergence of a fitted merMod: lme4's own checks (not the singular-fit note),
# the optimizer's warnings and captured warnings that mention convergence.
harness_convergence_doubts <- function(fit, notes) {
  conv <- fit@optinfo$conv$lme4$messages
  conv <- conv[!grepl("singular", conv, fixed = TRUE)]
  doubts <- grep("converge", notes, value = TRUE, ignore.case = TRUE)
  code <- fit@optinfo$conv$opt
  opt <- if (!is.null(code) && code != 0) {
    sprintf("convergence code %s from %s", code, fit@optinfo$optimizer)
  } else character(0)
  unique(c(conv, as.character(unlist(fit@optinfo$warnings)), opt, sub("^warning: ", "", doubts)))
}

# Point estimates of a fit as plain tables (internal names; Python maps them back).
harness_lmer_estimates <- function(fit) {
  vc <- as.data.frame(VarCorr(fit), order = "lower.tri")
  list(
    fixed = data.frame(term = names(fixef(fit)), estimate = unname(fixef(fit)),
                       stringsAsFactors = FALSE),
    variance = data.frame(
      group_factor = ifelse(vc$grp == "Residual", NA_character_, vc$grp),
      kind = ifelse(vc$grp == "Residual", "sigma", ifelse(is.na(vc$var2), "sd", "cor")),
      term = ifelse(vc$grp == "Residual", NA_character_, vc$var1),
      term2 = vc$var2,
      estimate = vc$sdcor,
      stringsAsFactors = FALSE
    ),
    theta = getME(fit, "theta"),
    beta = fixef(fit),
    sigma = sigma(fit)
  )
}

# One lmer fit with a named optimizer (and start); never stops: an error becomes a row.
harness_lmer_try <- function(formula, data, REML, name, start = NULL) {
  fitted <- harness_capture(tryCatch(
    lme4::lmer(formula, data = data, REML = REML, control = harness_lmer_control(name),
               start = start),
    error = function(e) e
  ))
  fit <- fitted$value
  if (inherits(fit, "error")) {
    return(list(fit = NULL, converged = FALSE, messages = paste("error:", conditionMessage(fit))))
  }
  doubts <- harness_convergence_doubts(fit, fitted$notes)
  list(fit = fit, converged = length(doubts) == 0, messages = paste(doubts, collapse = "; "))
}

# Refit with every optimizer of the table from lme4's default start and, when `start` (theta)
# is given, with lmer's default optimizer and bobyqa from there.  REML fits are refitted twice:
# by REML (the criterion of the estimates the harness compares) and by ML (the likelihood of
# the same-model check).  Returns one row per fit and the estimates of the best fit per method
# (lowest criterion: REML criterion, or deviance = -2 log-likelihood for ML).
harness_lmer_refits <- function(data, formula, symbols, REML = TRUE, start = NULL) {
  formula <- harness_formula(formula, symbols)
  starts <- list("lme4's default start" = NULL)
  if (!is.null(start)) starts[["the harness's ML optimum"]] <- as.numeric(start)
  from_start <- c("nloptwrap.NLOPT_LN_BOBYQA", "bobyqa")
  methods <- if (isTRUE(REML)) c(TRUE, FALSE) else FALSE
  rows <- list()
  best <- list()
  for (reml in methods) {
    method <- if (reml) "REML" else "ML"
    best_value <- Inf
    for (s in names(starts)) {
      names_here <- if (is.null(starts[[s]])) names(harness_optimizer_table()) else from_start
      for (name in names_here) {
        tried <- harness_lmer_try(formula, data, reml, name, starts[[s]])
        fit <- tried$fit
        criterion <- if (is.null(fit)) NA_real_ else if (reml) as.numeric(REMLcrit(fit))
                     else as.numeric(deviance(fit))
        rows[[length(rows) + 1]] <- data.frame(
          optimizer = name, start = s, method = method, criterion = criterion,
          loglik = if (is.null(fit)) NA_real_ else as.numeric(logLik(fit)),
          converged = tried$converged,
          singular = if (is.null(fit)) NA else isSingular(fit),
          messages = tried$messages, stringsAsFactors = FALSE
        )
        if (!is.na(criterion) && criterion < best_value) {
          best_value <- criterion
          best[[method]] <- c(list(optimizer = name, start = s, criterion = criterion,
                                   loglik = as.numeric(logLik(fit))),
                              harness_lmer_estimates(fit))
        }
      }
    }
  }
  missing <- harness_optimizers_missing()
  list(
    table = do.call(rbind, rows),
    best_reml = best[["REML"]],
    best_ml = best[["ML"]],
    missing = if (length(missing)) paste0(names(missing), " (needs R package ", missing, ")")
              else NULL
  )
}

# ------------------------------------------------------------------------- glmer (GLMMs)

# glmerControl for one optimizer of the table (by name), used for both of glmer's stages
# (its nAGQ = 0 start and the Laplace fit), as allFit() refits a glmer model; with an
# optional evaluation cap.  `init_step = FALSE` skips the nAGQ = 0 stage, so that a given
# start is where the Laplace fit begins (glmer would otherwise replace theta by that stage's).
harness_glmer_control <- function(name, maxfun = NULL, init_step = TRUE) {
  table <- harness_optimizer_table()
  if (!name %in% names(table)) stop("unknown optimizer: ", name)
  entry <- table[[name]]
  opt_ctrl <- entry$optCtrl
  if (!is.null(maxfun)) {
    key <- switch(entry$optimizer, nloptwrap = "maxeval", nlminbwrap = "eval.max", "maxfun")
    opt_ctrl[[key]] <- as.integer(maxfun)
  }
  lme4::glmerControl(optimizer = entry$optimizer, optCtrl = opt_ctrl,
                     nAGQ0initStep = isTRUE(init_step))
}

# Point estimates of a glmer fit as plain tables (internal names; Python maps them back).
harness_glmer_estimates <- function(fit) {
  vc <- as.data.frame(VarCorr(fit), order = "lower.tri")
  vc <- vc[vc$grp != "Residual", , drop = FALSE]
  list(
    fixed = data.frame(term = names(fixef(fit)), estimate = unname(fixef(fit)),
                       stringsAsFactors = FALSE),
    variance = data.frame(
      group_factor = vc$grp,
      kind = ifelse(is.na(vc$var2), "sd", "cor"),
      term = vc$var1,
      term2 = vc$var2,
      estimate = vc$sdcor,
      stringsAsFactors = FALSE
    ),
    theta = getME(fit, "theta"),
    beta = fixef(fit),
    sigma = 1
  )
}

# One glmer fit (nAGQ = 1) with a named optimizer and start; never stops: an error is a row.
# `start` is list(theta = , fixef = ) or NULL; `maxfun` caps the evaluations.
harness_glmer_try <- function(formula, data, fam, name, start = NULL, maxfun = NULL) {
  ctrl <- harness_glmer_control(name, maxfun, init_step = is.null(start))
  fitted <- harness_capture(tryCatch(
    lme4::glmer(formula, data = data, family = fam, nAGQ = 1L, control = ctrl, start = start),
    error = function(e) e
  ))
  fit <- fitted$value
  if (inherits(fit, "error")) {
    return(list(fit = NULL, converged = FALSE, messages = paste("error:", conditionMessage(fit))))
  }
  doubts <- harness_convergence_doubts(fit, fitted$notes)
  list(fit = fit, converged = length(doubts) == 0, messages = paste(doubts, collapse = "; "))
}

# The linear predictor glmer's Laplace deviance function restarts its penalised IRLS from,
# for a fit made by harness_glmer_try (the same control and start), and its tolerance.
harness_glmer_lp0 <- function(formula, data, fam, name, start = NULL) {
  ctrl <- harness_glmer_control(name, init_step = is.null(start))
  devfun <- harness_capture(lme4::glmer(formula, data = data, family = fam, nAGQ = 1L,
                                        control = ctrl, start = start,
                                        devFunOnly = TRUE))$value
  list(lp0 = as.numeric(environment(devfun)$lp0),
       tol_pwrss = as.numeric(environment(devfun)$tolPwrss))
}

# Refit a glmer model (nAGQ = 1) with every optimizer of the table from glmer's default
# start and, when `theta` and `fixef` are given (the harness's Laplace optimum), with bobyqa
# and Nelder_Mead (the optimizers of glmer's default two stages) from there.  Returns one row
# per fit and the estimates of the best fit (lowest deviance = -2 Laplace log-likelihood).
harness_glmer_refits <- function(data, formula, symbols, family_name, link, theta = NULL,
                                 fixef = NULL, maxfun = NULL, nb_theta = NULL) {
  formula <- harness_formula(formula, symbols)
  fam <- harness_glm_family(family_name, link, nb_theta)
  starts <- list("glmer's default start" = NULL)
  if (!is.null(theta) && !is.null(fixef)) {
    starts[["the harness's Laplace optimum"]] <- list(theta = as.numeric(theta),
                                                       fixef = as.numeric(fixef))
  }
  from_start <- c("bobyqa", "Nelder_Mead")
  rows <- list()
  best <- NULL
  best_value <- Inf
  for (s in names(starts)) {
    names_here <- if (is.null(starts[[s]])) names(harness_optimizer_table()) else from_start
    for (name in names_here) {
      tried <- harness_glmer_try(formula, data, fam, name, starts[[s]], maxfun)
      fit <- tried$fit
      criterion <- if (is.null(fit)) NA_real_ else as.numeric(deviance(fit))
      loglik <- if (is.null(fit)) NA_real_ else as.numeric(logLik(fit))
      # glmer's deviance() is the conditional deviance for some families; the criterion
      # compared is -2 logLik (the Laplace approximation) for every one.
      if (!is.null(fit)) criterion <- -2 * loglik
      rows[[length(rows) + 1]] <- data.frame(
        optimizer = name, start = s, method = "ML", criterion = criterion, loglik = loglik,
        converged = tried$converged,
        singular = if (is.null(fit)) NA else isSingular(fit),
        messages = tried$messages, stringsAsFactors = FALSE
      )
      if (!is.na(criterion) && criterion < best_value) {
        best_value <- criterion
        best <- c(list(optimizer = name, start = s, criterion = criterion, loglik = loglik),
                  harness_glmer_estimates(fit),
                  harness_glmer_lp0(formula, data, fam, name, starts[[s]]))
      }
    }
  }
  missing <- harness_optimizers_missing()
  list(
    table = do.call(rbind, rows),
    best_ml = best,
    missing = if (length(missing)) paste0(names(missing), " (needs R package ", missing, ")")
              else NULL
  )
}
