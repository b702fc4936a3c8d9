"""Shared test settings: hypothesis profiles (a derandomised one for CI) and the
location of the optional shared data."""
import os
from pathlib import Path

from hypothesis import HealthCheck, settings

# CI sets CI=true: same examples every run, so a red build is reproducible.
settings.register_profile("ci", derandomize=True, max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
