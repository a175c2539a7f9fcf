"""GPAW build configuration for Debian 12 (read by GPAW's setup.py through GPAW_CONFIG).

Links Debian's OpenMPI, ScaLAPACK (OpenMPI flavour), FFTW3, libxc and OpenBLAS.  Without
ScaLAPACK, plane-wave runs on more than one rank stop on an assertion.
"""
# flake8: noqa  (executed by GPAW's setup.py with `libraries`, `include_dirs`, ... predefined)

mpi = True
compiler = 'mpicxx'

fftw = True
scalapack = True

libraries = ['xc', 'fftw3', 'scalapack-openmpi', 'openblas']
