"""`ltri chat` as a person uses it: a real terminal (pexpect), the bundled model, a generated text;
and the store cache that lets the second chat about a text start without reading it again."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
from ltri.cli.guard import run_guarded
from ltri.cli.options import ReadingOptions
from support import byte_tokenizer, tiny_llama

from ltri.filler import filler_text, text_with_fact
from ltri.store_cache import STORES_DIR, cached_store, store_key

FACT = "The secret password for the harbour gate is 'blue heron'."
QUESTION = "What is the secret password for the harbour gate?"
# A small window, so that most of the text goes to the span store, and a budget below the text's length,
# so that retrieval has to choose.
MEMORY = ("--window", "128", "--budget", "256")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
READ_LINE = re.compile(r"read ([\d,]+) tokens in")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An empty ltri cache, sharing only the converted model with the test session's cache."""
    root = tmp_path_factory.mktemp("ltri-cache")
    models = Path(os.environ["LTRI_CACHE"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("books") / "harbour.txt"
    path.write_text(text_with_fact(FACT, n_sentences=60, depth=0.4, seed=3))
    return path


def ltri_env(cache: Path) -> dict:
    # One thread per process: on a shared machine, threads mostly wait for each other.
    return {**os.environ, "LTRI_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_ltri(cache: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ltri", *args]
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=ltri_env(cache),
        start_new_session=True,  # no controlling terminal, whoever runs the tests
    )


class Chunks:
    """pexpect's log of what the terminal showed, one entry per read, with the time it came."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, str]] = []

    def write(self, text: str) -> None:
        self.reads.append((time.perf_counter(), text))

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return ANSI.sub("", "".join(text for _, text in self.reads))


def spawn_chat(cache: Path, *args: str, ignoring_ctrl_c: bool = False) -> tuple[pexpect.spawn, Chunks]:
    """ignoring_ctrl_c: start the chat with SIGINT ignored, as a parent process that ignores it would."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ltri", "chat", *args],
        env=ltri_env(cache),
        encoding="utf-8",
        timeout=240,
        dimensions=(50, 200),
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignoring_ctrl_c else None,
    )
    child.logfile_read = Chunks()
    return child, child.logfile_read


def ask(child: pexpect.spawn, *lines: str) -> str:
    """Send lines, wait for the next prompt; what the program printed in between, without colours."""
    for line in lines:
        child.sendline(line)
    child.expect_exact(">>> ")
    return ANSI.sub("", child.before)


def end(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def store_entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / STORES_DIR).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def first_chat(cache, book) -> dict:
    """The first chat about the book: it reads the text, answers, shows /stats and /spans, resets, ends."""
    child, log = spawn_chat(cache, "--context", str(book), *MEMORY, "--max-tokens", "24")
    opening = ask(child)
    answer_started = len(log.reads)
    answer = ask(child, QUESTION)
    answer_reads = [text for _, text in log.reads[answer_started:] if text.strip()]
    stats = ask(child, "/stats")
    spans = ask(child, "/spans 3")
    reset = ask(child, "/reset")
    stats_after_reset = ask(child, "/stats")
    child.sendline("/bye")
    return {
        "exit": end(child),
        "opening": opening,
        "answer": answer,
        "answer_reads": answer_reads,
        "stats": stats,
        "spans": spans,
        "reset": reset,
        "stats_after_reset": stats_after_reset,
        "entries": store_entries(cache),
    }


def test_first_chat_reads_the_text_with_progress_and_streams_the_answer(first_chat):
    assert first_chat["exit"] == 0
    assert READ_LINE.search(first_chat["opening"])
    assert "blue heron" in first_chat["answer"].lower()
    assert len(first_chat["answer_reads"]) >= 3, "the answer should arrive in pieces, as it decodes"
    assert "Traceback" not in "".join(first_chat[key] for key in ("opening", "answer", "stats", "spans", "reset"))


def test_stats_spans_and_reset_in_the_chat(first_chat):
    tokens_read = int(READ_LINE.search(first_chat["opening"]).group(1).replace(",", ""))
    stats = first_chat["stats"]
    assert int(re.search(r"spans\s+([\d,]+) stored", stats).group(1).replace(",", "")) > 0
    assert re.search(r"last answer\s+\d+ tokens in [\d.]+ s, [\d.]+ tokens/s, first token after [\d.]+ s", stats)
    assert re.search(r"store\s+.*" + STORES_DIR, stats)
    assert "stored spans the last answer drew on" in first_chat["spans"]
    assert len(re.findall(r"tokens [\d,]+-[\d,]+ ", first_chat["spans"])) == 3
    assert "Forgot the conversation" in first_chat["reset"]
    after = first_chat["stats_after_reset"]
    assert re.search(rf"tokens\s+{tokens_read:,} read", after), "reset goes back to the text just read"
    assert re.search(r"last answer\s+none yet", after)


