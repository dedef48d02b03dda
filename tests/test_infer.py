"""The CLI's one-line messages: expected errors in one line, a bug with its traceback, a full
disk named as such with the file it was writing."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_24K, tiny_codec

from pipeline.__main__ import error_message, main
from pipeline.model import snac48 as M


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    M.save_model(M.from_codec(tiny_codec(config=dict(TINY_24K, noise=False)), 48000), d)
    return d


def test_error_messages_are_one_line_and_disk_full_names_the_file(tmp_path, monkeypatch, capsys):
    import pipeline.__main__ as cli
    path = tmp_path / "ckpt.bin"

    def fail(exc):
        def run(a):
            with open(path, "wb") as f:
                f.write(b"x")
                raise exc
        return run
    cases = [(OSError(errno.ENOSPC, "No space left on device", "/data/x.pt"), "disk full while writing /data/x.pt"),
             (OSError(errno.ENOSPC, "No space left on device"), f"disk full while writing {path}"),
             (OSError(errno.EDQUOT, "Disk quota exceeded"), f"disk full while writing {path}"),
             (ValueError("two\nlines [bold]x[/bold]"), "two; lines [bold]x[/bold]"),
             (PermissionError(errno.EACCES, "Permission denied", "/root/y"),
              "[Errno 13] Permission denied: '/root/y'")]
    for exc, message in cases:
        monkeypatch.setattr(cli, "_run", fail(exc))
        assert main(["cache-info", "x"]) == 1
        out = capsys.readouterr().out
        assert out == f"error: {message}\n", out
    monkeypatch.setattr(cli, "_run", fail(KeyError("bug")))
    with pytest.raises(KeyError):                    # a bug keeps its traceback
        main(["cache-info", "x"])
    wrapped = RuntimeError("checkpoint failed")
    wrapped.__cause__ = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 92480 vs 92368")
    assert error_message(wrapped) == "disk full while writing a file (checkpoint failed)"


def test_torch_zip_writer_failure_reads_as_disk_full(model_dir, tmp_path):
    """torch.save on a full disk fails with 'unexpected pos N vs M' and no file name; a file-size
    limit makes its writes fail the same way (no root or loop device needed)."""
    out = tmp_path / "final.pt"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); from pipeline.__main__ import main; "
            f"sys.exit(main(['export', '--phase-dir', {str(model_dir)!r}, '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"error: disk full while writing {out.with_suffix('.tmp')}" in r.stdout, r.stdout

