# Export lme4's cbpp (contagious bovine pleuropneumonia) to harness/datasets/cbpp.csv.
# Run from the repository root: Rscript harness/datasets/export_cbpp.R
# Exported 2026-11-30 with R 4.2 and lme4 1.1-31 (the versions are written to cbpp.meta.txt).
suppressPackageStartupMessages(library(lme4))
out <- file.path("harness", "datasets")
write.csv(cbpp[, c("herd", "incidence", "size", "period")], file.path(out, "cbpp.csv"), row.names = FALSE)
writeLines(c(
  paste("exported:", format(Sys.time(), "%Y-%m-%d", tz = "UTC")),
  paste("R:", paste(R.version$major, R.version$minor, sep = ".")),
  paste("lme4:", as.character(packageVersion("lme4"))),
  "source: lme4::cbpp (Lesnoff et al. 2004), 56 rows: 15 herds x up to 4 periods"
), file.path(out, "cbpp.meta.txt"))
