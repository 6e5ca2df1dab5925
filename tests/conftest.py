import os
import sys

# 8 CPU devices for the sharding tests; must be set before JAX starts its backend
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
