"""The decoding engine and the site's leases on a tiny model, in process (agent.lm.engine, agent.lm.site).

Adapters attach and detach by digest on a base that is never reloaded; a batch mixes adapters and gives
each row what it would get alone; seeds reproduce whatever shares the batch; a request finishes on the
adapter version it started with while a new version takes over, and the old one is dropped after it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lm.engine import PAUSES, Engine, Sequence
from agent.lm.errors import APIError, ArtifactError, LMError
from agent.lm.site import LanguageModels, LMRelease, Settings
from tests.agent.lm.conftest import TinyModels
from tests.agent_harness import wait_for

V1, V2 = "d" + "1" * 64, "d" + "2" * 64


@pytest.fixture(scope="module")
def engine(tiny_models: TinyModels) -> Iterator[Engine]:
    started = Engine(tiny_models.base, max_batch=8, window_s=0.05)
    started.attach(V1, tiny_models.router_v1)
    started.attach(V2, tiny_models.router_v2)
    yield started
    started.close()


def prompt(engine: Engine, text: str = "My card was stolen") -> list[int]:
    return engine.prompt_ids([{"role": "user", "content": text}])


def greedy(engine: Engine, adapter: str | None, text: str = "My card was stolen", tokens: int = 8) -> Sequence:
    return Sequence(prompt(engine, text), adapter, tokens, temperature=0.0)


def test_the_base_loads_once_and_adapters_change_its_answers(engine: Engine, tiny_models: TinyModels) -> None:
    base, v1, v2 = engine.generate([greedy(engine, None), greedy(engine, V1), greedy(engine, V2)])
    assert v2.text != base.text  # random LoRA weights move the logits
    assert engine.adapters >= {V1, V2}
    assert all(g.tokens <= 8 and g.finish_reason in ("stop", "length") for g in (base, v1, v2))


def test_a_mixed_batch_gives_each_row_what_it_gets_alone(engine: Engine) -> None:
    rows = [greedy(engine, a, t) for a, t in ((None, "loan"), (V1, "my card"), (V2, "a fraud"), (V1, "savings"))]
    alone = [engine.generate([row])[0].text for row in rows]
    together = [g.text for g in engine.generate(rows)]
    assert together == alone


def test_concurrent_requests_are_decoded_in_one_batch(engine: Engine) -> None:
    before = engine.batches
    rows = [greedy(engine, (None, V1, V2)[i % 3], f"message {i}") for i in range(6)]
    futures = [engine.submit([row]) for row in rows]  # within the collection window: one batch
    results = [f.result(timeout=120) for f in futures]
    assert len(results) == 6 and engine.batches - before < 6


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch(engine: Engine) -> None:
    seeded = Sequence(prompt(engine), V1, 10, temperature=1.0, seed=1234)
    alone = engine.generate([seeded])[0]
    others = [Sequence(prompt(engine, "loan"), V2, 6, temperature=1.0) for _ in range(3)]
    mixed = engine.generate([others[0], seeded, *others[1:]])[1]
    assert (mixed.text, mixed.seed) == (alone.text, 1234)
    assert engine.generate([Sequence(prompt(engine), V1, 10, temperature=1.0)])[0].seed < 2**53


def test_stop_strings_and_token_budgets_end_a_row(engine: Engine) -> None:
    full = engine.generate([Sequence(prompt(engine), None, 12, temperature=1.0, seed=5)])[0]
    assert full.finish_reason == "length" and full.tokens == 12
    stop = full.text[len(full.text) // 2 :][:2]
    cut = engine.generate([Sequence(prompt(engine), None, 12, temperature=1.0, seed=5, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    streamed: list[str] = []
    with_stream = Sequence(prompt(engine), None, 12, temperature=1.0, seed=5, stop=(stop,), on_text=streamed.append)
    assert engine.generate([with_stream])[0].text == "".join(streamed) == cut.text  # no part of the stop leaks


def test_an_adapter_of_another_base_is_refused_and_the_engine_keeps_serving(
    engine: Engine, tiny_models: TinyModels
) -> None:
    with pytest.raises(ArtifactError, match=r"does not attach|fit no module"):
        engine.attach("d" + "9" * 64, tiny_models.other_adapter)
    assert "d" + "9" * 64 not in engine.adapters
    assert engine.generate([greedy(engine, V1)])[0].tokens > 0


def test_an_adapter_naming_modules_the_base_lacks_is_refused(tmp_path: Path, tiny_models: TinyModels) -> None:
    import json  # noqa: PLC0415

    odd = tmp_path / "odd"
    shutil.copytree(tiny_models.router_v2, odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj", "w_gate"]}))
    engine = Engine(tiny_models.base, max_batch=2)
    try:
        with pytest.raises(ArtifactError, match="w_gate"):
            engine.attach("d" + "8" * 64, odd)
        (odd / "adapter_model.safetensors").unlink()
        with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors is missing"):
            engine.attach("d" + "7" * 64, odd)
        (odd / "adapter_model.bin").write_bytes(b"pickle")
        with pytest.raises(ArtifactError, match="pickle"):
            engine.attach("d" + "7" * 64, odd)
    finally:
        engine.close()


def test_detach_removes_an_adapter_by_digest_and_a_row_naming_it_fails_alone(
    engine: Engine, tiny_models: TinyModels
) -> None:
    name = "d" + "3" * 64
    engine.attach(name, tiny_models.router_v2)
    assert name in engine.adapters
    engine.detach(name)
    assert name not in engine.adapters and V2 in engine.adapters  # same files, another digest: untouched
    with pytest.raises(LMError, match="is not attached"):
        engine.generate([greedy(engine, name)])
    assert engine.generate([greedy(engine, V2)])[0].tokens > 0


def test_a_request_joins_a_running_batch_and_is_answered_when_its_own_rows_end(engine: Engine) -> None:
    decoding, submitted = threading.Event(), threading.Event()

    def hold_first_token(_delta: str) -> None:  # on the engine thread: the batch is running
        if not decoding.is_set():
            decoding.set()
            submitted.wait(timeout=30)

    long_row = Sequence(prompt(engine, "loan"), None, 40, temperature=1.0, seed=7)
    long_alone = engine.generate([long_row])[0]
    short = greedy(engine, V1, "my card was stolen yesterday", tokens=3)
    short_alone = engine.generate([short])[0]
    prefills = engine.batches
    running = engine.submit([Sequence(**{**long_row.__dict__, "on_text": hold_first_token})])
    assert decoding.wait(timeout=60)
    joined = engine.submit([short])
    submitted.set()
    answer = joined.result(timeout=60)[0]
    assert not running.done()  # answered while the batch it joined goes on
    assert answer.text == short_alone.text  # left-padded into the batch's cache, it decodes as it does alone
    assert running.result(timeout=60)[0].text == long_alone.text  # and the row it joined is not disturbed
    assert engine.batches - prefills == 2  # one prefill each: the second joined the first's batch


def test_rows_that_come_and_go_decode_as_they_do_alone(engine: Engine) -> None:
    texts = ["loan", "my card", "a fraud on my account last night", "savings", "mortgage rates", "hello"]
    rows = [greedy(engine, (None, V1, V2)[i % 3], text, tokens=2 + 3 * i) for i, text in enumerate(texts)]
    alone = [engine.generate([row])[0].text for row in rows]
    futures = []
    for row in rows:  # each joins on its own while the others decode: rows join, leave, columns are trimmed
        before = engine.batches
        futures.append(engine.submit([row]))
        wait_for(lambda b=before: engine.batches > b, what="the row's prefill")
    assert [f.result(timeout=120)[0].text for f in futures] == alone


def test_the_next_version_of_an_adapter_is_copied_into_a_spare_slot_without_new_layers(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    from tests.agent.lm import tiny  # noqa: PLC0415

    v3 = tiny.lora_adapter(tiny_models.base, tmp_path / "router-3", seed=5)  # router_v2's shape, other weights
    fresh = Engine(tiny_models.base, max_batch=4)
    slotted = Engine(tiny_models.base, max_batch=4)
    try:
        fresh.attach("d" + "3" * 64, v3)
        expected = fresh.generate([greedy(fresh, "d" + "3" * 64)])[0].text
        slotted.attach(V2, tiny_models.router_v2)
        layers = len(slotted.peft.peft_config)  # the adapter and one spare of its shape
        slotted.attach("d" + "3" * 64, v3)  # the rollout of a new version: its weights go into the spare
        assert len(slotted.peft.peft_config) == layers == 2
        assert slotted.generate([greedy(slotted, "d" + "3" * 64)])[0].text == expected
        v2_text = slotted.generate([greedy(slotted, V2)])[0].text
        slotted.detach(V2)  # its slot is free again, for the version after
        slotted.attach("d" + "4" * 64, tiny_models.router_v2)
        assert len(slotted.peft.peft_config) == 2
        assert slotted.generate([greedy(slotted, "d" + "4" * 64)])[0].text == v2_text
        with pytest.raises(ArtifactError, match="does not attach to this base"):
            slotted.attach("d" + "5" * 64, tiny_models.other_adapter)  # same config, another base's shapes
        assert slotted.adapters == {"d" + "3" * 64, "d" + "4" * 64}
    finally:
        fresh.close()
        slotted.close()


def test_an_adapter_with_rows_decoding_is_not_detached(engine: Engine, tiny_models: TinyModels) -> None:
    name = "d" + "6" * 64
    engine.attach(name, tiny_models.router_v2)
    decoding, release = threading.Event(), threading.Event()

    def hold(_delta: str) -> None:
        decoding.set()
        release.wait(timeout=30)

    running = engine.submit([Sequence(prompt(engine), name, 6, temperature=1.0, seed=3, on_text=hold)])
    assert decoding.wait(timeout=60)
    errors: list[str] = []
    detaching = threading.Thread(target=lambda: errors.append(_raises(lambda: engine.detach(name))))
    detaching.start()  # queued while the row decodes; it runs between two forward passes
    release.set()
    detaching.join(timeout=60)
    assert running.result(timeout=60)[0].tokens > 0
    assert errors and "has rows decoding" in errors[0]
    engine.detach(name)
    assert name not in engine.adapters


def _raises(fn: Any) -> str:
    try:
        fn()
    except LMError as exc:
        return str(exc)
    return ""


SYSTEM = "You route customer messages at a bank. Reply with exactly one word, the queue: cards, loans, fraud."


def chat(engine: Engine, text: str) -> list[int]:
    return engine.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])


def test_a_shared_prompt_prefix_is_computed_once_per_adapter_and_changes_no_answer(tiny_models: TinyModels) -> None:
    from tests.agent.lm import tiny  # noqa: PLC0415

    texts = ["my card was stolen", "a loan for a car", "someone took money from my account"]
    names = (None, V2, "d" + "5" * 64)
    warm = Engine(tiny_models.base, max_batch=4)
    try:
        other = tiny.lora_adapter(tiny_models.base, tiny_models.base.parent / "router-5", seed=9)
        warm.attach(V2, tiny_models.router_v2)
        expected = {}  # each prompt on a fresh engine: nothing to reuse
        for name in names:
            for text in texts:
                fresh = Engine(tiny_models.base, max_batch=4)
                try:
                    if name:
                        fresh.attach(name, other if name == names[2] else tiny_models.router_v2)
                    expected[name, text] = fresh.generate([Sequence(chat(fresh, text), name, 6, 0.0)])[0]
                    assert fresh.prefix_tokens_reused == 0
                finally:
                    fresh.close()
        for name in names[:2]:
            for text in texts:
                assert warm.generate([Sequence(chat(warm, text), name, 6, 0.0)])[0].text == expected[name, text].text
        assert warm.prefix_tokens_reused >= 16 * 2  # the system prompt's blocks, reused by later prompts
        assert warm.generate([Sequence(chat(warm, texts[1]), V2, 6, 0.0)])[0].text == expected[V2, texts[1]].text
        # A slot that gets another adapter does not keep the keys and values its last adapter computed.
        warm.attach("d" + "7" * 64, tiny_models.router_v2)  # into the spare slot
        warm.detach(V2)
        warm.attach(names[2], other)  # into V2's slot, the only free one
        assert len(warm.peft.peft_config) == 2
        reused = warm.prefix_tokens_reused
        got = warm.generate([Sequence(chat(warm, texts[1]), names[2], 6, 0.0)])[0]  # its own prefix, kept
        again = warm.generate([Sequence(chat(warm, texts[1]), names[2], 6, 0.0)])[0]  # and reused
        assert warm.prefix_tokens_reused > reused
        for answer in (got, again):
            want = expected[names[2], texts[1]]
            assert answer.text == want.text and answer.mean_logprob == pytest.approx(want.mean_logprob, abs=1e-4)
        warm.detach("d" + "7" * 64)
        warm.attach("d" + "8" * 64, other)  # into the other slot: two rows need its entry, one pass makes it
        mark = time.perf_counter()
        pair = warm.generate([Sequence(chat(warm, t), "d" + "8" * 64, 6, 0.0) for t in (texts[0], texts[2])])
        join = next(p for p in warm.passes if p.kind == "join" and p.started > mark)
        assert 0 < join.prefix_s < join.seconds and join.uncached_tokens == 0  # the trace shows that pass
        for answer, text in zip(pair, (texts[0], texts[2]), strict=True):
            want = expected[names[2], text]
            assert answer.text == want.text and answer.mean_logprob == pytest.approx(want.mean_logprob, abs=1e-4)
    finally:
        warm.close()


def fresh_answer(base: Path, name: str, files: Path, text: str) -> Any:
    """What a fresh engine with only adapter `files` attached answers to `text` (greedy, 6 tokens)."""
    fresh = Engine(base, max_batch=4)
    try:
        fresh.attach(name, files)
        return fresh.generate([Sequence(chat(fresh, text), name, 6, 0.0)])[0]
    finally:
        fresh.close()


def cache_the_system_prompt(engine: Engine, name: str) -> None:
    """Two prompts make the system prompt a known prefix; the third caches its keys and values for `name`."""
    for other in ("my card was stolen", "someone took money from my account", "where is my new card"):
        engine.generate([Sequence(chat(engine, other), name, 6, 0.0)])


def test_a_new_version_gets_its_predecessors_prefixes_computed_beside_decoding(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    import torch  # noqa: PLC0415

    from tests.agent.lm import tiny  # noqa: PLC0415

    v3, v4 = "d" + "3" * 64, "d" + "4" * 64
    files = tiny.lora_adapter(tiny_models.base, tmp_path / "router-3", seed=5)  # router_v2's shape
    text = "a loan for a car"
    expected = fresh_answer(tiny_models.base, v3, files, text)
    warm = Engine(tiny_models.base, max_batch=4)
    try:
        warm.attach(V2, tiny_models.router_v2)
        cache_the_system_prompt(warm, V2)
        # The rollout of the next version, into V2's spare slot. Its prefixes are computed beside decoding, on a
        # thread of the lowest CPU priority: while that computation is held, V2's rows still decode.
        computing, go_on = threading.Event(), threading.Event()
        priority: list[tuple[int, int, int]] = []

        def aside() -> tuple[int, int, int]:  # nice, policy, intra-op threads
            return (
                os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                os.sched_getscheduler(0),
                torch.get_num_threads(),
            )

        def hold(_module: Any, _args: Any) -> None:
            priority.append(aside())
            computing.set()
            assert go_on.wait(timeout=60)

        held = warm._warmer.register_forward_pre_hook(hold)
        read = warm._read_adapter  # the adapter's files are read on that thread too

        def read_aside(directory: Path) -> Any:
            priority.append(aside())
            return read(directory)

        warm._read_adapter = read_aside  # type: ignore[method-assign]
        attaching = threading.Thread(target=lambda: warm.attach(v3, files, succeeds=V2))
        attaching.start()
        assert computing.wait(timeout=60)
        assert warm.generate([Sequence(chat(warm, "my card was stolen"), V2, 6, 0.0)])[0].tokens > 0
        assert v3 in warm.adapters and warm.prefixes_warmed_beside == 0
        go_on.set()
        attaching.join(timeout=60)
        held.remove()
        # One intra-op thread there: a second OpenMP team of torch's threads would slow every decoding pass after
        # it (libgomp stops spinning once it manages more threads than cores). Decoding keeps its own count.
        assert priority == [(19, os.SCHED_IDLE, 1)] * 2
        decoding: list[int] = []
        counted = warm.model.register_forward_pre_hook(lambda _m, _a: decoding.append(torch.get_num_threads()))
        warm.generate([Sequence(chat(warm, text), V2, 2, 0.0)])
        counted.remove()
        assert decoding and set(decoding) == {warm.threads}
        attach = next(p for p in reversed(warm.passes) if p.kind == "attach")
        beside = next(p for p in warm.passes if p.kind == "beside")
        assert beside.started > attach.started and beside.tokens >= 8 and beside.kind not in PAUSES
        ended = beside.started + beside.seconds
        assert any(p.kind == "step" and beside.started < p.started < ended for p in warm.passes)
        reused = warm.prefix_tokens_reused
        # Its first request, a lone row, starts from the prefix prefilled beside decoding (the attach returned
        # without waiting for the engine to store it: the engine does before it takes another request), and
        # gets what it gets from a fresh engine.
        mark = time.perf_counter()
        got = warm.generate([Sequence(chat(warm, text), v3, 6, 0.0)])[0]
        assert warm.prefix_tokens_reused > reused and warm.prefixes_warmed_beside == 1
        assert got.text == expected.text and got.mean_logprob == pytest.approx(expected.mean_logprob, abs=1e-4)
        stored = next(p for p in warm.passes if p.kind == "warm" and p.started > attach.started)
        join = next(p for p in warm.passes if p.kind == "join" and p.started > mark)
        assert (join.rows, join.adapters, join.prefix_s, join.uncached_tokens) == (1, 1, 0.0, 0)
        assert stored.started < join.started
        # Its LoRA weights were stacked for the batched path beside decoding too, alone and beside its
        # predecessor's: neither its first pass nor the first steps of both versions side by side stack them.
        mark = time.perf_counter()
        warm.generate([Sequence(chat(warm, text), v3, 6, 0.0), Sequence(chat(warm, text), V2, 6, 0.0)])
        both = [p for p in warm.passes if p.kind == "step" and p.started > mark]
        assert both and both[0].adapters == 2
        assert all(p.built_s == 0.0 for p in warm.passes if p.kind in {"join", "step"} and p.started > attach.started)
        # The trace times the LoRA deltas' work of each pass apart (what a step of both versions does more than
        # a step of one is all there); rows of the base alone run none.
        assert all(0 < p.lora_s < p.seconds for p in both)
        # and the positions each step attended over: the prompt and the tokens generated so far
        assert [p.width for p in both[:2]] == [len(chat(warm, text)) + 1, len(chat(warm, text)) + 2]
        mark = time.perf_counter()
        warm.generate([Sequence(chat(warm, text), None, 6, 0.0)])
        alone = [p for p in warm.passes if p.kind in {"join", "step"} and p.started > mark]
        assert alone and all(p.lora_s == 0.0 for p in alone)
        assert attach.seconds > 0 and attach.seconds in warm.pauses
        # Without a predecessor a lone row of a new adapter prefills its whole prompt.
        warm.detach(V2)
        warm.attach(v4, files)  # into V2's slot, now free
        reused, mark = warm.prefix_tokens_reused, time.perf_counter()
        warm.generate([Sequence(chat(warm, text), v4, 6, 0.0)])
        assert warm.prefix_tokens_reused == reused
        whole = next(p for p in warm.passes if p.kind == "join" and p.started > mark)  # the trace says so
        assert 0 < whole.uncached_tokens < whole.tokens
        # Rows of two adapters decode side by side: the trace says so.
        mark = time.perf_counter()
        warm.generate([Sequence(chat(warm, text), v3, 6, 0.0), Sequence(chat(warm, text), None, 6, 0.0)])
        steps = [p for p in warm.passes if p.kind == "step" and p.started > mark]
        assert steps and steps[0].rows == 2 and steps[0].adapters == 2
    finally:
        warm.close()


def test_a_new_version_serves_at_once_when_the_cores_never_idle_for_its_side_prefill(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from agent.lm import engine as engine_mod  # noqa: PLC0415
    from tests.agent.lm import tiny  # noqa: PLC0415

    v3 = "d" + "3" * 64
    files = tiny.lora_adapter(tiny_models.base, tmp_path / "router-3", seed=5)
    text = "a loan for a car"
    expected = fresh_answer(tiny_models.base, v3, files, text)
    monkeypatch.setattr(engine_mod, "WARM_WAIT_S", 0.5)
    engine = Engine(tiny_models.base, max_batch=4)
    go_on = threading.Event()
    try:
        engine.attach(V2, tiny_models.router_v2)
        cache_the_system_prompt(engine, V2)
        # The side prefill never gets a core (held here): the attach returns after WARM_WAIT_S all the same.
        held = engine._warmer.register_forward_pre_hook(lambda _m, _a: go_on.wait(timeout=60) and None)
        started = time.perf_counter()
        engine.attach(v3, files, succeeds=V2)
        assert time.perf_counter() - started < 5
        assert v3 in engine.adapters and engine.prefixes_warmed_beside == 0
        assert "1 cached prefix(es) not computed beside decoding" in caplog.text
        # The new version's first request prefills the prefix itself, and answers as a fresh engine does.
        mark = time.perf_counter()
        got = engine.generate([Sequence(chat(engine, text), v3, 6, 0.0)])[0]
        join = next(p for p in engine.passes if p.kind == "join" and p.started > mark)
        assert join.uncached_tokens > 0 or join.prefix_s > 0
        assert got.text == expected.text and got.mean_logprob == pytest.approx(expected.mean_logprob, abs=1e-4)
        # What the side thread computes later is dropped: the engine's own entry stays.
        go_on.set()
        wait_for(lambda: any(p.kind == "beside" for p in engine.passes), timeout=30)
        held.remove()
        time.sleep(0.2)
        assert engine.prefixes_warmed_beside == 0
        assert engine.generate([Sequence(chat(engine, text), v3, 6, 0.0)])[0].text == expected.text
    finally:
        go_on.set()
        engine.close()


# -- the site: leases and the hot swap -----------------------------------------------------------------


def release(root: Path, files: Path, name: str, version: str, kind: str, card: dict[str, Any]) -> LMRelease:  # noqa: PLR0917
    directory = root / f"{name}-{version}"
    shutil.copytree(files, directory / "files")
    digest = hashlib.sha256(f"{name}@{version}".encode()).hexdigest()
    return LMRelease(name, version, kind, directory, digest, card, ("alice",))


def test_a_request_finishes_on_the_adapter_version_it_started_with(tmp_path: Path, tiny_models: TinyModels) -> None:
    events: list[dict[str, Any]] = []
    models = LanguageModels(tmp_path / "lm.json", Settings(max_batch=8, batch_window_ms=1), events.append)
    try:
        base = release(tmp_path, tiny_models.base, "chat", "1.0.0", "model", {"task": "chat"})
        models.activate(base)
        card = {"base": {"name": "chat", "version": "1.0.0", "digest": base.manifest_sha256}}
        v1 = release(tmp_path, tiny_models.router_v1, "router", "1.0.0", "adapter", card)
        v2 = release(tmp_path, tiny_models.router_v2, "router", "1.1.0", "adapter", card)
        models.activate(v1)
        held = models.acquire("router")  # a request on 1.0.0 is under way (say, between two rounds of `first`)
        ids = held.engine.prompt_ids([{"role": "user", "content": "my card"}])
        before = held.engine.generate([Sequence(ids, held.engine_adapter, 8, temperature=0.0)])[0].text
        for text in ("my card was stolen", "a loan for a car", "where is my new card"):  # 1.0.0's system prompt
            held.engine.generate([Sequence(chat(held.engine, text), held.engine_adapter, 4, temperature=0.0)])
        models.activate(v2)  # the rollout of 1.1.0
        fresh = models.acquire("router")
        assert fresh.adapter == v2 and held.adapter == v1 and fresh.engine is held.engine  # the base never reloaded
        reused = fresh.engine.prefix_tokens_reused  # 1.1.0 got 1.0.0's cached system prompt when it attached
        fresh.engine.generate([Sequence(chat(fresh.engine, "my card"), fresh.engine_adapter, 4, temperature=0.0)])
        assert fresh.engine.prefix_tokens_reused > reused
        assert set(models.describe()["attached"]) == {v1.manifest_sha256, v2.manifest_sha256}
        old, new = held.engine.generate(
            [
                Sequence(ids, held.engine_adapter, 8, temperature=0.0),
                Sequence(ids, fresh.engine_adapter, 8, temperature=0.0),
            ]
        )
        assert old.text == before != new.text  # the held request still decodes with 1.0.0's weights
        models.release(fresh)
        assert v1.manifest_sha256 in models.describe()["attached"]  # still leased
        models.release(held)
        wait_for(
            lambda: models.describe()["attached"] == [v2.manifest_sha256], what="1.0.0 to be detached after its request"
        )
        wait_for(lambda: any(e.get("type") == "lm.detached" for e in events), what="the detach to be recorded")
        assert [e["release"]["digest"] for e in events if e["type"] == "lm.detached"] == [v1.manifest_sha256]
        assert f"d{v1.manifest_sha256}" not in held.engine.adapters
        with pytest.raises(APIError) as missing:
            models.acquire("no-such-model")
        assert missing.value.status == 404
    finally:
        models.close()


def test_an_adapter_swapped_while_a_batch_decodes_fails_no_row(tmp_path: Path, tiny_models: TinyModels) -> None:
    models = LanguageModels(tmp_path / "lm.json", Settings(max_batch=8, batch_window_ms=1), lambda _e: None)
    try:
        base = release(tmp_path, tiny_models.base, "chat", "1.0.0", "model", {"task": "chat"})
        models.activate(base)
        card = {"base": {"name": "chat", "version": "1.0.0", "digest": base.manifest_sha256}}
        models.activate(release(tmp_path, tiny_models.router_v1, "router", "1.0.0", "adapter", card))
        lease = models.acquire("router")
        streamed = threading.Event()
        ids = lease.engine.prompt_ids([{"role": "user", "content": "loan"}])
        rows = [Sequence(ids, lease.engine_adapter, 48, temperature=1.0, seed=i, on_text=lambda _d: streamed.set())
                for i in range(4)]  # fmt: skip
        running = lease.engine.submit(rows)
        wait_for(streamed.is_set, what="the batch to be decoding")
        models.activate(release(tmp_path, tiny_models.router_v2, "router", "1.1.0", "adapter", card))
        results = running.result(timeout=120)
        assert [r.tokens > 0 for r in results] == [True] * 4
        models.release(lease)
    finally:
        models.close()


def test_an_adapter_for_another_base_digest_is_refused_before_it_loads(tmp_path: Path, tiny_models: TinyModels) -> None:
    models = LanguageModels(tmp_path / "lm.json", Settings(), lambda _e: None)
    card = {"base": {"name": "chat", "version": "1.0.0", "digest": "a" * 64}}
    adapter = release(tmp_path, tiny_models.router_v1, "router", "1.0.0", "adapter", card)
    with pytest.raises(ArtifactError, match="no base model is active"):
        models.check(adapter)
    try:
        models.activate(release(tmp_path, tiny_models.base, "chat", "1.0.0", "model", {"task": "chat"}))
        with pytest.raises(ArtifactError, match="not the active base"):
            models.activate(adapter)
        with pytest.raises(ArtifactError, match="names no base"):
            models.check(release(tmp_path, tiny_models.router_v1, "nobase", "1.0.0", "adapter", {}))
        assert models.describe()["adapters"] == {} and models.describe()["attached"] == []
    finally:
        models.close()
