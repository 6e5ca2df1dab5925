import os
import sys

# 8 CPU devices for the sharding tests; must be set before JAX starts its backend
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# libtpu is installed for ahead-of-time TPU compiles (sharding.topology); the tests themselves run on the CPU
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
