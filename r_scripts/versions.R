# Versions of R and of the R packages the harness uses: the one place that asks R.
#
# Sourced into the harness's private R environment (harness/engines/lme4.py, the
# doctor) it defines harness_versions(); run as a script it prints one
# "name=version" line per piece ("NA" for a package that is missing or, with
# --check-load, does not load), which harness/versions.py reads without rpy2:
#
#   Rscript --vanilla r_scripts/versions.R [--check-load]

harness_r_packages <- c("lme4", "nlme", "merTools", "lmerTest", "pbkrtest", "Matrix", "MASS")

harness_versions <- function(pkgs = harness_r_packages, check_load = FALSE) {
  v <- vapply(pkgs, function(p) {
    # find.package only looks a package up; requireNamespace loads it (seconds).
    found <- if (check_load) {
      suppressWarnings(suppressMessages(requireNamespace(p, quietly = TRUE)))
    } else {
      length(find.package(p, quiet = TRUE)) > 0
    }
    if (found) as.character(packageVersion(p)) else NA_character_
  }, character(1))
  data.frame(package = c("R", pkgs),
             version = c(paste(R.version$major, R.version$minor, sep = "."), unname(v)),
             stringsAsFactors = FALSE)
}

if (sys.nframe() == 0L) {
  args <- commandArgs(trailingOnly = TRUE)
  versions <- harness_versions(check_load = "--check-load" %in% args)
  cat(paste0(versions$package, "=", ifelse(is.na(versions$version), "NA", versions$version)),
      sep = "\n")
}
