import os
import sys
import tempfile

# 8 CPU devices for the sharding tests; must be set before JAX starts its backend. The tests' programs are small
# and compiled once or a few times each: XLA:CPU's LLVM back end without its optimisation passes compiles them
# about a third faster, and the programs compute the same (XLA's own HLO passes still run; no fast-math either way).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# libtpu is installed for ahead-of-time TPU compiles (sharding.topology); the tests themselves run on the CPU
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the run, shared by the xdist workers and the subprocesses they start
# (set through the environment, which both inherit): a trainer run and its resume, and the same tiny model in
# several files, compile identical programs. Keyed by the program and the jax/XLA versions, so a hit is the same
# executable; the size cap turns on jax's file lock, so concurrent workers never read a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"internvl-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
