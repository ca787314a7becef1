"""The command line as a user runs it: real processes, the bundled model, generated text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltri.filler import text_with_fact

FACT = "The secret password for the harbour gate is 'blue heron'."
QUESTION = "What is the secret password for the harbour gate?"


def run_ltri(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ltri", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        # One thread per process: on a shared machine, threads mostly wait for each other.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # no controlling terminal, whoever runs the tests
    )


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("books") / "harbour.txt"
    path.write_text(text_with_fact(FACT, n_sentences=60, depth=0.4, seed=3))
    return path


def test_ask_answers_with_the_planted_fact(book):
    result = run_ltri("ask", "--context", str(book), QUESTION)
    assert result.returncode == 0, result.stderr
    assert "blue heron" in result.stdout.lower()
    assert "Traceback" not in result.stderr


def test_ask_reads_the_context_from_stdin(book):
    result = run_ltri("ask", "--context", "-", "--quiet", QUESTION, stdin=book.read_text())
    assert result.returncode == 0, result.stderr
    assert "blue heron" in result.stdout.lower()


def test_chat_answers_questions_from_stdin_until_bye(book):
    result = run_ltri("chat", "--context", str(book), "--quiet", stdin=f"{QUESTION}\n/bye\nnot read\n")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "blue heron" in lines[0].lower()


def unsupported_model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "gpt2-like"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    return directory


def binary_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(bytes(range(256)) * 16)
    return path


def latin1_file(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Un café au lait, s'il vous plaît.".encode("latin-1"))
    return path


def empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    return path


def text_dir(tmp_path: Path) -> Path:
    """A directory with files in it, which a new store must not take over."""
    directory = tmp_path / "notes"
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    return directory


def half_written_store(tmp_path: Path) -> Path:
    """What a killed `ltri ingest` leaves: meta.json still says complete: false."""
    directory = tmp_path / "half"
    directory.mkdir()
    (directory / "meta.json").write_text(json.dumps({"format": "ltri-store", "version": 1, "complete": False}))
    return directory


ERROR_CASES = {
    "missing file": (lambda tmp, book: ["ask", "-c", str(tmp / "nowhere.txt"), "q"], "does not exist"),
    "empty file": (lambda tmp, book: ["ask", "-c", str(empty_file(tmp)), "q"], "is empty"),
    "binary file": (lambda tmp, book: ["ask", "-c", str(binary_file(tmp)), "q"], "binary"),
    "not utf-8": (lambda tmp, book: ["ask", "-c", str(latin1_file(tmp)), "q"], "not UTF-8"),
    "directory": (lambda tmp, book: ["ask", "-c", str(tmp), "q"], "directory"),
    "missing model": (lambda tmp, book: ["ask", "-c", str(book), "-m", str(tmp / "no-model"), "q"], "does not exist"),
    "unsupported model": (
        lambda tmp, book: ["ask", "-c", str(book), "-m", str(unsupported_model_dir(tmp)), "q"],
        "not supported",
    ),
    "unknown policy": (lambda tmp, book: ["ask", "-c", str(book), "--policy", "magic", "q"], "Unknown memory policy"),
    "unknown selector": (lambda tmp, book: ["chat", "-c", str(book), "--selector", "magic"], "Unknown selector"),
    "selector with nothing to narrow": (
        lambda tmp, book: ["chat", "-c", str(book), "--selector", "sparq"],
        "give a larger --budget or fewer --select-tokens",
    ),
    "impossible window": (lambda tmp, book: ["chat", "-c", str(book), "--window", "0"], "n_window"),
    "negative budget": (lambda tmp, book: ["chat", "-c", str(book), "--budget", "-1"], "budget must be 0 or more"),
    "negative refresh": (
        lambda tmp, book: ["chat", "-c", str(book), "--refresh-every", "-1"],
        "refresh_every must be 0 or more",
    ),
    "non-numeric budget": (
        lambda tmp, book: ["ask", "-c", str(book), "--budget", "lots", "q"],
        "Invalid value for '--budget'",
    ),
    "no answer tokens": (lambda tmp, book: ["chat", "-c", str(book), "--max-tokens", "0"], "at least 1"),
    "unknown option": (lambda tmp, book: ["ask", "--frobnicate", "q"], "No such option"),
    "chat about a missing file": (lambda tmp, book: ["chat", "-c", str(tmp / "nowhere.txt")], "does not exist"),
    "chat about a binary file": (lambda tmp, book: ["chat", "-c", str(binary_file(tmp))], "binary"),
    "chat about a latin-1 file": (lambda tmp, book: ["chat", "-c", str(latin1_file(tmp))], "not UTF-8"),
    "chat with an unknown model": (
        lambda tmp, book: ["chat", "-c", str(book), "-m", str(unsupported_model_dir(tmp))],
        "not supported",
    ),
    "info of no store": (lambda tmp, book: ["info", "--store", str(tmp / "none")], "does not exist"),
    "info of what is not a store": (lambda tmp, book: ["info", "--store", str(tmp)], "not an ltri store"),
    "empty question": (lambda tmp, book: ["ask", "-c", str(book), "  "], "question is empty"),
    "no store": (lambda tmp, book: ["ask", "--store", str(tmp / "none"), "q"], "does not exist"),
    "not a store": (lambda tmp, book: ["ask", "--store", str(tmp), "q"], "not an ltri store"),
    "incomplete store": (lambda tmp, book: ["ask", "--store", str(half_written_store(tmp)), "q"], "incomplete"),
    "context and store": (lambda tmp, book: ["ask", "-c", str(book), "--store", str(tmp), "q"], "either"),
    "neither context nor store": (lambda tmp, book: ["ask", "q"], "either"),
    "ingest into a full directory": (
        lambda tmp, book: ["ingest", str(book), "--store", str(text_dir(tmp))],
        "not an empty directory",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_errors_end_in_one_clear_line(case, tmp_path, book):
    make_args, expected = ERROR_CASES[case]
    result = run_ltri(*make_args(tmp_path, book), stdin="")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ltri: error: ") and expected in lines[0]
    assert result.stdout == ""


def test_ingest_once_then_ask_from_the_store(book, tmp_path):
    store = tmp_path / "store"
    ingested = run_ltri("ingest", str(book), "--store", str(store), "--quiet")
    assert ingested.returncode == 0, ingested.stderr
    meta = json.loads((store / "meta.json").read_text())
    assert meta["complete"] is True and meta["tokens_seen"] > 1000
    answered = run_ltri("ask", "--store", str(store), "--quiet", QUESTION)
    assert answered.returncode == 0, answered.stderr
    assert "blue heron" in answered.stdout.lower()
    other_settings = run_ltri("ask", "--store", str(store), "--window", "1024", "--quiet", QUESTION)
    assert other_settings.returncode == 1 and "other memory or span settings" in other_settings.stderr
