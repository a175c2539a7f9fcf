# Environment for nft: source it (`. scripts/env.sh`) before running nft, pytest or GPAW by hand.
# Puts the project's .venv first on PATH (Parsl workers and MPI ranks start `python`/`gpaw` from it),
# points GPAW at Debian's PAW setups and lets OpenMPI run as root.

NFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NFT_ROOT
case ":$PATH:" in
    *":$NFT_ROOT/.venv/bin:"*) ;;
    *) export PATH="$NFT_ROOT/.venv/bin:$PATH" ;;
esac
export VIRTUAL_ENV="$NFT_ROOT/.venv"

# PAW setups from Debian's gpaw-data package.
export GPAW_SETUP_PATH="${GPAW_SETUP_PATH:-/usr/share/gpaw-setups}"

# Torch uses the OpenMP threads; BLAS stays single-threaded so MPI ranks do not oversubscribe.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

# OpenMPI: allow root (CI and these machines run as root), allow more ranks than cores, and use
# plain shared memory (the single-copy mechanism CMA is not available in every sandbox).
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-1}"
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

# The single-node test cluster from slurm/start-cluster.sh, when it is running.
NFT_SLURM_DIR="${NFT_SLURM_DIR:-/tmp/nft-slurm}"
export NFT_SLURM_DIR
if [ -z "${SLURM_CONF:-}" ] && [ -f "$NFT_SLURM_DIR/slurm.conf" ]; then
    export SLURM_CONF="$NFT_SLURM_DIR/slurm.conf"
fi
