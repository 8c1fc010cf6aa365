# Reference values for tests/test_real_data.py (issue 15): lme4's profile intervals for
# models whose grouping factor carries two random-effect blocks, run directly in R.
#
# 1. Exports nlme's Orthodont (with nsex = as.numeric(Sex == "Female")) to
#    tests/data/orthodont.csv; sleepstudy is read from harness/datasets/sleepstudy.csv.
# 2. Reads each CSV back with read.csv (as a user would), fits the model with lme4::lmer
#    (REML, lme4's defaults) and computes confint(fit, method = "profile", oldNames = FALSE).
# 3. Pairs each VarCorr row with its confint row BY NAME, as lme4 spells it
#    ("sd_<term>|<factor>", "cor_<term2>.<term1>|<factor>", "sigma"; the factor without
#    VarCorr's ".1" suffix), independently of the harness's positional matching.
# 4. Writes tests/reference/repeated_factor_profile.json with the date and versions.
#
# Run from the repository root:  Rscript tests/reference/repeated_factor_profile.R
suppressPackageStartupMessages(library(lme4))

data("Orthodont", package = "nlme")
orthodont <- data.frame(
  distance = Orthodont$distance,
  age = Orthodont$age,
  Subject = as.character(Orthodont$Subject),
  Sex = as.character(Orthodont$Sex),
  nsex = as.numeric(Orthodont$Sex == "Female")
)
write.csv(orthodont, file.path("tests", "data", "orthodont.csv"), row.names = FALSE)

models <- list(
  sleepstudy_uncorrelated = list(csv = "harness/datasets/sleepstudy.csv", factor = "Subject",
                                 formula = "Reaction ~ Days + (Days || Subject)"),
  orthodont_nsex = list(csv = "tests/data/orthodont.csv", factor = "Subject",
                        formula = "distance ~ age + (age | Subject) + (0 + nsex | Subject)")
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
  script = "tests/reference/repeated_factor_profile.R",
  date = format(Sys.Date()),
  R = paste(R.version$major, R.version$minor, sep = "."),
  lme4 = as.character(packageVersion("lme4")),
  Matrix = as.character(packageVersion("Matrix")),
  nlme = as.character(packageVersion("nlme")),
  models = list()
)
for (name in names(models)) {
  spec <- models[[name]]
  data <- read.csv(spec$csv)
  m <- lmer(as.formula(spec$formula), data = data, REML = TRUE)
  ci <- suppressMessages(suppressWarnings(
    confint(m, method = "profile", oldNames = FALSE, level = 0.95)
  ))
  vc <- as.data.frame(VarCorr(m), order = "lower.tri")
  rows <- list()
  for (i in seq_len(nrow(vc))) {
    if (vc$grp[i] == "Residual") {
      component <- "sigma"; ci_name <- "sigma"
    } else if (is.na(vc$var2[i])) {
      component <- sprintf("%s: sd(%s)", vc$grp[i], vc$var1[i])
      ci_name <- sprintf("sd_%s|%s", vc$var1[i], spec$factor)
    } else {
      component <- sprintf("%s: cor(%s,%s)", vc$grp[i], vc$var1[i], vc$var2[i])
      ci_name <- sprintf("cor_%s.%s|%s", vc$var2[i], vc$var1[i], spec$factor)
    }
    rows[[length(rows) + 1]] <- list(component = component, confint_row = ci_name,
                                     estimate = vc$sdcor[i], lower = ci[ci_name, 1],
                                     upper = ci[ci_name, 2])
  }
  out$models[[name]] <- list(csv = spec$csv, formula = spec$formula,
                             reml_criterion = REMLcrit(m), variance = rows)
}
writeLines(json(out), file.path("tests", "reference", "repeated_factor_profile.json"))
