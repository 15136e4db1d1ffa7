"""Chat memory ranked by meaning: the built-in store's vectors (sqlite-vec) from one of the fleet's embedding models,
fused with keyword ranking.

The meaning test runs against the real llama-server serving embeddings from the real small model (`--embeddings`);
the plumbing tests (an embedding model that fails, is not loaded, or changes; a restart with turns still owed their
vectors) use the simulator's embeddings (deterministic vectors with no meaning: a fake for faults and timing).
"""

from __future__ import annotations

import httpx
import pytest
import trio

from queuegate.config import ConfigError, parse_config
from queuegate.memory.backends import BuiltinBackend
from queuegate.memory.context import RECALLED_HEADER
from queuegate.memory.embedder import EmbeddingFailed
from queuegate.memory.outcomes import Outcomes
from queuegate.memory.store import MemoryStore
from tests.helpers import request_lines, wait_until
from tests.realparts import start_llama_server

FACTS = [
    "my cat is called Pixel and she sleeps on the keyboard",
    "how do I fix a flat bicycle tyre?",
    "what's a good recipe for pancakes",
    "I moved to Lisbon last year for work",
    "my favourite band is Radiohead",
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


async def post(gw, messages, chat="c1", timeout=60) -> httpx.Response:
    payload = {"model": "m", "messages": messages, "max_tokens": 1}
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.post(gw.api + "/chat/completions", json=payload, headers={"x-chat-id": chat})


async def tell(gw, facts, chat="c1") -> list[dict]:
    """Say each fact in one chat, a turn each (the chat's history as the client keeps it)."""
    history = [{"role": "system", "content": "You are helpful."}]
    for fact in facts:
        answer = await post(gw, [*history, user(fact)], chat)
        assert answer.status_code == 200
        history += [user(fact), answer.json()["choices"][0]["message"]]
    return history


async def stop(gw) -> None:
    gw.daemon.request_shutdown()
    await wait_until(lambda: gw.daemon.memory.backend.store._db is None, timeout=10)


@pytest.mark.llama
async def test_a_paraphrased_question_finds_a_turn_that_shares_no_word_with_it(
    llama_parts, nursery, start_sim, start_gateway, caplog
):
    caplog.set_level("INFO", logger="queuegate")
    binary, model = llama_parts
    embed_url = await start_llama_server(
        nursery, binary=binary, model=model, extra_args=["--embeddings", "--pooling", "mean"]
    )
    llm, url = await start_sim(tokens_per_s=0)
    gw = await start_gateway(
        {
            "m": {"upstreams": [url], "kind": "llamacpp"},
            "embed": {"upstreams": [embed_url], "kind": "llamacpp", "endpoints": ["embeddings"]},
        },
        memory={"enabled": True, "keep_last": 2, "query_k": 1, "embed_model": "embed", "timeout_ms": 10_000},
    )
    memory = gw.daemon.memory
    history = await tell(gw, FACTS)
    await wait_until(lambda: memory.counts["turn_embedded"] == len(FACTS), timeout=60)
    # Questions with no word in common with the turn that answers them: words alone find nothing.
    namespace = memory.namespace(None, None, "id:c1")
    asked_before = memory.counts["question_embedded"]  # (each turn told was a recall too)
    for question, answer in (("Which city do I live in now?", "Lisbon"), ("breakfast food", "pancakes")):
        assert memory.backend.store.recall(namespace, question, 1) == []
        assert (await post(gw, [*history, user(question)])).status_code == 200
        sent = llm.stats.received[-1].body["messages"]
        assert [m["role"] for m in sent] == ["system", "user"]  # the turns are cut; the one that matters is back
        assert RECALLED_HEADER in sent[0]["content"] and answer in sent[0]["content"]
    assert memory.counts["question_embedded"] == asked_before + 2
    # The embeddings were requests of QueueGate's own queue, logged: the turns' in the lowest class, the
    # questions' in the asking request's.
    embedded = [(line["class"], line["status"]) for line in request_lines(caplog) if line["model"] == "embed"]
    assert ("batch", 200) in embedded and embedded.count(("user", 200)) == asked_before + 2


async def test_an_embedding_model_that_fails_or_is_not_loaded_never_holds_a_chat_back(start_sim, start_gateway):
    llm, url = await start_sim(tokens_per_s=0)
    embed, embed_url = await start_sim(tokens_per_s=0)
    models = {
        "m": {"upstreams": [url], "kind": "llamacpp"},
        "embed": {"upstreams": [embed_url], "kind": "llamacpp", "endpoints": ["embeddings"]},
    }
    memory_config = {"enabled": True, "keep_last": 2, "embed_model": "embed", "timeout_ms": 2000}
    gw = await start_gateway(models, memory=memory_config)
    memory = gw.daemon.memory
    embed.set_fault("status_500")  # every embedding fails: turns are kept, found by their words
    history = await tell(gw, FACTS[:2])
    await wait_until(lambda: memory.counts["turn_embed_failed"] >= 1 and memory.counts["remembered"] == 2)
    answer = await post(gw, [*history, user("tell me about Pixel")])
    assert answer.status_code == 200 and "Pixel" in llm.stats.received[-1].body["messages"][0]["content"]
    embed.set_fault(None)  # back: the turns owed their vectors get them (the filler retries with a backoff)
    await wait_until(lambda: memory.counts["turn_embedded"] == 3, timeout=10)  # (the question's turn too)
    assert memory.backend.store.pending(10) == []
    # Failing while loaded: the question's embedding fails, the recall ranks by words.
    embed.set_fault("status_500")
    answer = await post(gw, [*history, user("tell me about Pixel")])
    assert answer.status_code == 200 and "Pixel" in llm.stats.received[-1].body["messages"][0]["content"]
    assert memory.counts["question_embed_failed"] == 1
    embed.set_fault(None)
    # Not loaded (its upstream down): a recall does not wait for it, it ranks by words alone.
    embed.set_fault(None, health_status=500)
    await wait_until(lambda: not gw.daemon.admission.serving("embed"))
    before = embed.stats.requests
    answer = await post(gw, [*history, user("tell me about Pixel")])
    assert answer.status_code == 200 and "Pixel" in llm.stats.received[-1].body["messages"][0]["content"]
    assert memory.counts["question_not_embedded"] == 1 and embed.stats.requests == before


async def test_turns_owed_vectors_are_embedded_after_a_restart_and_again_for_a_new_model(
    start_sim, start_gateway, tmp_path
):
    _, url = await start_sim(tokens_per_s=0)
    embed, embed_url = await start_sim(tokens_per_s=0, embedding_dim=8)
    models = {
        "m": {"upstreams": [url], "kind": "llamacpp"},
        "embed": {"upstreams": [embed_url], "kind": "llamacpp", "endpoints": ["embeddings"]},
        "embed2": {"upstreams": [embed_url], "kind": "llamacpp", "endpoints": ["embeddings"]},
    }
    state = {"state_dir": str(tmp_path / "state")}
    memory_config = {"enabled": True, "embed_model": "embed", "timeout_ms": 2000}
    embed.set_fault("hang")  # the first daemon stores turns but cannot embed them
    first = await start_gateway(models, memory=memory_config, server=state)
    await tell(first, FACTS[:3])
    await wait_until(lambda: first.daemon.memory.counts["remembered"] == 3)
    await stop(first)
    embed.set_fault(None)
    second = await start_gateway(models, memory=memory_config, server=state)
    await wait_until(lambda: second.daemon.memory.counts["turn_embedded"] == 3, timeout=10)
    await stop(second)
    third = await start_gateway(models, memory={**memory_config, "embed_model": "embed2"}, server=state)
    await wait_until(lambda: third.daemon.memory.counts["turn_embedded"] == 3, timeout=10)  # every turn again
    assert third.daemon.memory.backend.store.pending(10) == []


def test_an_embed_model_must_be_one_of_the_fleets_embedding_models():
    base = '[models.m]\nupstreams = ["http://h/v1"]\nkind = "llamacpp"\n'
    with pytest.raises(ConfigError, match=r"memory\.embed_model.*'nope' is no model or alias.*: m$"):
        parse_config(base + '[memory]\nenabled = true\nembed_model = "nope"\n', source="t.toml")
    chat_only = base + 'endpoints = ["chat"]\n[memory]\nenabled = true\nembed_model = "m"\n'
    with pytest.raises(ConfigError, match=r"is a model that serves no embeddings; expected one of .*: none configured"):
        parse_config(chat_only, source="t.toml")
    toolserver = base + '[memory]\nbackend = "toolserver"\nserver = "t"\nembed_model = "m"\n'
    toolserver += '[tools.servers.t]\nurl = "http://127.0.0.1:9"\n'
    with pytest.raises(ConfigError, match="is for the builtin backend"):
        parse_config(toolserver, source="t.toml")


def test_the_store_fuses_words_and_vectors_and_keeps_vectors_with_their_turns(tmp_path):
    """The store alone, with hand-made vectors (a fake for what a model would answer)."""
    store = MemoryStore(tmp_path / "memory.sqlite3", embed_model="e")
    store.open()
    store.remember([("a", "User: my cat is called Pixel"), ("a", "User: I live in Lisbon"), ("b", "User: cat Tom")])
    pending = store.pending(10)
    assert [text for _, text in pending] == ["User: my cat is called Pixel", "User: I live in Lisbon", "User: cat Tom"]
    assert not store.has_vectors
    vectors = {"Pixel": [1.0, 0.0, 0.0], "Lisbon": [0.0, 1.0, 0.0], "Tom": [1.0, 0.0, 0.0]}
    store.add_vectors([(turn, text, next(v for w, v in vectors.items() if w in text)) for turn, text in pending])
    assert store.pending(10) == [] and store.has_vectors
    # By meaning alone (no word in common), by words alone, and fused: a turn found both ways ranks first.
    assert store.recall("a", "pet?", 1, vector=[0.9, 0.1, 0.0]) == ["User: my cat is called Pixel"]
    assert store.recall("a", "Lisbon", 2) == ["User: I live in Lisbon"]
    assert store.recall("a", "Lisbon", 2, vector=[0.9, 0.1, 0.0])[0] == "User: I live in Lisbon"
    assert all("Tom" not in text for text in store.recall("a", "cat Tom", 5, vector=[1.0, 0.0, 0.0]))  # by chat
    # With no vector found, a word most of the chat's turns have still ranks (here: the only turn with one).
    assert store.recall("b", "cat", 1, vector=[0.0, 0.0, 1.0]) == ["User: cat Tom"]
    # Forgetting a chat takes its vectors; a turn that takes a forgotten turn's rowid is still owed its own.
    [(turn, text)] = [(t, x) for t, x in pending if "Lisbon" in x]
    assert store.forget("a") == 2
    store.remember([("c", "User: a new turn")])
    store.add_vectors([(turn, text, [0.0, 1.0, 0.0])])  # (the filler, late, with the forgotten turn's vector)
    assert [text for _, text in store.pending(10)] == ["User: a new turn"]
    assert store.recall("c", "anything", 5, vector=[0.0, 1.0, 0.0]) == []  # the forgotten vector went nowhere
    # Another dimension (another model) starts the vectors again: every turn is owed one.
    [(new_turn, new_text)] = store.pending(10)
    store.add_vectors([(new_turn, new_text, [0.5, 0.5])])
    assert {text for _, text in store.pending(10)} == {"User: cat Tom"}
    assert store.recall("c", "x", 1, vector=[0.5, 0.5]) == ["User: a new turn"]
    store.close()
    # Opened with no embedding model, the vectors go, and nothing is owed.
    plain = MemoryStore(tmp_path / "memory.sqlite3")
    plain.open()
    assert plain.pending(10) == [] and not plain.has_vectors and plain.recall("b", "cat", 1) == ["User: cat Tom"]
    plain.close()


async def test_a_text_the_model_cannot_embed_never_holds_the_others_back(tmp_path):
    """The filler against a fake embedder (a fault a real server gives only for some texts: too long for its batch)."""

    class Embedder:
        model = "fake"
        serving = True
        calls = 0

        def ready(self) -> bool:
            return self.serving

        async def embed(self, texts, klass):
            self.calls += 1
            if "too long" in texts[0] or not self.serving:
                raise EmbeddingFailed("input is too large to process")
            return [[1.0, float(len(texts[0]))]]

    store = MemoryStore(tmp_path / "memory.sqlite3", embed_model="fake")
    embedder = Embedder()
    outcomes = Outcomes()
    backend = BuiltinBackend(store, outcomes, embedder)  # type: ignore[arg-type]
    await backend.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.upkeep)
        await backend.remember([("a", "User: too long 1"), ("a", "User: too long 2"), ("a", "User: fine")])
        await wait_until(lambda: outcomes.counts["turn_embedded"] == 1 and not store.pending(10))
        assert outcomes.counts["turn_not_embeddable"] == 2
        # A model that fails everything (or is down) keeps the turns waiting, with a backoff.
        embedder.serving = False
        await backend.remember([("a", "User: later")])
        await wait_until(lambda: outcomes.counts["turn_embed_failed"] >= 1)
        await trio.sleep(0.5)
        assert [text for _, text in store.pending(10)] == ["User: later"] and embedder.calls <= 5
        embedder.serving = True
        await wait_until(lambda: outcomes.counts["turn_embedded"] == 2, timeout=5)
        nursery.cancel_scope.cancel()
    await backend.close()
