#!/usr/bin/env bash
# System setup for the harness: R with the CRAN packages the lme4 side needs,
# plus the few system libraries the Python side benefits from.
#
# Idempotent and quick when everything is present (one Rscript call).
# On Debian/Ubuntu, as root or with password-less sudo, it installs what is
# missing with apt-get; elsewhere it says exactly what to install.
#
#   bash r_scripts/install_r.sh                 # R + packages (+ g++, OpenBLAS headers)
#   bash r_scripts/install_r.sh --with-browser  # also Chromium, for the report's browser tests
#   bash r_scripts/install_r.sh --with-gallery  # also the data-only packages the gallery reads
#   bash r_scripts/install_r.sh --with-brms     # also brms + rstan, the third engine (issue 22)
#   HARNESS_INSTALL_CHROMIUM=1 bash r_scripts/install_r.sh   # same as --with-browser
#
# What gets installed on Debian and why:
#   r-base-core            R itself, libR.so (rpy2 loads it) and the R headers.
#   r-cran-{lme4,nlme,merTools,lmerTest,pbkrtest,mass}
#                          the frequentist engines and their helpers.
#   r-cran-mlmrev          (--with-gallery only) data sets of multilevel-modelling textbooks
#                          for `nox -s gallery` (data only; depends on lme4).
#   r-cran-brms            (--with-brms only) brms and rstan: the Stan engine. Compiling a model
#                          needs g++ and about 2.5 GB of memory; rstan finds Boost in
#                          /usr/include (r_scripts/brms.R sets rstan_options(boost_lib)).
#   g++                    PyTensor's C backend compiles the PyMC log-density with it.
#   libopenblas-dev        gives PyTensor a BLAS to link (-lopenblas); without it PyTensor
#                          warns "could not link to a BLAS installation" and falls back to
#                          NumPy's C API. Side effect: Debian's alternatives switch R's
#                          BLAS/LAPACK to OpenBLAS too (lme4 results unchanged).
# r-base-dev is NOT needed: rpy2 3.5 builds as a pure-Python wheel (cffi ABI mode) when
# the API-mode test compile fails, so no R development headers/libraries are required.
set -euo pipefail

R_PACKAGES=(lme4 nlme merTools lmerTest pbkrtest MASS)
APT_R=(r-base-core r-cran-lme4 r-cran-nlme r-cran-mertools r-cran-lmertest r-cran-pbkrtest r-cran-mass)
APT_EXTRA=(g++ libopenblas-dev)
APT_BROWSER=(chromium)
# Data packages of the real-data gallery only (benchmarks/gallery.py), not of tests or reports.
R_GALLERY=(mlmRev)
APT_GALLERY=(r-cran-mlmrev)
# The brms engine only (harness/engines/brms.py).
R_BRMS=(brms rstan)
APT_BRMS=(r-cran-brms)

with_browser="${HARNESS_INSTALL_CHROMIUM:-0}"
with_gallery=0
with_brms=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) with_browser=1 ;;
    --with-gallery) with_gallery=1 ;;
    --with-brms) with_brms=1 ;;
    -h|--help) awk 'NR > 1 && /^set /{exit} NR > 1' "$0"; exit 0 ;;
    *) echo "install_r.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[install_r] $*" >&2; }

r_ok() {
  command -v Rscript >/dev/null 2>&1 || return 1
  local pkgs
  pkgs=$(printf '"%s",' "${R_PACKAGES[@]}")
  if [ "$with_gallery" = 1 ]; then pkgs+=$(printf '"%s",' "${R_GALLERY[@]}"); fi
  if [ "$with_brms" = 1 ]; then pkgs+=$(printf '"%s",' "${R_BRMS[@]}"); fi
  # find.package only looks the packages up (loading them all takes seconds).
  Rscript --vanilla -e "invisible(find.package(c(${pkgs%,})))" >/dev/null 2>&1
}

