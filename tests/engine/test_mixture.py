"""data.mix: weighted mixtures of tokenized sources."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from leanlm.engine.config import load_config
from leanlm.engine.data import build_corpus
from leanlm.engine.data.corpus import PackedTokens
from leanlm.engine.data.mixture import BLOCK, MixedTokens, block_counts
from leanlm.engine.data.tokenize import tokenize_source
from leanlm.engine.errors import CheckpointError, ConfigError, DataError
from leanlm.engine.trainer import train


def _source(n_tokens: int, offset: int, seed: int) -> PackedTokens:
    tokens = (np.arange(n_tokens) + offset).astype(np.int64)
    return PackedTokens(tokens, 4, batch_size=8, micro=8, rank=0, world=1, seed=seed)


def _mix(world=1, rank=0, micro=8, weights=(0.9, 0.1), names=("a", "b")) -> MixedTokens:
    sources = [_source(40_001, 0, 1), _source(40_001, 10**6, 2), _source(40_001, 2 * 10**6, 3)][: len(names)]
    return MixedTokens(sources, list(names), list(weights), batch_size=16, micro=micro, rank=rank, world=world, seed=0)


def test_each_block_holds_the_weights_exactly_and_each_source_is_read_in_its_own_order():
    assert block_counts([0.9, 0.1]).tolist() == [3686, 410] and block_counts([1, 1, 1]).sum() == BLOCK
    mix = _mix()
    seen = {0: [], 1: []}
    for p in range(2 * BLOCK + 100):
        s, k = mix.locate(p)
        seen[s].append(k)
    assert seen[0] == list(range(len(seen[0]))) and seen[1] == list(range(len(seen[1])))  # no gap, no repeat
    assert abs(len(seen[1]) / (2 * BLOCK + 100) - 0.1) < 0.01


def test_the_same_rows_for_any_world_size_and_micro_batch_split():
    one = _mix()
    two = [_mix(world=2, rank=r, micro=4) for r in (0, 1)]
    for _ in range(5):
        a = np.concatenate([b.numpy() for b in one.next_step()])  # two micro-batches of 8
        parts = [m.next_step() for m in two]  # each rank: two micro-batches of 4
        b = np.concatenate([parts[r][j].numpy() for j in range(2) for r in range(2)])
        assert np.array_equal(a, b)


def test_adding_a_source_reshuffles_nothing_else():
    two, three = _mix(), _mix(weights=(0.9, 0.1, 0.5), names=("a", "b", "c"))
    assert np.array_equal(two.sources[0].rows(range(7, 8)), three.sources[0].rows(range(7, 8)))
    rows_a = [two.sources[0].rows(range(k, k + 1)) for k in range(20)]
    got = []
    for p in range(200):
        s, k = three.locate(p)
        if s == 0:
            got.append(three.sources[0].rows(range(k, k + 1)))
    assert all(np.array_equal(x, y) for x, y in zip(got[:20], rows_a))  # a's rows in a's own order


@pytest.fixture(scope="module")
def two_sources(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    files = sorted(corpus_dir.glob("*.py"))
    for name, part in (("code_a", files[::2]), ("code_b", files[1::2])):
        (root / name).mkdir()
        for f in part:
            shutil.copy(f, root / name / f.name)
    tokenize_source(str(root / "code_a"), root / "a", vocab_size=512, val_fraction=0.15, unit_bytes=60_000)
    tokenize_source(str(root / "code_b"), root / "b", tokenizer=str(root / "a"), val_fraction=0.15)
    return root


def _mix_over(tiny_base, root, tmp_path, weights=(0.75, 0.25), extra=()):
    keep = [o for o in tiny_base if not o.startswith(("data.source", "data.vocab_size"))]
    mix = f"data.mix=[{{name: a, source: 'tokens:{root / 'a'}', weight: {weights[0]}}}, " + (
        f"{{name: b, source: 'tokens:{root / 'b'}', weight: {weights[1]}}}]"
    )
    return [*keep, mix, f"train.out_dir={tmp_path / 'run'}", *extra]


def test_a_mixture_trains_logs_each_source_and_resumes_bitwise(two_sources, tiny_base, tmp_path):
    over = _mix_over(tiny_base, two_sources, tmp_path)
    full = train(load_config(None, [*over[:-1], f"train.out_dir={tmp_path / 'full'}"]))
    train(load_config(None, over), stop_at=3)
    resumed = train(load_config(None, [*over, "train.resume=auto"]))
    assert full.losses[3:] == resumed.losses and resumed.final.loss == full.final.loss
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    tags = set().union(*rows)
    assert {"train/a/loss", "train/b/loss", "val/a/loss", "val/b/loss", "data/a/epochs"} <= tags
    final = [r for r in rows if "val/a/loss" in r][-1]
    assert final["val/loss"] == pytest.approx(0.75 * final["val/a/loss"] + 0.25 * final["val/b/loss"])
    changed = _mix_over(tiny_base, two_sources, tmp_path, weights=(0.5, 0.5), extra=["train.resume=auto"])
    with pytest.raises((CheckpointError, DataError), match="another mixture"):
        train(load_config(None, changed))


@pytest.mark.parametrize(
    "mix,message",
    [
        ("[{name: a, source: stdlib, weight: -1}]", "weight=-1: must be a number >= 0"),
        ("[{name: a, source: stdlib, weight: 0}]", "every weight is zero"),
        ("[{name: a, source: 'hf:c4', weight: 1}]", "tokenize a streamed hf: dataset first"),
        ("[{name: a, source: stdlib, weight: 1}, {name: a, source: stdlib, weight: 1}]", "names must differ"),
        ("[{name: a, weight: 1}]", "give exactly name, source and weight"),
        ("[stdlib]", "expected a mapping"),
    ],
)
def test_bad_mixtures_are_one_line(tiny_base, mix, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [*tiny_base, f"data.mix={mix}"])


def test_mixed_tokenizers_and_missing_sources_are_refused(two_sources, corpus_dir, tiny_base, tmp_path):
    other = tmp_path / "other"
    tokenize_source(str(two_sources / "code_b"), other, vocab_size=400, val_fraction=0.15)
    keep = [o for o in tiny_base if not o.startswith(("data.source", "data.vocab_size"))]
    mix = (
        f"data.mix=[{{name: a, source: 'tokens:{two_sources / 'a'}', weight: 1}}, "
        f"{{name: c, source: 'tokens:{other}', weight: 1}}]"
    )
    with pytest.raises(DataError, match="another tokenizer"):
        build_corpus(load_config(None, [*keep, mix]))
    missing = f"data.mix=[{{name: a, source: 'tokens:{tmp_path / 'gone'}', weight: 1}}]"
    with pytest.raises(DataError, match="no such folder"):
        build_corpus(load_config(None, [*keep, missing]))


def test_a_stage_changes_the_mixture_from_its_step_and_each_source_continues_its_order():
    staged = MixedTokens(
        _mix().sources, ["a", "b"], [0.9, 0.1], batch_size=16, micro=8, rank=0, world=1, seed=0,
        stages=[(BLOCK + 100, [0.2, 0.8])],
    )  # fmt: skip
    plain = _mix()
    seen = {0: [], 1: []}
    for p in range(3 * BLOCK):
        s, k = staged.locate(p)
        if p < BLOCK + 100:
            assert (s, k) == plain.locate(p)  # before the stage: the first mixture exactly
        seen[s].append(k)
    assert seen[0] == list(range(len(seen[0]))) and seen[1] == list(range(len(seen[1])))
    after = [staged.locate(p)[0] for p in range(BLOCK + 100, 2 * BLOCK + 100)]
    assert after.count(1) == block_counts([0.2, 0.8])[1]


def test_staged_runs_resume_bitwise_across_the_change(two_sources, tiny_base, tmp_path):
    stages = "data.mix_stages=[{start: 4, weights: {a: 0.1, b: 0.9}}]"
    over = _mix_over(tiny_base, two_sources, tmp_path, extra=[stages])
    full = train(load_config(None, [*over[:-2], f"train.out_dir={tmp_path / 'full'}", stages]))
    for stop in (3, 5):
        out = tmp_path / f"part{stop}"
        part = [*over[:-2], f"train.out_dir={out}", stages]
        train(load_config(None, part), stop_at=stop)
        resumed = train(load_config(None, [*part, "train.resume=auto"]))
        assert full.losses[stop:] == resumed.losses
    # a stage declared later than the checkpoint is a planned change; rewriting a begun one is not
    for stop in (3, 5):
        train(load_config(None, [*over[:-2], f"train.out_dir={tmp_path / f'p{stop}'}", stages]), stop_at=stop)
    later = "data.mix_stages=[{start: 4, weights: {a: 0.1, b: 0.9}}, {start: 6, weights: {a: 1, b: 1}}]"
    train(load_config(None, [*over[:-2], f"train.out_dir={tmp_path / 'p5'}", later, "train.resume=auto"]))
    rewritten = "data.mix_stages=[{start: 4, weights: {a: 0.5, b: 0.5}}]"
    train(load_config(None, [*over[:-2], f"train.out_dir={tmp_path / 'p3'}", rewritten, "train.resume=auto"]))
    with pytest.raises((CheckpointError, DataError), match="another mixture"):
        train(load_config(None, [*over[:-2], f"train.out_dir={tmp_path / 'part5'}", rewritten, "train.resume=auto"]))


@pytest.mark.parametrize(
    "stages,message",
    [
        ("[{start: 0, weights: {a: 1, b: 1}}]", "start after step 0"),
        ("[{start: 3, weights: {a: 1}}]", "a weight for each of a, b"),
        ("[{start: 3, weights: {a: 0, b: 0}}]", "not all zero"),
        ("[{begin: 3}]", "give start (a step) and weights"),
    ],
)
def test_bad_stages_are_one_line(two_sources, tiny_base, tmp_path, stages, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, _mix_over(tiny_base, two_sources, tmp_path, extra=[f"data.mix_stages={stages}"]))


def test_reweighting_works_on_top_of_a_mixture(two_sources, tiny_base, tmp_path):
    extra = ["train.reweight.strategy=linupper", "train.reweight.warmup_steps=2"]
    res = train(load_config(None, _mix_over(tiny_base, two_sources, tmp_path, extra=extra)))
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("reweight/ess_frac" in r and "train/a/loss" in r for r in rows)


def test_an_empty_source_in_a_mix_is_refused(two_sources, tiny_base, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    keep = [o for o in tiny_base if not o.startswith(("data.source", "data.vocab_size"))]
    mix = (
        f"data.mix=[{{name: a, source: 'tokens:{two_sources / 'a'}', weight: 1}}, "
        f"{{name: e, source: '{tmp_path / 'empty'}', weight: 1}}]"
    )
    with pytest.raises(DataError, match="empty"):
        build_corpus(load_config(None, [*keep, mix]))
