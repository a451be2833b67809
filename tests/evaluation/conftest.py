"""What every evaluation test runs under."""

import pytest

from harness import assets


@pytest.fixture(autouse=True)
def no_inception(tmp_path, monkeypatch):
    """Inception absent everywhere (clean-fid's /tmp place and the assets folder), whatever this machine holds:
    the FID path falls back to its stand-in, and a test that wants weights places them itself."""
    monkeypatch.setattr(assets, "cleanfid_dir", lambda: tmp_path / "cleanfid-place")
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "no-assets"))
    monkeypatch.delenv(assets.DOWNLOAD_ENV, raising=False)
