"""Test setup: 8 fake CPU devices before JAX is imported, absl flags marked parsed (grain workers)."""

import os
import re

os.environ["JAX_PLATFORMS"] = "cpu"
_DEVICES = "--xla_force_host_platform_device_count"  # set exactly once, also in xdist workers
_OTHER_FLAGS = re.sub(_DEVICES + r"=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_OTHER_FLAGS} {_DEVICES}=8".strip()


def pytest_configure(config):
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
