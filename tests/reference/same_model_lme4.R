# Reference values for tests/test_same_model.py: lme4's ML and REML estimates,
# logLik(refitML(m)) and REMLcrit(m), at full double precision, so the marginal
# likelihood of the PyMC model can be checked against lme4 without R.
#
# Run from the repository root:  Rscript tests/reference/same_model_lme4.R
suppressPackageStartupMessages(library(lme4))

models <- c(
  correlated = "Reaction ~ Days + (Days | Subject)",
  uncorrelated = "Reaction ~ Days + (Days || Subject)",
  intercept = "Reaction ~ Days + (1 | Subject)"
)

json <- function(x) {
  if (is.list(x)) {
    if (!is.null(names(x))) {
      inner <- vapply(names(x), function(n) sprintf('"%s": %s', n, json(x[[n]])), character(1))
      return(sprintf("{%s}", paste(inner, collapse = ", ")))
    }
    return(sprintf("[%s]", paste(vapply(x, json, character(1)), collapse = ", ")))
  }
  if (length(x) != 1 || !is.null(names(x))) return(json(as.list(x)))
  if (is.na(x)) return("null")
  if (is.logical(x)) return(if (x) "true" else "false")
  if (is.numeric(x)) return(sprintf("%.17g", x))
  sprintf('"%s"', gsub('"', '\\\\"', as.character(x)))
}

estimates <- function(m) {
  list(beta = as.list(fixef(m)), theta = as.list(getME(m, "theta")), sigma = sigma(m))
}

out <- list(
  script = "tests/reference/same_model_lme4.R",
  data = "lme4::sleepstudy (the same rows as harness/datasets/sleepstudy.csv)",
  date = format(Sys.Date()),
  R = paste(R.version$major, R.version$minor, sep = "."),
  lme4 = as.character(packageVersion("lme4")),
  Matrix = as.character(packageVersion("Matrix")),
  models = list()
)
for (name in names(models)) {
  reml <- lmer(as.formula(models[[name]]), data = sleepstudy, REML = TRUE)
  ml <- refitML(reml)
  out$models[[name]] <- list(
    formula = models[[name]],
    loglik_ml = as.numeric(logLik(ml)),
    reml_criterion = REMLcrit(reml),
    ml = estimates(ml),
    reml = estimates(reml)
  )
}
cat(json(out), "\n", file = "tests/reference/same_model_lme4.json")
