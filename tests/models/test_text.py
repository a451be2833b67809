"""Text conditioning: tiny CLIP / T5 encoders built from configs, saved and loaded by path (nothing is
downloaded), SD3's combination of the three, and the built-in trainable word encoder."""

import shutil

import pytest
import torch

from models.text import TextEmbeddings, WordEncoder, load_text_encoder, masked_mean

CAPTIONS = ["a red cube on a blue floor", "two cats", ""]
WORDS = "a red cube on blue floor two cats photo of the dog".split()


def _tokenizer(specials: list[str], template: str, max_length: int):
    """A word-level fast tokenizer (lower-cased, whitespace split) with a post-processing template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], unk_token=specials[1],
                                   model_max_length=max_length), len(vocab)


def _save_clip(folder, hidden: int, projection: int | None, max_pos: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # pad, unk, bos, eos: eos id 3 (!= 2, so CLIP pools at the first EOS)
    tokenizer, vocab = _tokenizer(["<pad>", "<unk>", "<bos>", "<eos>"], "<bos> $A <eos>", max_pos)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=max_pos, projection_dim=projection or 8,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(hidden)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _save_t5(folder, d_model: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab = _tokenizer(["<pad>", "<unk>", "</s>"], "$A </s>", 512)
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    torch.manual_seed(d_model)
    T5EncoderModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hf_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    return {
        "clip_l": _save_clip(root / "clip_l", hidden=32, projection=12),
        "clip_g": _save_clip(root / "clip_g", hidden=48, projection=20),
        "clip_plain": _save_clip(root / "clip_plain", hidden=24, projection=None),
        "t5": _save_t5(root / "t5", d_model=96),
    }


def test_clip_with_projection_by_path(hf_paths):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    enc = load_text_encoder("clip:" + hf_paths["clip_l"])
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (32, 12, 16)
    emb = enc.encode(CAPTIONS)
    assert isinstance(emb, TextEmbeddings)
    assert emb.tokens.shape == (3, 16, 32) and emb.pooled.shape == (3, 12) and emb.mask.dtype == torch.bool
    # bos + words + eos are real; "" still has bos/eos
    assert emb.mask.sum(1).tolist() == [9, 4, 2]
    # same numbers as calling transformers directly: penultimate hidden layer, projected EOS state
    tok = AutoTokenizer.from_pretrained(hf_paths["clip_l"])
    model = CLIPTextModelWithProjection.from_pretrained(hf_paths["clip_l"]).eval()
    batch = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(emb.tokens, ref.hidden_states[-2])
    torch.testing.assert_close(emb.pooled, ref.text_embeds)
    assert not emb.tokens.requires_grad


def test_clip_without_projection_pools_the_eos_state(hf_paths):
    enc = load_text_encoder("clip:" + hf_paths["clip_plain"], clip_layer=-1)
    assert enc.pooled_dim == enc.token_dim == 24
    emb = enc.encode(["two cats"])
    eos = emb.mask[0].sum() - 1  # bos two cats eos
    torch.testing.assert_close(emb.pooled[0], emb.tokens[0, eos])


def test_clip_text_tower_of_a_full_clip_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    tokenizer, vocab = _tokenizer(["<pad>", "<unk>", "<bos>", "<eos>"], "<bos> $A <eos>", 16)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = load_text_encoder(f"clip:{tmp_path}")
    assert enc.pooled_dim == 12
    batch = tokenizer(["two cats"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_text_features(**batch)
    ref = getattr(ref, "pooler_output", ref)  # transformers 5 returns an output object
    torch.testing.assert_close(enc.encode(["two cats"]).pooled, ref)


def test_t5_masked_tokens_and_mean_pooling(hf_paths):
    enc = load_text_encoder("t5:" + hf_paths["t5"], max_length=10)
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (96, 96, 10)
    emb = enc.encode(CAPTIONS)
    assert emb.tokens.shape == (3, 10, 96)
    assert emb.mask.sum(1).tolist() == [8, 3, 1]  # words + </s>
    torch.testing.assert_close(emb.pooled, masked_mean(emb.tokens, emb.mask))
    # the attention mask reaches T5: real tokens do not depend on how much padding follows
    longer = load_text_encoder("t5:" + hf_paths["t5"], max_length=14).encode(["two cats"])
    torch.testing.assert_close(longer.tokens[0, :3], emb.tokens[1, :3])


def test_sd3_combination_layout(hf_paths):
    spec = "sd3:" + ",".join(hf_paths[k] for k in ("clip_l", "clip_g", "t5"))
    enc = load_text_encoder(spec, max_length=10)
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (96, 12 + 20, 16 + 10)
    emb = enc.encode(CAPTIONS)
    assert emb.tokens.shape == (3, 26, 96) and emb.mask.shape == (3, 26)
    el = load_text_encoder("clip:" + hf_paths["clip_l"]).encode(CAPTIONS)
    eg = load_text_encoder("clip:" + hf_paths["clip_g"]).encode(CAPTIONS)
    et = load_text_encoder("t5:" + hf_paths["t5"], max_length=10).encode(CAPTIONS)
    torch.testing.assert_close(emb.tokens[:, :16, :32], el.tokens)  # CLIP-L channels first
    torch.testing.assert_close(emb.tokens[:, :16, 32:80], eg.tokens)  # then CLIP-G
    assert emb.tokens[:, :16, 80:].abs().max() == 0  # zero-padded to T5's width
    torch.testing.assert_close(emb.tokens[:, 16:], et.tokens)  # T5 tokens follow on the sequence
    torch.testing.assert_close(emb.pooled, torch.cat([el.pooled, eg.pooled], 1))
    assert torch.equal(emb.mask, torch.cat([el.mask, et.mask], 1))


def test_sd3_pipeline_folder(hf_paths, tmp_path):
    for sub, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5")):
        shutil.copytree(hf_paths[key], tmp_path / sub)
        tok = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}[sub]
        shutil.copytree(hf_paths[key], tmp_path / tok)
    emb = load_text_encoder(f"sd3:{tmp_path}", max_length=10).encode(["a red cube"])
    assert emb.tokens.shape == (1, 26, 96) and emb.pooled.shape == (1, 32)


def test_bad_specs():
    for spec in ("clip", "bert:x", "sd3:a,b"):
        with pytest.raises(ValueError):
            load_text_encoder(spec)


def test_word_encoder_vocab_mask_and_training(tmp_path):
    torch.manual_seed(0)
    train = ["a red cube", "a blue sphere", "two red cubes on a floor", "a cube, red!"]
    enc = WordEncoder.from_captions(train, dim=32, max_length=6, layers=1)
    assert enc.vocab[:4] == ["<pad>", "<unk>", "<cls>", "a"]  # specials, then the most frequent word
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (32, 32, 6)
    ids, mask = enc.tokenize(["a red cube", "unseen words here and more and more", ""])
    assert ids.shape == (3, 6) and mask.sum(1).tolist() == [4, 6, 1]  # <cls> always; cut at max_length
    assert ids[1, 1].item() == enc.index["<unk>"]
    emb = enc.encode(train)
    assert emb.tokens.shape == (4, 6, 32) and emb.pooled.shape == (4, 32)
    assert emb.tokens[~emb.mask].abs().max() == 0
    # trainable end to end
    emb.pooled.square().sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    # whatever sits at padded positions does not change the real tokens (key-padding mask)
    ids, mask = enc.tokenize(["a red cube"])
    junk = torch.where(mask, ids, torch.randint(1, len(enc.vocab), ids.shape))
    with torch.no_grad():
        torch.testing.assert_close(enc(junk, mask).tokens, enc(ids, mask).tokens)
    # round trip: file, and the vocabulary inside the state_dict
    enc.save(tmp_path / "words.pt")
    again = load_text_encoder(f"word:{tmp_path / 'words.pt'}")
    torch.testing.assert_close(again.encode(train).tokens, enc.encode(train).tokens)
    other = WordEncoder.from_captions(["different words"], dim=32, max_length=6, layers=1)
    with pytest.raises(ValueError, match="vocabulary"):
        other.load_state_dict(enc.state_dict())


def test_text_embeddings_to_and_cond():
    emb = TextEmbeddings(torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.ones(2, 3, dtype=torch.bool))
    half = emb.to(torch.bfloat16)
    assert half.tokens.dtype == torch.bfloat16 and half.mask.dtype == torch.bool
    assert set(emb.as_cond()) == {"context", "pooled", "context_mask"} and len(emb) == 2


def test_hub_names_are_found_in_the_assets_folder(hf_paths, tmp_path):
    """Offline nodes: `clip:org/name` loads DITSCALE_ASSETS/text/org--name (what `ditscale assets
    fetch --text-encoder org/name` writes); names the folder lacks, local paths and word: stay as given."""

    from harness.assets import resolve_text_spec
    from harness.data.text_embeddings import load_encoder

    assets = tmp_path / "assets"
    local = assets / "text" / "org--tiny-clip"
    shutil.copytree(hf_paths["clip_plain"], local)
    assert resolve_text_spec("clip:org/tiny-clip", assets) == f"clip:{local}"
    assert resolve_text_spec("sd3:org/tiny-clip,other/g,org/tiny-clip", assets) == f"sd3:{local},other/g,{local}"
    assert resolve_text_spec("clip:other/model", assets) == "clip:other/model"
    assert resolve_text_spec(f"t5:{hf_paths['t5']}", assets) == f"t5:{hf_paths['t5']}"
    assert resolve_text_spec("word:/some/vocab.pt", assets) == "word:/some/vocab.pt"
    encoder = load_encoder("clip:org/tiny-clip", assets=str(assets))
    assert encoder.encode(CAPTIONS).tokens.shape[:2] == (3, 16)
