import os
import stat

import pytest

from cxrclip.exceptions import OutputError
from cxrclip.io import atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "r.json", "new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "ckpt.tar", "old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(OutputError, match="cannot write .*ckpt.tar: disk full; the previous file is unchanged"):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.tar"]


def test_other_errors_in_a_write_pass_through_unchanged(tmp_path):
    def bug(tmp):
        raise KeyError("not an output problem")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "x.json", bug)
    assert list(tmp_path.iterdir()) == []
