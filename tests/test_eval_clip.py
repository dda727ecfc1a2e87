"""CLIP score: tokenizer on a hand-made BPE vocabulary, model layout, and the score end to end."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from dfm.eval.cli import main
from dfm.eval.clip_score import CLIP, BPETokenizer, _bytes_to_unicode, clip_score

TINY = dict(
    embed_dim=16, resolution=32, vision_layers=1, vision_width=64, patch=16, text_width=64, text_heads=1, text_layers=1
)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    # Same file layout as bpe_simple_vocab_16e6.txt.gz: a header line, then one merge per line.
    path = tmp_path_factory.mktemp("clip") / "vocab.txt.gz"
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def test_tokenizer_applies_merges_and_frames_with_sot_eot(vocab) -> None:
    tok = BPETokenizer(vocab)
    # 256 byte symbols, 256 end-of-word byte symbols, then merges in order, then SOT and EOT.
    assert tok.encoder["ca"] == 512 and tok.encoder["cat</w>"] == 513 and tok.encoder["dog</w>"] == 515
    assert (tok.sot, tok.eot) == (516, 517)
    assert tok.encode("A  CAT") == [256 + list(_bytes_to_unicode()).index(ord("a")), 513]
    ids = tok(["cat dog!", "cat " * 100], context_length=8)
    assert ids.shape == (2, 8)
    bang = 256 + list(_bytes_to_unicode()).index(ord("!"))
    assert ids[0].tolist() == [516, 513, 515, bang, 517, 0, 0, 0]
    assert ids[1].tolist() == [516, *[513] * 6, 517]  # truncated, EOT kept


def test_clip_state_dict_round_trip_infers_the_sizes() -> None:
    torch.manual_seed(0)
    model = CLIP(**TINY, vocab_size=518, context_length=8)
    keys = model.state_dict()
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "logit_scale"} <= set(keys)
    assert "transformer.resblocks.0.attn.in_proj_weight" in keys
    rebuilt = CLIP.from_state_dict(keys)
    assert rebuilt.resolution == 32
    tokens = torch.tensor([[516, 513, 517, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(rebuilt.encode_text(tokens), model.encode_text(tokens))


def test_clip_score_of_matching_embeddings(vocab) -> None:
    # With identical image and text embeddings the score is 100; with opposite ones it is clipped at 0.
    torch.manual_seed(0)
    model = CLIP(**TINY, vocab_size=518, context_length=8).eval()
    tok = BPETokenizer(vocab)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    text = model.encode_text(tok(["cat", "dog"], 8))
    model.encode_image = lambda x: text  # type: ignore[method-assign]
    assert clip_score(model, tok, images, ["cat", "dog"]) == pytest.approx(100.0)
    model.encode_image = lambda x: -text  # type: ignore[method-assign]
    assert clip_score(model, tok, images, ["cat", "dog"]) == 0.0
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(model, tok, images, ["cat"])


def test_clip_metric_from_the_command_line(vocab, tmp_path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(CLIP(**TINY, vocab_size=518, context_length=8).state_dict(), weights)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / "t2i.npz", arr_0=images, prompts=np.array(["a cat", "a dog", "cat dog"]))
    out = tmp_path / "scores.json"
    argv = ["score", str(tmp_path / "t2i.npz"), "--metrics", "clip", "--out", str(out), "--no-progress"]
    argv += ["--weights", f"clip={weights}", "--weights", f"clip-vocab={vocab}"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["scores"]["clip_score"] <= 100.0
    assert result["protocol"]["extractors"]["clip"]["resolution"] == 32


def test_clip_without_weights_says_what_to_pass(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DFM_CLIP_WEIGHTS", raising=False)
    np.savez(tmp_path / "t2i.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), prompts=np.array(["a", "b"]))
    assert main(["score", str(tmp_path / "t2i.npz"), "--metrics", "clip", "--no-progress"]) == 2
    assert "DFM_CLIP_WEIGHTS" in capsys.readouterr().err
