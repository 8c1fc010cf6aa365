# Reference values for tests/test_lme4_engine.py, recorded with this script.
# Run: Rscript tests/reference/sleepstudy_lme4.R > tests/reference/sleepstudy_lme4.json
suppressPackageStartupMessages(library(lme4))
m <- lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = TRUE)
vc <- as.data.frame(VarCorr(m), order = "lower.tri")
out <- list(
  source = "lme4::lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE)",
  script = "tests/reference/sleepstudy_lme4.R",
  date = format(Sys.Date()),
  R = paste(R.version$major, R.version$minor, sep = "."),
  lme4 = as.character(packageVersion("lme4")),
  reml_criterion = REMLcrit(m),
  fixed = as.list(fixef(m)),
  se = as.list(sqrt(diag(as.matrix(vcov(m))))),
  sd_intercept = vc$sdcor[1], cor = vc$sdcor[2], sd_days = vc$sdcor[3], sigma = sigma(m),
  loglik_ml = as.numeric(logLik(refitML(m)))
)
cat(sprintf('{\n%s\n}\n', paste(sprintf('  "%s": %s', names(out), vapply(out, function(v) {
  if (is.list(v)) sprintf("{%s}", paste(sprintf('"%s": %.10g', names(v), unlist(v)), collapse = ", "))
  else if (is.character(v)) sprintf('"%s"', v) else sprintf("%.10g", v)
}, character(1))), collapse = ",\n")))
