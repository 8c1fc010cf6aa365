# Reference values for tests/test_user_data.py: lme4 run directly in R on the CSV files.
#
# 1. Exports lme4's Dyestuff, Dyestuff2, Penicillin and Pastes to tests/data/*.csv.
# 2. Reads each CSV back with read.csv (as a user would) and fits the model with
#    lme4::lmer (REML, lme4's defaults), exactly as a user would in R.
# 3. Writes the estimates to tests/reference/lme4_datasets.json with the date and versions.
#
# Run from the repository root:  Rscript tests/reference/lme4_datasets.R
suppressPackageStartupMessages(library(lme4))

models <- list(
  dyestuff = list(data = "Dyestuff", formula = "Yield ~ 1 + (1 | Batch)"),
  dyestuff2 = list(data = "Dyestuff2", formula = "Yield ~ 1 + (1 | Batch)"),
  penicillin = list(data = "Penicillin", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"),
  pastes = list(data = "Pastes", formula = "strength ~ 1 + (1 | batch/cask)")
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
  if (is.numeric(x)) return(sprintf("%.12g", x))
  sprintf('"%s"', gsub('"', '\\\\"', as.character(x)))
}

out <- list(
  script = "tests/reference/lme4_datasets.R",
  date = format(Sys.Date()),
  R = paste(R.version$major, R.version$minor, sep = "."),
  lme4 = as.character(packageVersion("lme4")),
  Matrix = as.character(packageVersion("Matrix")),
  models = list()
)
for (name in names(models)) {
  spec <- models[[name]]
  csv <- file.path("tests", "data", paste0(tolower(spec$data), ".csv"))
  write.csv(get(spec$data, envir = asNamespace("lme4")), csv, row.names = FALSE)
  data <- read.csv(csv)
  m <- lmer(as.formula(spec$formula), data = data, REML = TRUE)
  vc <- as.data.frame(VarCorr(m), order = "lower.tri")
  comp <- ifelse(vc$grp == "Residual", "sigma", sprintf("%s: sd(%s)", vc$grp, vc$var1))
  cf <- summary(m)$coefficients
  out$models[[name]] <- list(
    csv = csv,
    formula = spec$formula,
    nobs = nobs(m),
    reml_criterion = REMLcrit(m),
    loglik_ml = as.numeric(logLik(refitML(m))),
    singular = isSingular(m),
    fixed = as.list(setNames(cf[, "Estimate"], rownames(cf))),
    se = as.list(setNames(cf[, "Std. Error"], rownames(cf))),
    variance = as.list(setNames(vc$sdcor, comp)),
    ngrps = as.list(ngrps(m))
  )
}
writeLines(json(out), file.path("tests", "reference", "lme4_datasets.json"))
