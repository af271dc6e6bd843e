"""Every kind of bad input is skipped, counted per reason, logged; too many is a clear error."""

import json
import logging

import pytest

from cotir_jax import data as D
from data_helpers import EXPECTED_SKIPS, cfg_for, corruption_fixture


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  root, good = corruption_fixture(tmp_path_factory.mktemp("bad"))
  cfg = cfg_for(root, tmp_cache=tmp_path_factory.mktemp("idx"), mixing="shuffle", max_skip_fraction=0.5,
                skip_check_min_samples=10)
  return cfg, D.make_source(cfg), good


def test_tar_index_flags_cut_and_missing_members(fixture):
  _, src, _ = fixture
  recs = {src[i].key: src[i] for i in range(len(src))}
  assert recs["bad_cuttar"].truncated and recs["bad_cuttar"].meta is None
  assert recs["bad_nolq"].lq is None and not recs["bad_nolq"].truncated


def test_skips_counted_per_reason_good_all_delivered(fixture, caplog):
  cfg, src, good = fixture
  n = len(src)
  it = D.make_iterator(cfg, 0, source=src, process_index=0, process_count=1, batch_size=1, patch_size=32,
                       end_position=n)
  with caplog.at_level(logging.WARNING, logger="cotir_jax.data.pipeline"):
    keys = [b["meta"]["key"][0] for b in it]
  assert sorted(keys) == sorted(good)                       # each good sample once, nothing else
  assert {r: c for r, c in it.skip_counts.items() if c} == EXPECTED_SKIPS
  assert it.examined == n
  assert it.get_state()["skip_counts"] == EXPECTED_SKIPS
  logged = caplog.text
  assert "shard=noise/noise-bad.tar key=bad_json" in logged and "reason=invalid_json" in logged
  assert "shard=haze/haze-cut.tar key=bad_cuttar" in logged


def test_threshold_error(fixture):
  cfg, src, _ = fixture
  cfg = cfg.copy_and_resolve_references()
  cfg.data.max_skip_fraction = 0.01
  it = D.make_iterator(cfg, 0, source=src, process_index=0, process_count=1, batch_size=1, patch_size=32)
  with pytest.raises(D.SkipFractionError, match=r"max_skip_fraction=1\.00%.*by reason:"):
    for _ in range(len(src)):
      next(it)


def test_uneven_skips_resume_exactly_on_the_same_process_count(fixture):
  """Processes that skipped corrupt samples have read unevenly into their rows: the run's data
  state keeps their offsets, so 2 processes continue exactly; 1 process continues at the first
  global batch neither had started (nothing read twice)."""
  cfg, src, _ = fixture

  def its(count, batch, state=None):
    return [D.make_iterator(cfg, 0, source=src, process_index=i, process_count=count,
                            batch_size=batch, patch_size=32, state=state) for i in range(count)]

  def positions(it, steps):
    return [p for _ in range(steps) for p in next(it)["meta"]["global_position"].tolist()]

  want = [positions(it, 4) for it in its(2, 2)]
  two = its(2, 2)
  read = [positions(it, 2) for it in two]
  state = json.loads(json.dumps(D.merge_states([it.get_state() for it in two])))
  assert state["offsets"] is not None and state["skip_counts"] != [{}, {}]
  assert [positions(it, 2) for it in its(2, 2, state)] == [w[4:] for w in want]
  one = its(1, 4, state)[0]
  assert one.skipped == sum(sum(c.values()) for c in state["skip_counts"])  # counters go on
  assert min(positions(one, 1)) >= state["position"] > max(read[0] + read[1])
