"""Test configuration.

Eight simulated CPU devices are requested before JAX starts so that the sharding tests
can build real meshes; single-device tests are unaffected (they run on device 0).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
