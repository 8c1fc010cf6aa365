# Reference values for tests/test_glmm.py: lme4::glmer run directly in R on the CSV files.
#
# 1. Exports real data sets shipped with R packages to tests/data/*.csv (cbpp is shipped
#    with the harness as harness/datasets/cbpp.csv): lme4's grouseticks, MASS's Insurance
#    (Poisson with an exposure offset) and the first 60 respondents of lme4's VerbAgg
#    (binary response, crossed respondent x item).
# 2. Reads each CSV back with read.csv (as a user would) and fits glmer (Laplace, lme4's
#    defaults), plus adaptive Gauss-Hermite quadrature (nAGQ = 10) and profile intervals
#    for the SD for cbpp.
# 3. Writes the estimates to tests/reference/glmm_lme4.json with the date and versions.
#
# Run from the repository root:  Rscript tests/reference/glmm_lme4.R
suppressPackageStartupMessages({ library(lme4); library(MASS) })

grouse <- grouseticks[, c("TICKS", "YEAR", "cHEIGHT", "BROOD", "LOCATION")]
write.csv(grouse, "tests/data/grouseticks.csv", row.names = FALSE)
ins <- Insurance
ins$Age <- factor(as.character(ins$Age), levels = levels(ins$Age))  # plain (unordered) factor
ins$District <- as.character(ins$District)
ins$Group <- as.character(ins$Group)
write.csv(ins[, c("District", "Group", "Age", "Holders", "Claims")], "tests/data/insurance.csv",
          row.names = FALSE)
va <- VerbAgg[as.integer(VerbAgg$id) <= 60, c("r2", "Anger", "Gender", "btype", "id", "item")]
write.csv(va, "tests/data/verbagg60.csv", row.names = FALSE)

models <- list(
  cbpp = list(csv = "harness/datasets/cbpp.csv", family = "binomial", link = "logit",
              formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
              factors = c("herd", "period"), agq = 10L),
  cbpp_probit = list(csv = "harness/datasets/cbpp.csv", family = "binomial", link = "probit",
                     formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                     factors = c("herd", "period"), agq = 0L),
  grouseticks = list(csv = "tests/data/grouseticks.csv", family = "poisson", link = "log",
                     formula = "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)",
                     factors = c("YEAR", "BROOD", "LOCATION"), agq = 0L),
  insurance = list(csv = "tests/data/insurance.csv", family = "poisson", link = "log",
                   formula = "Claims ~ Age + offset(log(Holders)) + (1 | District) + (1 | Group)",
                   factors = c("District", "Group", "Age"), agq = 0L),
  verbagg60 = list(csv = "tests/data/verbagg60.csv", family = "binomial", link = "logit",
                   formula = "r2 ~ Anger + Gender + btype + (1 | id) + (1 | item)",
                   factors = c("r2", "Gender", "btype", "id", "item"), agq = 0L)
)

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
out <- list()
for (name in names(models)) {
  m <- models[[name]]
  data <- read.csv(m$csv)
  for (f in m$factors) {
    values <- data[[f]]
    lv <- unique(as.character(values))
    # Numeric-looking labels in numeric order, as the harness's loaders / R's factor() do.
    lv <- if (all(grepl("^[0-9]+$", lv))) as.character(sort(as.integer(lv))) else sort(lv)
    if (f == "Age") lv <- levels(Insurance$Age)
    data[[f]] <- factor(as.character(values), levels = lv)
  }
  fam <- get(m$family)(link = m$link)
  fit <- glmer(as.formula(m$formula), data = data, family = fam)
  vc <- as.data.frame(VarCorr(fit))
  entry <- list(
    csv = m$csv, formula = m$formula, family = m$family, link = m$link, nobs = nobs(fit),
    loglik = as.numeric(logLik(fit)),
    fixed = named(fixef(fit)),
    se = named(sqrt(diag(as.matrix(vcov(fit))))),
    theta = named(getME(fit, "theta")),
    variance = as.list(setNames(vc$sdcor, sprintf("%s: sd(%s)", vc$grp, vc$var1))),
    singular = isSingular(fit)
  )
  if (name == "cbpp") {
    ci <- confint(fit, parm = "theta_", method = "profile", oldNames = FALSE)
    entry$profile <- list(lower = named(setNames(ci[, 1], rownames(ci))),
                          upper = named(setNames(ci[, 2], rownames(ci))))
  }
  if (m$agq > 0) {
    agq <- glmer(as.formula(m$formula), data = data, family = fam, nAGQ = m$agq)
    entry$agq <- list(nAGQ = m$agq, loglik = as.numeric(logLik(agq)), fixed = named(fixef(agq)),
                      theta = named(getME(agq, "theta")))
  }
  out[[name]] <- entry
}
header <- list(
  script = "tests/reference/glmm_lme4.R",
  date = format(Sys.Date()),
  R = paste(R.version$major, R.version$minor, sep = "."),
  lme4 = as.character(packageVersion("lme4")),
  Matrix = as.character(packageVersion("Matrix")),
  MASS = as.character(packageVersion("MASS")),
  models = out
)
writeLines(json(header), "tests/reference/glmm_lme4.json")
