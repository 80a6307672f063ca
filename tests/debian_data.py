"""Tests of real data that only Debian's packages provide: skipped where absent, with the line that installs it."""

from __future__ import annotations

from pathlib import Path

import pytest


def needs_debian_package(path: str, package: str) -> pytest.MarkDecorator:
    """Skip a test of real data that only Debian's ``package`` provides (at ``path``) where it is not installed,
    with the line that installs it."""
    return pytest.mark.skipif(
        not Path(path).exists(), reason=f"real data from Debian: `apt-get install {package}` puts it in {path}"
    )
