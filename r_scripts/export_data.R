# Write data sets shipped with R packages to CSV files, for the gallery.
# Usage: Rscript export_data.R OUT_DIR package::name [package::name ...]
# Each name is checked against the package's own data index before it is loaded,
# so a command-line argument is never evaluated as R code.
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
  # Ordered factors and grouped-data classes become plain columns.
  for (col in names(frame)) {
    if (is.factor(frame[[col]])) frame[[col]] <- as.character(frame[[col]])
  }
  utils::write.csv(frame, file.path(out_dir, paste0(pkg, "__", name, ".csv")), row.names = FALSE)
}
