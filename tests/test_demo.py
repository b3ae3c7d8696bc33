"""`lesionlocator demo`: an output path it cannot use is a clear error that changes nothing."""
from __future__ import annotations

from LesionLocatorLib import cli


def test_demo_refuses_an_output_that_is_a_file_lies_under_one_or_holds_files(tmp_path, capsys):
    user_file = tmp_path / "outfile"
    user_file.write_text("user data")
    assert cli.main(["demo", "-o", str(user_file)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert cli.main(["demo", "-o", str(user_file / "sub")]) == 2
    assert "lies under the file" in capsys.readouterr().err
    assert cli.main(["demo", "-o", str(tmp_path)]) == 2
    assert "already holds files; nothing was overwritten" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [user_file] and user_file.read_text() == "user data"