def test_second_chat_reopens_the_cached_store_without_reading_again(first_chat, cache, book, tmp_path):
    (entry,) = first_chat["entries"]
    saved_meta = (entry / "meta.json").stat().st_mtime_ns
    child, _ = spawn_chat(cache, "--context", str(book), *MEMORY, "--max-tokens", "24", ignoring_ctrl_c=True)
    opening = ask(child)
    assert "reopened the cached store" in opening and not READ_LINE.search(opening)
    multi_line = ask(child, '"""What is the secret', 'password for the harbour gate?"""')
    assert "blue heron" in multi_line.lower()
    assert "max_tokens 300" in ask(child, "/set max_tokens 300")
    assert "Unknown setting" in ask(child, "/set warmth 3")
    saved = tmp_path / "saved"
    ask(child, f"/save {saved}")
    assert json.loads((saved / "meta.json").read_text())["complete"] is True, "/save writes a complete store"
    child.sendline("Write a very long story about the harbour town, with many chapters.")
    child.expect_exact("chapters.\r\n")
    child.expect(r"\w")  # the answer has begun
    child.sendintr()
    stopped = ask(child)
    assert "[stopped]" in stopped
    child.sendintr()  # at the prompt, Ctrl-C does not end the chat either, though it started ignoring SIGINT
    child.expect_exact("(Ctrl-D or /bye ends the chat)", timeout=60)
    child.sendeof()
    assert end(child) == 0
    assert store_entries(cache) == [entry]
    assert (entry / "meta.json").stat().st_mtime_ns == saved_meta


def test_ask_json_answers_from_the_cached_store(first_chat, cache, book):
    result = run_ltri(cache, "ask", "--context", str(book), *MEMORY, "--json", QUESTION)
    assert result.returncode == 0, result.stderr
    assert "reopened the cached store" in result.stderr and not READ_LINE.search(result.stderr)
    answer = json.loads(result.stdout)
    assert set(answer) == {"answer", "tokens", "seconds", "spans"}
    assert "blue heron" in answer["answer"].lower() and answer["tokens"] > 0 and answer["seconds"] > 0
    assert answer["spans"] and {"start", "length", "coverage", "text"} <= set(answer["spans"][0])


def test_info_describes_a_store_without_loading_its_model(first_chat, cache):
    (entry,) = first_chat["entries"]
    result = run_ltri(cache, "info", "--store", str(entry))
    assert result.returncode == 0, result.stderr
    assert re.search(r"complete\s+yes", result.stdout)
    assert re.search(r"model\s+the bundled default", result.stdout)
    assert re.search(r"config\s+policy ltri, sink 64, window 128, budget 256", result.stdout)
    facts = json.loads(run_ltri(cache, "info", "--store", str(entry), "--json").stdout)
    assert facts["complete"] is True and facts["tokens"] > 1000 and facts["spans"] > 0 and facts["size_bytes"] > 0


# ---- the cache's rules, with a tiny random model (fast) ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def tiny_text(tmp_path, request) -> Path:
    """A short text of its own for each test, so that no two tests share a cached store."""
    path = tmp_path / "notes.txt"
    path.write_text(filler_text(12, seed=5) + f"\n\nWritten for {request.node.name}.")
    return path


def tiny_ask(cache: Path, model: Path, text: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_ltri(cache, "ask", "-c", str(text), "-m", str(model), "--window", "64", "--max-tokens", "3", *extra, "q")


def test_an_incomplete_cached_store_is_read_again(cache, tiny_model, tiny_text):
    first = tiny_ask(cache, tiny_model, tiny_text)
    assert first.returncode == 0, first.stderr
    assert READ_LINE.search(first.stderr)
    key = store_key(tiny_text.read_text(), str(tiny_model), ReadingOptions(window=64).config(), None)
    meta_path = cached_store(key, cache).path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "complete": False}))  # what an ingest killed midway leaves
    again = tiny_ask(cache, tiny_model, tiny_text)
    assert again.returncode == 0, again.stderr
    assert READ_LINE.search(again.stderr), "an incomplete store must be read again, never trusted"
    assert json.loads(meta_path.read_text())["complete"] is True
    assert "reopened the cached store" in tiny_ask(cache, tiny_model, tiny_text).stderr


