# Reference values for tests/test_negbin.py: lme4::glmer.nb run directly in R on the CSV the
# harness ships (harness/datasets/grouseticks.csv, read as a user would).
#
# glmer.nb estimates the negative binomial's shape theta; its last fit restarts glmer's
# penalised IRLS from the fit before, so its logLik depends on that path.  The harness then
# fits glmer with theta fixed at glmer.nb's estimate from glmer's own start (the call
# glmer.nb stores in fit@call); that fit's logLik is the one the Laplace identity reproduces.
#
# Run from the repository root:  Rscript tests/reference/negbin_lme4.R
suppressPackageStartupMessages({ library(lme4); library(MASS) })

json <- function(x) {
  if (is.list(x)) {
    if (!is.null(names(x))) {
      inner <- vapply(names(x), function(n) sprintf('"%s": %s', n, json(x[[n]])), character(1))
      return(sprintf("{%s}", paste(inner, collapse = ", ")))
    }
    return(sprintf("[%s]", paste(vapply(x, json, character(1)), collapse = ", ")))
  }
  if (length(x) != 1) return(json(as.list(x)))
  if (is.na(x)) return("null")
  if (is.logical(x)) return(if (x) "true" else "false")
  if (is.numeric(x)) return(sprintf("%.15g", x))
  sprintf('"%s"', gsub('"', '\\\\"', as.character(x)))
}
named <- function(v) as.list(setNames(unname(v), names(v)))

csv <- "harness/datasets/grouseticks.csv"
formula <- TICKS ~ YEAR + cHEIGHT + (1 | BROOD)  # the shipped design's formula
data <- read.csv(csv)
for (f in c("BROOD", "LOCATION", "YEAR")) {
  data[[f]] <- factor(data[[f]], levels = as.character(sort(unique(data[[f]]))))
}
nb <- glmer.nb(formula, data = data)
nb_theta <- getME(nb, "glmer.nb.theta")
fixed <- glmer(formula, data = data, family = negative.binomial(theta = nb_theta))
entry <- function(fit) list(
  loglik = as.numeric(logLik(fit)),
  fixed = named(fixef(fit)),
  se = named(sqrt(diag(as.matrix(vcov(fit))))),
  theta = named(getME(fit, "theta"))
)
out <- list(
  script = "tests/reference/negbin_lme4.R",
  date = format(Sys.Date()),
  R = paste(R.version$major, R.version$minor, sep = "."),
  lme4 = as.character(packageVersion("lme4")),
  Matrix = as.character(packageVersion("Matrix")),
  MASS = as.character(packageVersion("MASS")),
  csv = csv,
  formula = deparse(formula),
  nobs = nobs(nb),
  nb_theta = nb_theta,
  glmer_nb = entry(nb),
  glmer_fixed_theta = entry(fixed)
)
writeLines(json(out), "tests/reference/negbin_lme4.json")
