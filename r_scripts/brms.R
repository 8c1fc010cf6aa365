# The brms engine's R side (issue 22): Stan code and data from brms, the compiled model
# cached per Stan program, sampling, and the log density at given parameter values.
#
# Sourced into the harness's private R environment by harness/engines/brms.py.  Every
# name R sees here was made by the harness (internal column names such as xf1, zb1t2,
# gb1; the prior parameters as elements of one data vector hp): no user string is
# pasted into a formula or a prior.  The checks below refuse anything else.

harness_brms_name_ok <- function(x) {
  all(grepl("^(yy|tn|off|(xf|sa)[0-9]+|zb[0-9]+t[0-9]+|gb[0-9]+)$", x))
}

harness_brms_prior_ok <- function(x) {
  arg <- "(0|hp\\[[0-9]+\\])"
  all(grepl(paste0("^[a-z_]+\\(", arg, "(, ", arg, ")*\\)$"), x))
}

# rstan on Debian: Boost lives in /usr/include; Debian's BH package holds no headers, so
# the folder rstan takes from it does not exist.
harness_brms_setup <- function() {
  suppressPackageStartupMessages({
    requireNamespace("brms")
    requireNamespace("rstan")
  })
  boost <- rstan::rstan_options("boost_lib")
  if ((is.null(boost) || !file.exists(boost)) && dir.exists("/usr/include/boost")) {
    rstan::rstan_options(boost_lib = "/usr/include")
  }
  invisible(TRUE)
}

# The brms formula, family, priors and stanvars for one design.
#   fixed: X's columns; blocks: list of list(terms, group, correlated);
#   sigma: the residual-SD indicator columns (empty: one residual SD);
#   priors: data.frame(prior, class, coef, group, dpar, lb); hp: the prior parameters.
harness_brms_spec <- function(fixed, blocks, sigma, family, link, trials, offset, priors, hp) {
  names_used <- c(fixed, sigma, unlist(lapply(blocks, function(b) c(b$terms, b$group))))
  if (!harness_brms_name_ok(names_used)) stop("harness_brms_spec: unexpected column name")
  if (!harness_brms_prior_ok(priors$prior)) stop("harness_brms_spec: unexpected prior")
  if (!all(priors$class %in% c("b", "sd", "sigma", "L"))) stop("harness_brms_spec: prior class")
  lhs <- if (trials) "yy | trials(tn)" else "yy"
  # "0 +" and X's own columns (the intercept among them): brms neither adds nor
  # centres an intercept, so b is lme4's uncentred coefficient vector, the one the
  # harness's priors are about.
  rhs <- paste(c("0", fixed), collapse = " + ")
  for (b in blocks) {
    bar <- if (isTRUE(b$correlated)) "|" else "||"
    rhs <- paste0(rhs, " + (", paste(c("0", b$terms), collapse = " + "), " ", bar, " ", b$group, ")")
  }
  if (offset) rhs <- paste0(rhs, " + offset(off)")
  formula <- brms::bf(stats::as.formula(paste(lhs, "~", rhs), env = baseenv()))
  if (length(sigma) > 0) {
    formula <- formula + brms::lf(stats::as.formula(
      paste("sigma ~", paste(c("0", sigma), collapse = " + ")), env = baseenv()))
  }
  fam <- switch(family,
    gaussian = if (length(sigma) > 0) brms::brmsfamily("gaussian", link_sigma = "identity")
               else brms::brmsfamily("gaussian"),
    binomial = brms::brmsfamily("binomial", link = link),
    poisson = brms::brmsfamily("poisson", link = link),
    stop("harness_brms_spec: unknown family"))
  prior <- do.call(c, lapply(seq_len(nrow(priors)), function(i) {
    lb <- if (is.na(priors$lb[i])) NA else priors$lb[i]  # NaN from Python means none
    brms::set_prior(priors$prior[i], class = priors$class[i], coef = priors$coef[i],
                    group = priors$group[i], dpar = priors$dpar[i], lb = lb)
  }))
  list(formula = formula, family = fam, prior = prior,
       stanvars = brms::stanvar(as.numeric(hp), name = "hp"))
}

harness_brms_code <- function(spec, data) {
  harness_brms_setup()
  as.character(brms::make_stancode(spec$formula, data = data, family = spec$family,
                                   prior = spec$prior, stanvars = spec$stanvars))
}

# Stan data plus, per brms group, its number, terms and levels (checked against the design).
harness_brms_data <- function(spec, data) {
  sdata <- brms::make_standata(spec$formula, data = data, family = spec$family,
                               prior = spec$prior, stanvars = spec$stanvars)
  sdata <- unclass(sdata)
  empty <- brms::brm(spec$formula, data = data, family = spec$family, prior = spec$prior,
                     stanvars = spec$stanvars, empty = TRUE)
  re <- as.data.frame(empty$ranef)[, c("group", "gn", "coef", "cn")]
  list(data = sdata, ranef = re, b = colnames(sdata$X))
}

# The compiled model: read from `path` when there, else compiled and saved there.
harness_brms_model <- function(code, path) {
  harness_brms_setup()
  if (nzchar(path) && file.exists(path)) {
    model <- tryCatch(readRDS(path), error = function(e) NULL)
    if (!is.null(model)) return(list(model = model, cached = TRUE))
  }
  model <- rstan::stan_model(model_code = code, model_name = "harness_brms", save_dso = TRUE,
                             auto_write = FALSE)
  if (nzchar(path)) {
    tmp <- paste0(path, ".tmp", Sys.getpid())
    saveRDS(model, tmp)
    file.rename(tmp, path)
  }
  list(model = model, cached = FALSE)
}

harness_brms_sample <- function(model, sdata, chains, iter, warmup, seed, adapt_delta,
                                max_treedepth, pars) {
  # rstan's warnings (divergences, R-hat, ESS) are kept for the fit's record, not printed.
  messages <- character(0)
  fit <- withCallingHandlers(
    rstan::sampling(model, data = sdata, chains = chains, iter = iter, warmup = warmup,
                    seed = seed, cores = 1, refresh = 0, pars = pars,
                    control = list(adapt_delta = adapt_delta, max_treedepth = max_treedepth)),
    warning = function(w) {
      messages <<- c(messages, conditionMessage(w))
      invokeRestart("muffleWarning")
    })
  draws <- as.array(fit)  # iterations x chains x parameters
  stats <- rstan::get_sampler_params(fit, inc_warmup = FALSE)
  list(draws = as.numeric(draws), dim = dim(draws), names = dimnames(draws)[[3]],
       divergent = sapply(stats, function(s) s[, "divergent__"]),
       treedepth = sapply(stats, function(s) s[, "treedepth__"]),
       stepsize = sapply(stats, function(s) s[, "stepsize__"]),
       energy = sapply(stats, function(s) s[, "energy__"]),
       messages = as.character(messages))
}

# Log density at parameter points given on the constrained scale (a list of named
# lists of parameter values), with and without the Jacobian of Stan's transforms.
harness_brms_log_prob <- function(model, sdata, points) {
  fit <- rstan::sampling(model, data = sdata, chains = 0)
  # rstan needs a fit with a model instance: chains = 0 gives one without sampling.
  out <- t(vapply(points, function(p) {
    upars <- rstan::unconstrain_pars(fit, p)
    c(rstan::log_prob(fit, upars, adjust_transform = FALSE),
      rstan::log_prob(fit, upars, adjust_transform = TRUE))
  }, numeric(2)))
  colnames(out) <- c("constrained", "unconstrained")
  out
}