def test_no_cache_keeps_no_store(cache, tiny_model, tiny_text):
    before = store_entries(cache) if (cache / STORES_DIR).exists() else []
    result = tiny_ask(cache, tiny_model, tiny_text, "--no-cache")
    assert result.returncode == 0, result.stderr
    assert store_entries(cache) == before


def test_a_cached_store_in_use_by_another_process_is_not_shared(cache, tiny_model, tiny_text):
    key = store_key(tiny_text.read_text(), str(tiny_model), ReadingOptions(window=64).config(), None)
    with cached_store(key, cache).locked() as held:
        assert held
        result = tiny_ask(cache, tiny_model, tiny_text)
    assert result.returncode == 0, result.stderr
    assert "another ltri process is using the cached store" in result.stderr
    assert not cached_store(key, cache).path.exists()


def test_chat_takes_the_text_from_a_pipe_and_the_questions_from_the_terminal(cache, tiny_model, tiny_text):
    command = f"cat {tiny_text} | {sys.executable} -m ltri chat --context - -m {tiny_model} --window 64 --max-tokens 3"
    child = pexpect.spawn("bash", ["-c", command], env=ltri_env(cache), encoding="utf-8", timeout=120)
    child.expect_exact(">>> ")
    child.sendline("Who went to the harbour?")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    assert end(child) == 0


def test_the_cache_key_follows_what_shapes_a_store(tiny_model):
    base = ReadingOptions(window=64)
    key = store_key("text", str(tiny_model), base.config(), None)
    answer_time = ReadingOptions(
        window=64, budget=10, chunk=7, reread=True, reread_evidence=32, draft_tokens=8, echo_tokens=16,
        selector="sparq", select_tokens=6, select_rank=4,
    ).config()  # fmt: skip
    assert answer_time.retrieval != base.config().retrieval
    retrieval = answer_time.retrieval
    assert (retrieval.reread_evidence, retrieval.draft_tokens, retrieval.echo_tokens) == (32, 8, 16)
    assert (retrieval.selector, retrieval.select_tokens, retrieval.select_rank) == ("sparq", 6, 4)
    assert key == store_key("text", str(tiny_model), answer_time, None)
    others = [
        store_key("other text", str(tiny_model), base.config(), None),
        store_key("text", None, base.config(), None),
        store_key("text", str(tiny_model), ReadingOptions(window=65).config(), None),
        store_key("text", str(tiny_model), base.config(), "Be brief."),
    ]
    assert key not in others and len(set(others)) == len(others)


# ---- user errors that need a store ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_store(cache, tiny_model, tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("tiny-text") / "notes.txt"
    text.write_text(filler_text(12, seed=5))
    store = tmp_path_factory.mktemp("tiny-store") / "store"
    result = run_ltri(cache, "ingest", str(text), "--store", str(store), "-m", str(tiny_model), "--window", "64")
    assert result.returncode == 0, result.stderr
    return store


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ltri: error: ") and expected in lines[0], lines[0]


def test_a_store_of_another_model_is_one_error_line(cache, tiny_store, tmp_path):
    other = tmp_path / "other-model"
    tiny_llama(seed=1).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    assert_one_error_line(run_ltri(cache, "ask", "--store", str(tiny_store), "-m", str(other), "q"), "another model")


def test_a_damaged_store_is_one_error_line(cache, tiny_store, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in tiny_store.rglob("*"):
        if file.is_file():
            target = damaged / file.relative_to(tiny_store)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    state = bytearray((damaged / "state.pt").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (damaged / "state.pt").write_bytes(bytes(state))
    assert_one_error_line(run_ltri(cache, "chat", "--store", str(damaged)), "damaged")
    assert "complete  yes" in run_ltri(cache, "info", "--store", str(damaged)).stdout  # info reads meta.json only


def test_context_from_a_pipe_needs_a_terminal_for_the_questions(cache, tiny_model):
    result = run_ltri(cache, "chat", "--context", "-", "-m", str(tiny_model), stdin="Some text to read.")
    assert_one_error_line(result, "no terminal")


def test_out_of_gpu_memory_is_one_sentence(capsys):
    def exhaust():
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB\nof which ..."
        )

    assert run_guarded(exhaust) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ltri: error: The GPU ran out of memory (it needed 2.00 GiB")