# A library the linker finds by name: `cc -print-file-name` echoes a full path only then.
have_lib() {
  local cc found
  cc=$(command -v gcc || command -v cc || true)
  [ -n "$cc" ] || return 1
  found=$("$cc" -print-file-name="$1")
  [ "$found" != "$1" ] && [ -e "$found" ]
}

gxx_ok() { command -v g++ >/dev/null 2>&1; }
blas_ok() { have_lib libopenblas.so; }
browser_ok() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}

all_ok() {
  r_ok && gxx_ok && blas_ok || return 1
  if [ "$with_browser" = 1 ]; then browser_ok || return 1; fi
}

if all_ok; then
  say "R $(Rscript -e 'cat(as.character(getRversion()))' 2>/dev/null) with ${R_PACKAGES[*]}$(
  [ "$with_gallery" = 1 ] && echo " ${R_GALLERY[*]}")$(
  [ "$with_brms" = 1 ] && echo " ${R_BRMS[*]}"): ok"
  exit 0
fi

# Can we use apt-get without a password?
SUDO=""
can_apt=0
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    can_apt=1
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
    can_apt=1
  fi
fi

if [ "$can_apt" = 1 ]; then
  pkgs=()
  r_ok || pkgs+=("${APT_R[@]}")
  if [ "$with_gallery" = 1 ] && ! r_ok; then pkgs+=("${APT_GALLERY[@]}"); fi
  if [ "$with_brms" = 1 ] && ! r_ok; then pkgs+=("${APT_BRMS[@]}"); fi
  gxx_ok || pkgs+=(g++)
  blas_ok || pkgs+=(libopenblas-dev)
  if [ "$with_browser" = 1 ] && ! browser_ok; then pkgs+=("${APT_BROWSER[@]}"); fi
  say "installing with apt-get: ${pkgs[*]}"
  if ! { $SUDO apt-get update -q &&
         $SUDO env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends "${pkgs[@]}"; }; then
    say "apt-get failed; see its output above."
  fi
fi

if ! r_ok; then
  cat >&2 <<'EOF'
[install_r] R with the required packages is not available, and it could not be installed
[install_r] automatically (that needs apt-get as root or with password-less sudo).
Install by hand:
  * R >= 4.2 with Rscript on the PATH and libR.so built (R "--enable-R-shlib"; standard in
    distribution and CRAN binary builds);
  * the CRAN packages lme4, nlme, merTools, lmerTest, pbkrtest, MASS, e.g.
      Rscript -e 'install.packages(c("lme4","nlme","merTools","lmerTest","pbkrtest","MASS"), repos="https://cloud.r-project.org")'
  * Debian/Ubuntu: apt-get install r-base-core r-cran-lme4 r-cran-nlme r-cran-mertools \
      r-cran-lmertest r-cran-pbkrtest r-cran-mass
  * conda: conda install -c conda-forge r-base r-lme4 r-nlme r-mertools r-lmertest r-pbkrtest r-mass
  * for the gallery (--with-gallery), also the data package mlmRev (Debian: r-cran-mlmrev).
  * for the brms engine (--with-brms), also brms and rstan (Debian: r-cran-brms).
Then re-run: bash r_scripts/install_r.sh
EOF
  exit 1
fi

# R is fine; the rest is recommended, not required.
gxx_ok || say "warning: no g++; PyTensor's C backend will fall back to slow Python code (install g++)."
blas_ok || say "warning: no libopenblas.so; PyTensor will run without BLAS (install OpenBLAS dev files, e.g. libopenblas-dev)."
if [ "$with_browser" = 1 ] && ! browser_ok; then
  say "error: Chromium was requested but is not installed (Debian: apt-get install chromium)."
  exit 1
fi
say "R $(Rscript -e 'cat(as.character(getRversion()))' 2>/dev/null) with ${R_PACKAGES[*]}$(
  [ "$with_gallery" = 1 ] && echo " ${R_GALLERY[*]}")$(
  [ "$with_brms" = 1 ] && echo " ${R_BRMS[*]}"): ok"
