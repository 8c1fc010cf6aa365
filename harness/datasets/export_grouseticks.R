# Export lme4's grouseticks (ticks on red grouse chicks) to harness/datasets/grouseticks.csv.
# Run from the repository root: Rscript harness/datasets/export_grouseticks.R
# Exported 2026-12-03 with R 4.2 and lme4 1.1-31 (the versions are written to
# grouseticks.meta.txt).  cHEIGHT is lme4's own column: HEIGHT centred at its mean, so the
# intercept is the log count at mean altitude.
suppressPackageStartupMessages(library(lme4))
out <- file.path("harness", "datasets")
g <- grouseticks
stopifnot(isTRUE(all.equal(g$cHEIGHT, g$HEIGHT - mean(g$HEIGHT))))
write.csv(g[, c("TICKS", "BROOD", "LOCATION", "YEAR", "HEIGHT", "cHEIGHT")],
          file.path(out, "grouseticks.csv"), row.names = FALSE)
writeLines(c(
  paste("exported:", format(Sys.time(), "%Y-%m-%d", tz = "UTC")),
  paste("R:", paste(R.version$major, R.version$minor, sep = ".")),
  paste("lme4:", as.character(packageVersion("lme4"))),
  "source: lme4::grouseticks (Elston et al. 2001), 403 chicks: 118 broods at 63 locations, 1995-97",
  paste("cHEIGHT: lme4's column, HEIGHT minus its mean", format(mean(g$HEIGHT), digits = 10))
), file.path(out, "grouseticks.meta.txt"))
