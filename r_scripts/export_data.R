# Write data sets shipped with R packages to CSV files, for the gallery.
# Usage: Rscript export_data.R OUT_DIR package::name [package::name ...]
# Each name is checked against the package's own data index before it is loaded,
# so a command-line argument is never evaluated as R code.
#
# For each data set: <package>__<name>.csv (factors written as their labels) and
# <package>__<name>__levels.csv (columns `column`, `level`: every factor column's
# levels in R's order), so that the reader restores factors with R's level order,
# and therefore R's reference levels, even when the labels look like numbers
# (ChickWeight's Diet "1".."4", grouseticks' YEAR "95".."97").
args <- commandArgs(trailingOnly = TRUE)
out_dir <- args[[1]]
for (item in args[-1]) {
  parts <- strsplit(item, "::", fixed = TRUE)[[1]]
  if (length(parts) != 2) stop("expected package::name, got ", item)
  pkg <- parts[[1]]
  name <- parts[[2]]
  known <- data(package = pkg)$results[, "Item"]
  known <- sub(" .*$", "", known)
  if (!(name %in% known)) stop("no data set ", name, " in package ", pkg)
  env <- new.env()
  data(list = name, package = pkg, envir = env)
  frame <- as.data.frame(env[[name]])
  # Ordered factors and grouped-data classes become plain columns; the levels go aside.
  levels_of <- list()
  for (col in names(frame)) {
    if (is.factor(frame[[col]])) {
      levels_of[[col]] <- data.frame(column = col, level = levels(frame[[col]]))
      frame[[col]] <- as.character(frame[[col]])
    }
  }
  table <- if (length(levels_of)) {
    do.call(rbind, unname(levels_of))
  } else {
    data.frame(column = character(), level = character())
  }
  stem <- file.path(out_dir, paste0(pkg, "__", name))
  utils::write.csv(frame, paste0(stem, ".csv"), row.names = FALSE)
  utils::write.csv(table, paste0(stem, "__levels.csv"), row.names = FALSE)
}
