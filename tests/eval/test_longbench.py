"""The longbench runner on a tiny random Llama with a real byte-level chat tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from kvshrink.core.errors import ModelError, SpecError
from kvshrink.data import load_text
from kvshrink.eval.chat import ChatPrompt
from kvshrink.eval.longbench import LongbenchConfig, run_case, run_longbench
from kvshrink.eval.longbench_methods import (
    CompressedMethod,
    DynamicMethod,
    build_longbench_method,
    cache_bytes,
    fp16_baseline,
)
from kvshrink.tasks import Haystack, make_task, tokenizer_counter
from tests.tiny_chat import byte_chat_tokenizer, tiny_chat_model

ROW_KEYS = {"method", "task", "length", "accuracy", "compression_ratio", "resident_ratio"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def hay(tiny) -> Haystack:
    return Haystack(load_text()[:200_000], tokenizer_counter(tiny[1]))


def test_chat_prompt_reassembles_the_template() -> None:
    tok = byte_chat_tokenizer()
    p = ChatPrompt.from_tokenizer(tok)
    turns = [{"role": "user", "content": "CTX\n\nQ1"}]
    assert p.context("CTX") + p.question("Q1", "", 0) == tok.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True
    )
    two = [*turns, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    full = p.context("CTX") + p.question("Q1", "", 0) + "A1" + p.question("Q2", "", 1)
    assert full == tok.apply_chat_template(two, tokenize=False, add_generation_prompt=True)


def test_no_chat_template_is_a_model_error() -> None:
    tok = byte_chat_tokenizer()
    tok.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        ChatPrompt.from_tokenizer(tok)


def test_uncompressed_run_matches_generate(tiny, hay) -> None:
    """Split forwards at explicit positions reproduce one plain greedy ``generate``."""
    model, tok = tiny
    case = make_task("niah_single:max_new_tokens=6").case(hay, 200, 0)
    prompt = ChatPrompt.from_tokenizer(tok)
    q = case.questions[0]
    text = prompt.context(case.context) + prompt.question(q.text, q.answer_prefix, 0)
    # the runner tokenizes the two chunks apart; so does the reference
    ids = tok(prompt.context(case.context), add_special_tokens=False).input_ids
    ids += tok(prompt.question(q.text, q.answer_prefix, 0), add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    r = run_case(model, tok, prompt, DynamicMethod(), case)
    assert r.replies[0] == tok.decode([t for t in ref if t != tok.eos_token_id], skip_special_tokens=True)
    assert r.total == r.resident == r.fp16  # nothing compressed: ratio exactly 1


def test_fp16_baseline_matches_the_cache_report(tiny) -> None:
    from kvshrink.cache import CompressedCache

    model, _ = tiny
    cache = CompressedCache(model, "fp16")
    try:
        with torch.no_grad():
            model(torch.randint(0, 200, (1, 300)), past_key_values=cache)
        assert fp16_baseline(model, 300) == cache.memory_report().fp16
        held = cache_bytes(cache)
        # fp16 storage of every token: ~1x once the float32 window counts 2 bytes per element
        assert 0.9 < fp16_baseline(model, 300) / held.total <= 1.0
        assert held.resident == held.total
    finally:
        cache.uninstall()


def test_rows_and_bytes_on_the_tiny_model(tiny, hay) -> None:
    model, tok = tiny
    tasks = ("niah_single:max_new_tokens=4", "multiturn:turns=2,max_new_tokens=3")
    cfg = LongbenchConfig(tasks=tasks, lengths=(256,), cases=2)
    methods = ["none", "snapkv:ratio=0.5+fp16", "kivi:b=2+cache:window=16,block=16"]
    data = run_longbench(model, tok, methods, cfg, hay, "tiny", keep_replies=True)
    rows = {(r["method"], r["task"], r["length"]): r for r in data["rows"]}
    assert len(rows) == 3 * 2
    for r in data["rows"]:
        assert ROW_KEYS <= set(r) and r["cases"] == 2 and 0.0 <= r["accuracy"] <= 100.0
    for task in data["tasks"]:
        assert rows[("none", task, 256)]["compression_ratio"] == 1.0
        snap = rows[("snapkv:ratio=0.5+fp16", task, 256)]
        kivi = rows[("kivi:b=2+cache:window=16,block=16", task, 256)]
        # bookkeeping and the fp16 window keep both under their nominal 2x and 8x on 256 tokens
        assert 1.3 < snap["compression_ratio"] < 2.0 and 1.4 < kivi["compression_ratio"] < 8.0
        assert snap["resident_ratio"] == snap["compression_ratio"]  # no host backup
    assert len(rows[("none", data["tasks"][1], 256)]["turn_accuracy"]) == 2
    assert len(data["replies"]) == 3 * 2 * 2


def test_config_and_method_errors() -> None:
    with pytest.raises(SpecError, match="unknown task"):
        LongbenchConfig(tasks=("nope",), lengths=(512,), cases=1)
    with pytest.raises(SpecError, match="--cases must be >= 1"):
        LongbenchConfig(tasks=("vt",), lengths=(512,), cases=0)
    with pytest.raises(SpecError, match=">= 64 tokens"):
        LongbenchConfig(tasks=("vt",), lengths=(32,), cases=1)
    assert isinstance(build_longbench_method("uncompressed"), DynamicMethod)
    assert build_longbench_method("snapkv:ratio=0.5+int4").name == "snapkv:ratio=0.5+int4"
    assert isinstance(build_longbench_method("fp16"), CompressedMethod)
    with pytest.raises(SpecError, match="unknown stage"):
        build_longbench_method("int9")
    with pytest.raises(SpecError, match="empty method spec"):
        build_longbench_method(" ")


# -- kvpress ---------------------------------------------------------------------------------
kvpress_needed = pytest.mark.skipif(
    not __import__("kvshrink.eval.kvpress_peer", fromlist=["x"]).kvpress_available(),
    reason="kvpress not installed",
)


@kvpress_needed
@pytest.mark.parametrize(
    "press", ["StreamingLLMPress", "SnapKVPress", "KnormPress", "ExpectedAttentionPress", "TOVAPress"]
)
def test_kvpress_prunes_the_context_only(tiny, hay, press: str) -> None:
    model, tok = tiny
    method = build_longbench_method(f"kvpress/{press}:ratio=0.75")
    assert method.name == f"kvpress/{press}:ratio=0.75"
    case = make_task("niah_single:max_new_tokens=3").case(hay, 200, 1)
    prompt = ChatPrompt.from_tokenizer(tok)
    r = run_case(model, tok, prompt, method, case)
    q = case.questions[0]
    n_ctx = len(tok(prompt.context(case.context), add_special_tokens=False).input_ids)
    n_q = len(tok(prompt.question(q.text, q.answer_prefix, 0), add_special_tokens=False).input_ids)
    kept = max(1, int(n_ctx * 0.25))  # kvpress keeps int(n * (1 - ratio)) per head and layer
    assert r.tokens == n_ctx
    assert r.total == fp16_baseline(model, kept + n_q)  # context pruned, question appended whole
    assert r.fp16 == fp16_baseline(model, n_ctx + n_q)


@kvpress_needed
def test_kvpress_spec_errors() -> None:
    for spec, match in [
        ("kvpress/snapkv", "exactly one option"),
        ("kvpress/snapkv:ratio=0", "must be in"),
        ("kvpress/snapkv:ratio=x", "must be a number"),
        ("kvpress/snapk:ratio=0.5", "did you mean"),
        ("kvpress/snapkv:ratio=0.5+int4", "no '\\+' stages"),
    ]:
        with pytest.raises(SpecError, match=match):
            build_longbench_method(spec)
    assert build_longbench_method("kvpress/tova:ratio=0.5").name == "kvpress/TOVAPress:ratio=0.5"


def test_missing_kvpress_is_a_model_error(monkeypatch) -> None:
    import kvshrink.eval.kvpress_peer as peer

    monkeypatch.setattr(peer, "kvpress_available", lambda: False)
    with pytest.raises(ModelError, match=r"pip install 'kvshrink\[peers\]'"):
        build_longbench_method("kvpress/SnapKVPress:ratio=0.5")


def test_summary_standard_error(tiny, hay) -> None:
    model, tok = tiny
    data = run_longbench(
        model, tok, ["none"], LongbenchConfig(("niah_single:max_new_tokens=2",), (256,), 1), hay
    )
    assert math.isnan(data["rows"][0]["accuracy_se"])  # one case: no spread to report


def test_press_hook_sees_the_cache_under_its_old_name() -> None:
    """transformers 5.25 passes attention modules ``cache=``; kvpress's hook reads
    ``past_key_values`` (KeyError without the alias). An old-style call passes through as is."""
    from kvshrink.eval.kvpress_peer import _cache_alias

    seen: list[dict] = []
    hook = _cache_alias(lambda module, args, kwargs, output: seen.append(kwargs) or output)
    cache = object()
    assert hook(None, (), {"cache": cache, "hidden_states": 1}, "out") == "out"
    assert seen[-1]["past_key_values"] is cache and seen[-1]["hidden_states"] == 1
    old = {"past_key_values": cache}
    hook(None, (), old, None)
    assert seen[-1] is old
