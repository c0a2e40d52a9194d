"""The memory-map guard: keeps compiled programs while the next unit of work fits under the
process's map limit, drops them before it might not (a process past the limit segfaults)."""

import pytest

from headkv_jax import memory_maps


@pytest.fixture
def fake_process(monkeypatch):
  """A process holding ``state["held"]`` of 1,000 maps; clearing the caches drops it to 50."""
  state = dict(held=0, cleared=0)
  monkeypatch.setattr(memory_maps, "memory_maps", lambda: (state["held"], 1000))

  def clear():
    state["cleared"] += 1
    state["held"] = 50

  monkeypatch.setattr(memory_maps.jax, "clear_caches", clear)
  monkeypatch.setattr(memory_maps, "_largest_step", 0)
  monkeypatch.setattr(memory_maps, "_last_count", None)
  return state


def test_the_adaptive_rule_keeps_room_for_twice_the_largest_unit_seen(fake_process):
  """Limit 1,000, HEADROOM 0.3: units of 100 maps keep everything up to 700 held (the room
  is the 300 floor), 701 releases; the next unit is measured from the 50 held after the
  release, and one of 250 makes the next call want 500 of room, so 501 releases."""
  calls = []
  for held in (100, 200, 300, 400, 500, 600, 700):
    fake_process["held"] = held
    calls.append(memory_maps.release_near_limit())
  assert calls == [False] * 7 and fake_process["cleared"] == 0
  fake_process["held"] = 701  # past 1,000 - max(2 * 100, 300)
  assert memory_maps.release_near_limit() and fake_process["cleared"] == 1
  fake_process["held"] = 300  # 250 after the release's 50: the largest unit so far
  assert not memory_maps.release_near_limit()
  fake_process["held"] = 501  # 501 + 2 * 250 > 1,000
  assert memory_maps.release_near_limit() and fake_process["cleared"] == 2


def test_a_fixed_fraction_releases_past_it_whatever_the_history(fake_process):
  fake_process["held"] = 500
  assert not memory_maps.release_near_limit(0.5)
  fake_process["held"] = 501
  assert memory_maps.release_near_limit(0.5) and fake_process["cleared"] == 1
