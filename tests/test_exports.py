"""The public API: every exported name resolves, and the application modules load on first access."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vlorp_lightning


def test_every_exported_name_resolves():
    missing = [name for name in vlorp_lightning.__all__ if getattr(vlorp_lightning, name, None) is None]
    assert missing == []


def test_exports_have_docstrings():
    undocumented = [name for name in vlorp_lightning.__all__ if not getattr(vlorp_lightning, name).__doc__]
    assert undocumented == []


def test_application_classes_load_lazily():
    code = (
        "import sys, vlorp_lightning\n"
        "before = 'vlorp_lightning.data' in sys.modules\n"
        "vlorp_lightning.GSM8KDataModule\n"
        "print(before, 'vlorp_lightning.data' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="has no attribute 'ProjFactr'"):
        vlorp_lightning.ProjFactr  # noqa: B018
