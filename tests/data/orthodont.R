# Writes tests/data/orthodont.csv: nlme's Orthodont data (Potthoff & Roy 1964), as shipped
# with R's nlme package; used by benchmarks/bench_adaptive.py for
# `distance ~ age * Sex + (age | Subject)`.
# Run from the repository root: Rscript tests/data/orthodont.R
data("Orthodont", package = "nlme")
out <- data.frame(
  distance = Orthodont$distance,
  age = Orthodont$age,
  Subject = as.character(Orthodont$Subject),
  Sex = as.character(Orthodont$Sex)
)
write.csv(out, "tests/data/orthodont.csv", row.names = FALSE)
cat(sprintf("wrote %d rows; R %s, nlme %s\n", nrow(out),
            paste(R.version$major, R.version$minor, sep = "."), packageVersion("nlme")))
