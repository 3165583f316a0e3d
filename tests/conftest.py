import os
import sys

# One BLAS thread: the fits are many small factorizations, which oversubscribed BLAS threads
# slow down many times on a 2-core machine; subprocesses (CLI tests) inherit the variable.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(1)
sys.path.insert(0, os.path.dirname(__file__))
