"""``edgetune-edge train --defence-*``: bad values are one line and exit 2, before any connection."""

from __future__ import annotations

import pytest

from edge.cli import main
from tests.tiny_models import write_toy_sentiment


@pytest.mark.parametrize("flags,needle", [
    (["--defence-noise", "-0.5"], "--defence-noise -0.5"),
    (["--defence-noise", "nan"], "--defence-noise nan"),
    (["--defence-nopeek", "-1"], "--defence-nopeek -1"),
    (["--defence-nopeek", "1000"], "--defence-nopeek 1000"),
    (["--mode", "offsite", "--defence-noise", "0.5"], "offsite mode sends none"),
])
def test_bad_defence_flags_exit_2(tmp_path, capsys, flags, needle):
    train, _ = write_toy_sentiment(tmp_path / "data")
    identity = tmp_path / "id"
    identity.mkdir()
    code = main(["train", "--cloud", "127.0.0.1:9", "--identity", str(identity), "--data", str(train),
                 "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err
