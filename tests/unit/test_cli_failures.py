"""What the ``tfpool`` command says when it cannot do its job: one line on stderr and a
documented exit code (``--debug``: the traceback). No Redis server runs here: a Redis URL
on a port nothing listens on is the unreachable Redis a user meets."""

from __future__ import annotations

import argparse
import socket
import threading
from pathlib import Path

import pytest

from workers import failures
from workers.cli import _parser, main
from workers.config import option_types

EXAMPLE_TOML = str(Path(__file__).parents[2] / "configs" / "example.toml")


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    return code, lines[0]


def test_status_without_redis_is_one_line_and_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(["status", "--redis-url", _closed_port_url()], capsys)
    assert code == failures.EXIT_NO_REDIS == 4
    assert line.startswith("tfpool status: cannot reach Redis: Error 111 connecting to 127.0.0.1")


def test_predict_with_a_missing_input_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(["predict", "--model", "m", "--input", "nothere.npy"], capsys)
    assert (code, line) == (2, "tfpool predict: nothere.npy: No such file or directory")


def test_debug_shows_the_traceback_instead() -> None:
    with pytest.raises(FileNotFoundError):
        main(["predict", "--model", "m", "--input", "nothere.npy", "--debug"])


def test_a_malformed_redis_url_exits_2_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    code, line = _fails(["serve", "--model", str(model), "--redis-url", "http://x"], capsys)
    assert code == 2
    assert line.startswith("tfpool serve: redis_url 'http://x' is not a Redis URL: Redis URL must")


def test_serve_a_missing_model_says_so_without_starting(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(["serve", "--model", "nothere.keras"], capsys)
    assert (code, line) == (2, "tfpool serve: model nothere.keras: no such file or directory")


def test_example_config_from_elsewhere_says_what_to_set(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a user's own folder, not the repository's
    code, line = _fails(["serve", "--config", EXAMPLE_TOML], capsys)
    configs = Path(EXAMPLE_TOML).parent
    assert code == 2
    assert line == (
        f"tfpool serve: model {configs / 'models' / 'mlp.keras'}: no such file or directory;"
        f" set `model` in {EXAMPLE_TOML} or pass --model"
    )
    assert "set `model` below to your model" in Path(EXAMPLE_TOML).read_text()[:300]


@pytest.mark.parametrize("output", ["out.txt", "out", "out.npy.gz"])
def test_score_refuses_an_output_format_it_cannot_write(
    output: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _fails(["score", "--model", "m", "x.npy", output], capsys)
    assert code == 2
    assert line.endswith(
        "the output formats are .npy, .npz (.npy for a model with one output, .npz for any model)"
    )


def test_predict_refuses_an_output_format_before_sending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, line = _fails(
        ["predict", "--model", "m", "--input", "x.npy", "--output", "y.csv",
         "--redis-url", _closed_port_url()],
        capsys,
    )  # fmt: skip
    assert code == 2 and "y.csv: cannot write .csv" in line


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("100", 100), ("0.01", 0.01), ("1.0", 1.0), ("1e-3", 0.001)]
)
def test_allow_failed_rows_takes_a_count_or_a_fraction(text: str, value: float) -> None:
    args = _parser().parse_args(["score", "--model", "m", "x.npy", "y.npy",
                                 "--allow-failed-rows", text])  # fmt: skip
    assert args.allow_failed_rows == value
    assert isinstance(args.allow_failed_rows, type(value))


@pytest.mark.parametrize("text", ["-1", "1.5", "some"])
def test_allow_failed_rows_refuses_the_rest(text: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["score", "--model", "m", "x.npy", "y.npy",
                              "--allow-failed-rows", text])  # fmt: skip
    assert exit_info.value.code == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("tfpool 0.")


def test_every_serve_option_says_what_it_does_and_its_default() -> None:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    helps = {a.dest: a.help or "" for a in serve._actions}
    for option in option_types():
        assert "see configs/example.toml" not in helps[option], option
        assert len(helps[option]) > 20, option
        if option != "model":  # required: no default
            assert "(default: " in helps[option], option
    assert "(default: 32)" in helps["max_batch_size"]
    assert "(default: a private redis-server)" in helps["redis_url"]
    assert "(default: 1, 2, 4, ... up to max_batch_size)" in helps["buckets"]


def test_demo_on_an_unreachable_redis_says_so_before_building_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, line = _fails(["demo", "--redis-url", _closed_port_url()], capsys)
    assert code == 4
    assert line.startswith("tfpool demo: cannot reach Redis: Error 111 connecting to 127.0.0.1")


def test_something_that_is_not_redis_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # A listener that answers like no Redis does (an HTTP server, say).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        code, line = _fails(["status", "--redis-url", f"redis://127.0.0.1:{port}/0"], capsys)
        thread.join(timeout=10)
    assert code == 4
    assert line.startswith("tfpool status: cannot talk to Redis: InvalidResponse: Protocol error")
