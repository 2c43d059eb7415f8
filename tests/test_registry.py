"""runtime.registry on its own: loads shared by concurrent callers, eviction by the configured policy, pinned and
busy models kept, unknown models and broken files named, the registry section validated."""
from __future__ import annotations

import asyncio

import pytest

from lipsync.config import ConfigError
from lipsync.errors import FailedPrecondition, NotFound, ResourceExhausted
from lipsync.model.engines import EngineConfig
from lipsync.runtime.registry import Registry, RegistryConfig

PIPELINE = {"micro_batch": {"cpu": 2, "cuda": 2}, "pinned_micro_batch": {"cpu": 2, "cuda": 2}, "jpeg_quality": 75}


def registry(weights, avatar, names=("a", "b"), **config) -> Registry:
    models = {n: {"checkpoint": str(weights["328"]), "audio_encoder": str(weights["encoder"]), "avatar": str(avatar)}
              for n in names}
    for name, extra in config.pop("models", {}).items():
        models[name].update(extra)
    return Registry(models, RegistryConfig.from_dict({"devices": ["cpu"], **config}),
                    EngineConfig.from_dict({"backend": "eager"}), PIPELINE, "cpu")


def test_concurrent_requests_share_one_load_and_lru_evicts(weights, tiny_avatar):
    evicted = []

    async def main():
        r = registry(weights, tiny_avatar, ("a", "b", "c"), max_models=2, eviction="lru")
        r.on_evict = lambda model, reason: evicted.append((model, reason))
        loads, load_pipeline = [], r._load_pipeline
        r._load_pipeline = lambda entry, device: loads.append(entry.spec.name) or load_pipeline(entry, device)
        got = await asyncio.gather(*[r.acquire("a") for _ in range(3)])
        assert loads == ["a"] and all(loaded_now for _, loaded_now, _ in got)  # one load; each waited for it
        for entry, _, _ in got:
            r.release(entry)
        for name in ("b", "a", "c"):  # "b" is now the least recently used
            r.release((await r.acquire(name))[0])
        state = {n: e.loaded for n, e in r.entries.items()}
        assert loads == ["a", "b", "c"]
        await r.close()
        return state
    assert asyncio.run(main()) == {"a": True, "b": False, "c": True}
    assert evicted and evicted[0][0] == "b" and "LRU eviction to make room for c" in evicted[0][1]


def test_pinned_and_busy_models_are_never_evicted(weights, tiny_avatar):
    async def main():
        r = registry(weights, tiny_avatar, ("a", "b"), max_models=1, models={"a": {"pinned": True}})
        await r.load("a")
        with pytest.raises(ResourceExhausted, match="every loaded model is pinned or busy"):
            await r.load("b")
        busy = registry(weights, tiny_avatar, ("a", "b"), max_models=1)
        entry, _, _ = await busy.acquire("a")  # in flight
        with pytest.raises(FailedPrecondition, match="1 requests in flight"):
            await busy.unload("a")
        with pytest.raises(ResourceExhausted):
            await busy.load("b")
        busy.release(entry)
        assert await busy.unload("a") and not await busy.unload("a")  # the second: nothing to unload
        await r.close()
        await busy.close()
    asyncio.run(main())


def test_unknown_models_and_broken_files_are_named(weights, tiny_avatar, tmp_path):
    r = registry(weights, tiny_avatar, ("a",))
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        r.entry("nope")
    broken = Registry({"x": {"checkpoint": str(tmp_path / "missing.pth"), "audio_encoder": str(weights["encoder"]),
                             "avatar": str(tiny_avatar)}}, RegistryConfig.from_dict({"devices": ["cpu"]}),
                      EngineConfig.from_dict({"backend": "eager"}), PIPELINE, "cpu")
    problems = broken.check()
    assert list(problems) == ["x"] and "missing.pth" in problems["x"]


@pytest.mark.parametrize("key, value, allowed", [
    ("max_models", 0, "registry.max_models=0: must be a whole number >= 1"),
    ("eviction", "fifo", "registry.eviction='fifo': must be one of lfu, lru"),
    ("max_batch", 4096, "registry.max_batch=4096: must be a whole number in 1..1024"),
    ("nonsense", 1, "unknown registry settings: ['nonsense']"),
])
def test_the_registry_section_is_validated_where_read(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        RegistryConfig.from_dict({key: value})
    assert str(info.value).startswith(allowed)
