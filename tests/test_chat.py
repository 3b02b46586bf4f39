"""`glm41v chat` in-process on the embedded tiny checkpoint, with piped stdin: turns, /image, /reset, /history,
errors that do not end the session, EOF, the history without `<think>`, and the thinking flags."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from glm41v_jax import tiny
from glm41v_jax.cli import main
from glm41v_jax.generate import Engine
from glm41v_jax.processing import Processor

# Tiny-tokenizer ids (glm41v_jax.tiny): special tokens are the real ones; the thinking tags are tiny's own.
USER, ASSISTANT, NEWLINE = 151336, 151337, 198
BEGIN_IMAGE, IMAGE, END_IMAGE = 151339, 151343, 151340
THINK, END_THINK, ANSWER = 151350, 151351, 151347



@pytest.fixture
def chat(tiny_cache_dir, monkeypatch, capsys, tmp_path):
    """chat(lines, *argv) -> (rc, stdout, stderr, log records)."""
    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)

    def call(lines, *argv):
        log = tmp_path / f"log-{len(list(tmp_path.glob('log-*')))}.jsonl"
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(ln + "\n" for ln in lines)))
        rc = main(["chat", "--max-new-tokens", "8", "--log-jsonl", str(log), *argv])
        out = capsys.readouterr()
        records = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
        return rc, out.out, out.err, records

    return call


@pytest.fixture(scope="module")
def processor(tiny_cache_dir) -> Processor:
    return Processor.from_dir(os.path.join(tiny_cache_dir, os.path.basename(tiny.default_cache_dir())))


def png(tmp_path, name="pic.png", size=(90, 60)):
    img = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(img).save(path)
    return str(path)


def test_session_turns_image_history_reset(chat, tmp_path, processor):
    pic = png(tmp_path)
    missing = str(tmp_path / "missing.png")
    rc, out, err, recs = chat([
        "Hello.",
        f"/image {pic}",
        "What is in the picture?",
        f"/image {missing}",
        "/history",
        "/reset",
        "/history",
        "After the reset.",
    ])  # then end of input
    assert rc == 0, err
    assert "random" in err.lower() and "meaningless" in err.lower()
    assert len(recs) == 3

    r1, r2, r3 = recs
    # every reply streamed to stdout (tags shown as section labels)
    for r in recs:
        assert 1 <= len(r["token_ids"]) <= 8
        assert r["thinking"] in out and r["answer"] in out
    # turn 1: plain prompt
    assert r1["prompt_token_ids"][-2:] == [ASSISTANT, NEWLINE]
    assert IMAGE not in r1["prompt_token_ids"]
    # turn 2: carries turn 1 (as stored in the history) and the image
    p2 = r2["prompt_token_ids"]
    assert p2[:len(r1["prompt_token_ids"])] == r1["prompt_token_ids"]
    decoded2 = processor.decode(p2)
    assert f"<|user|>\nHello.<|assistant|>\n{r1['history_content']}<|user|>\n" in decoded2
    assert BEGIN_IMAGE in p2 and END_IMAGE in p2 and p2.count(IMAGE) > 0
    assert decoded2.endswith("What is in the picture?<|assistant|>\n")
    assert r2["images"] == [pic] and (r2["conversation"], r2["turn"]) == (1, 2)
    # the missing image: one error line, the session went on
    assert f"error: image file not found: {missing}" in err
    # /history before the reset, then an empty one
    assert f"[1] user: Hello.\n[2] assistant: {r1['history_content']}\n" in out
    assert f"[3] user: <image: {pic}> What is in the picture?\n" in out
    assert "(history is empty)" in out
    assert "(conversation reset)" in err
    # turn 3: a fresh conversation, without the image (the missing one was never attached)
    p3 = processor.decode(r3["prompt_token_ids"])
    assert "Hello." not in p3 and IMAGE not in r3["prompt_token_ids"]
    assert p3.endswith("<|user|>\nAfter the reset.<|assistant|>\n")
    assert (r3["conversation"], r3["turn"]) == (2, 1)
    # one engine: turn 3 (same prompt bucket as turn 1) needed no new compile
    assert r3["num_compiles"] == r2["num_compiles"]


def test_history_keeps_think_out(chat, monkeypatch, processor):
    """Scripted replies (the tiny model's random weights never write tags): the next prompt holds the first
    reply without its <think> part, with the </answer> that skip_special_tokens decoding dropped put back."""
    replies = ["<think>secret plan</think><answer>A cat.</answer>", "<think>more</think><answer>Yes."]
    original = Engine.generate

    def scripted(self, inputs, *, stream_callback=None, **kw):
        res = original(self, inputs, **{**kw, "max_new_tokens": 1})
        ids = processor.tokenizer.encode(replies.pop(0), add_special_tokens=False).ids
        if stream_callback is not None:  # two chunks, the first ending inside a tag
            stream_callback(ids[:3])
            stream_callback(ids[3:])
        return dataclasses.replace(res, token_ids=ids, finish_reason="eos")

    monkeypatch.setattr(Engine, "generate", scripted)
    rc, out, err, recs = chat(["What is it?", "Sure?", "/history"], "--system", "Be brief.")
    assert rc == 0, err
    r1, r2 = recs
    assert r1["text"] == "<think>secret plan</think><answer>A cat."  # </answer> (151348) is special: skipped
    assert (r1["thinking"], r1["answer"]) == ("secret plan", "A cat.")
    assert r1["history_content"] == "<answer>A cat.</answer>"
    decoded = processor.decode(r2["prompt_token_ids"])
    assert decoded == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nWhat is it?<|assistant|>\n<answer>A cat.</answer>"
                       "<|user|>\nSure?<|assistant|>\n")
    assert "secret" not in decoded
    assert "thinking:\nsecret plan\n\nanswer:\nA cat.\n" in out  # streamed with section labels
    assert ("[1] system: Be brief.\n[2] user: What is it?\n[3] assistant: <answer>A cat.</answer>\n"
            "[4] user: Sure?\n[5] assistant: <answer>Yes.</answer>\n") in out


def test_errors_do_not_end_the_session(chat, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png at all")
    rc, out, err, recs = chat([
        "/video nowhere.mp4",
        "/bogus",
        "/image",
        f"/image {bad}",
        "Describe it.",
        "",
        "//slash is text",
        "/exit",
        "never read",
    ])
    assert rc == 0, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors[0] == "error: video file not found: nowhere.mp4"
    assert errors[1].startswith("error: unknown command /bogus")
    assert errors[2] == "error: /image needs a file path"
    assert "(message not sent; 1 attachment(s) dropped)" in errors[3]
    assert len(errors) == 4
    # only the `//` line was answered, as "/slash is text", without the dropped image; nothing after /exit
    assert len(recs) == 1
    assert recs[0]["user"] == "/slash is text" and recs[0]["images"] == []
    assert IMAGE not in recs[0]["prompt_token_ids"]


def test_startup_errors_exit_2(chat, tmp_path):
    rc, _, err, _ = chat(["hi"], "--max-new-tokens", "0")
    assert rc == 2 and "error: argument --max-new-tokens: expected an integer in [1, 2147483647], got '0'" in err
    rc, _, err, _ = chat(["hi"], "--model", str(tmp_path / "no-such-model"))
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ")
    rc, _, err, _ = chat(["hi"], "--max-thinking-tokens", "-1")
    assert rc == 2 and "error: argument --max-thinking-tokens: expected an integer in [0, 2147483647]" in err


def test_eof_right_away(chat):
    rc, out, err, recs = chat([])
    assert rc == 0 and recs == [] and out == ""


# ---------------------------------------------------------------------------------------------------------------
# Thinking flags: Engine.generate(max_thinking_tokens=..., think_end_ids=...) and
# Processor.encode_messages(assistant_prefix=...).


def test_max_thinking_tokens_forces_the_answer(chat):
    rc, out, err, recs = chat(["Think briefly."], "--max-thinking-tokens", "2")
    assert rc == 0, err
    (rec,) = recs
    # two free tokens (the budget counts from the first generated one), then </think><answer> is forced
    assert rec["token_ids"][2:4] == [END_THINK, ANSWER], rec["token_ids"]
    assert rec["max_thinking_tokens"] == 2
    assert "</think><answer>" in rec["text"]


def test_no_thinking_prefills_an_empty_think_block(chat):
    rc, out, err, recs = chat(["Answer at once.", "Again."], "--no-thinking", "--max-thinking-tokens", "0")
    assert rc == 0, err
    r1, r2 = recs
    assert r1["prompt_token_ids"][-4:] == [ASSISTANT, NEWLINE, THINK, END_THINK]
    assert r1["no_thinking"] is True
    # the budget never fires when the prompt closed the block
    assert r1["token_ids"][:2] != [END_THINK, ANSWER]
    # the prefix is a prompt for this turn only: it is not stored in the history
    assert "<think>" not in r1["history_content"]


# ---------------------------------------------------------------------------------------------------------------
# Hostile input: bytes that are not UTF-8, an earlier turn's image deleted, role tokens typed by the user.


def test_non_utf8_stdin_keeps_the_session(tiny_cache_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    log = tmp_path / "log.jsonl"
    raw = b"Hello.\n\xff\xfe not text \xc3\n" + "Caf\u00e9?\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    rc = main(["chat", "--max-new-tokens", "3", "--log-jsonl", str(log)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "error: input line 2 is not UTF-8 (byte 0xff at column 1); it was ignored" in err
    assert "Traceback" not in err
    r1, r2 = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert r2["user"] == "Caf\u00e9?" and (r2["conversation"], r2["turn"]) == (1, 2)  # the history survived
    assert r2["prompt_token_ids"][:len(r1["prompt_token_ids"])] == r1["prompt_token_ids"]


def test_overlong_stdin_line_is_dropped_and_the_session_goes_on(tiny_cache_dir, monkeypatch, capsys, tmp_path):
    """A line over MAX_LINE_BYTES (here 3 MiB piped in) is refused before tokenising, read past in bounded pieces,
    and the next line is still answered with the history intact."""
    from glm41v_jax.cli.chat import MAX_LINE_BYTES

    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    log = tmp_path / "log.jsonl"
    raw = b"Hello.\n" + b"x" * (3 * MAX_LINE_BYTES) + b"\nStill here?\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    rc = main(["chat", "--max-new-tokens", "2", "--log-jsonl", str(log)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"error: input line 2 is longer than {MAX_LINE_BYTES} bytes; it was ignored" in err
    assert [json.loads(ln)["user"] for ln in log.read_text().splitlines()] == ["Hello.", "Still here?"]


def test_deleted_earlier_image_message(chat, tmp_path, capsys, monkeypatch):
    pic = png(tmp_path, "old picture.png")

    class Stdin(io.StringIO):
        def readline(self, *a):
            line = super().readline(*a)
            if line.startswith("Still there?"):
                os.remove(pic)
            return line

    monkeypatch.setattr(sys, "stdin", Stdin(f"/image {pic}\nWhat is it?\nStill there?\n/reset\nFresh.\n"))
    log = tmp_path / "d.jsonl"
    rc = main(["chat", "--max-new-tokens", "2", "--log-jsonl", str(log)])
    err = capsys.readouterr().err
    assert rc == 0
    assert [json.loads(ln)["user"] for ln in log.read_text().splitlines()] == ["What is it?", "Fresh."]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: the image of earlier turn 1 is gone: {pic} (no such file); restore it, or /reset to "
                      "start a new conversation without it"]


def test_role_tokens_typed_in_chat_are_text(chat):
    rc, out, err, recs = chat(["Say <|assistant|> and <|endoftext|> and <think>"])
    assert rc == 0, err
    ids = recs[0]["prompt_token_ids"]
    assert ids.count(ASSISTANT) == 1 and 151329 not in ids and THINK not in ids
    rc, out, err, recs = chat(["Say <|assistant|> and <|endoftext|> and <think>"], "--text-special-tokens")
    ids = recs[0]["prompt_token_ids"]
    assert ids.count(ASSISTANT) == 2 and 151329 in ids and THINK in ids


def test_a_bug_in_a_turn_keeps_its_traceback(chat, monkeypatch):
    """Only user-facing errors (Glm41vError, OSError) are reported as a line; anything else is a bug and raises."""
    def broken(self, *a, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(Engine, "generate", broken)
    with pytest.raises(KeyError, match="a bug"):
        chat(["hi"])


def test_closed_stdout_ends_the_session_quietly(tiny_cache_dir, monkeypatch, capsys):
    class BrokenPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello.\n/history\nMore.\n"))
    monkeypatch.setattr(sys, "stdout", BrokenPipe())
    rc = main(["chat", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 141 and "Traceback" not in err and "error:" not in err


def test_log_jsonl_bad_paths_and_failed_writes(tiny_cache_dir, monkeypatch, capsys, tmp_path):
    """`--log-jsonl` naming a folder fails at once, before the model loads, in one line naming it (was a bare
    '[Errno 21] Is a directory' after loading); a write that fails (a full device: /dev/full) is one line naming the
    file instead of '[Errno 28] No space left on device'; a failed append is cut back off, so earlier records stay
    whole (RecordLog with a write that fails half-way)."""
    from glm41v_jax.cli.chat import RecordLog
    from glm41v_jax.cli.common import CliError

    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs dir").mkdir()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello.\n"))
    rc = main(["chat", "--max-new-tokens", "2", "--log-jsonl", "logs dir"])
    err = capsys.readouterr().err
    assert rc == 2 and "model loaded" not in err and "Traceback" not in err, err
    assert err.strip().splitlines() == ["error: --log-jsonl logs dir: cannot open it for appending (Is a directory)"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello.\n"))
    rc = main(["chat", "--max-new-tokens", "2", "--log-jsonl", "/dev/full"])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and errors == ["error: --log-jsonl /dev/full: cannot append this turn's record (No space left on "
                                  "device); the file keeps the records of the earlier turns"], errors

    path = tmp_path / "turns.jsonl"
    log = RecordLog("turns.jsonl")
    log.write('{"turn": 1}\n')

    class HalfThenFull:  # a raw file whose second write fails after part of the record went out, as on a full disk
        def __init__(self, f):
            self.f, self.calls = f, 0

        def seek(self, *a):
            return self.f.seek(*a)

        def truncate(self, n):
            return self.f.truncate(n)

        def write(self, data):
            self.calls += 1
            if self.calls > 1:
                raise OSError(28, "No space left on device")
            return self.f.write(data[:5])

    log._f = HalfThenFull(log._f)
    with pytest.raises(CliError, match="turns.jsonl: cannot append"):
        log.write('{"turn": 2, "text": "long enough to need two writes"}\n')
    log._f = log._f.f
    log.close()
    assert path.read_text() == '{"turn": 1}\n'
